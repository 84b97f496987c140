"""An ablation grid through `python -m lsm_jax.study` on CPU: tiny HGRN2 runs at two aspect ratios and two contexts
are trained, every milestone evaluated, and the report carries Table 5- and Table 6-shaped tables whose cells are
the runs' own evaluation rows; the shipped ablation grids list the paper's runs."""

import csv
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import pytest
from conftest import FAST_CPU_COMPILE

from lsm_jax import study
from lsm_jax import train as train_cli
from lsm_jax.study import ablation_tables

REPO = pathlib.Path(__file__).resolve().parents[1]
NIAH_LENGTHS = (256,)  # the needle and question take 210 byte tokens


def write_shape(path, d_model, layers):
  path.write_text(f"""from __gin__ import dynamic_registration
from lsm_jax import trainer
from lsm_jax.models import configs

configs.ModelConfig:
  size = 'micro'
  num_layers = {layers}
  d_model = {d_model}
  num_heads = 2
  head_dim = {d_model // 2}
  ffn_dim = {2 * d_model}
  dtype = 'float32'

trainer.train.ablation = 'aspect'
""")


def write_micro_grid(tmp_path):
  """HGRN2 at shapes 32 × 4 and 64 × 1 (equal l·d²) with 64 tokens, and 32 × 4 with 128 tokens."""
  write_shape(tmp_path / "32x4.gin", 32, 4)
  write_shape(tmp_path / "64x1.gin", 64, 1)
  (tmp_path / "recipe.gin").write_text("""from __gin__ import dynamic_registration
from lsm_jax import optim
from lsm_jax import trainer

include 'gin/study/mini/run.gin'

TRAIN_STEPS = 8
SEQ_LEN = 64
GLOBAL_BATCH_SIZE = 8
trainer.train.num_milestones = 2
trainer.train.checkpoint_every_steps = 8
trainer.train.log_every_steps = 1
optim.OptimizerConfig.warmup_steps = 2
""")
  (tmp_path / "context_128.gin").write_text("""from __gin__ import dynamic_registration
from lsm_jax import trainer

SEQ_LEN = 128
GLOBAL_BATCH_SIZE = 4
trainer.train.ablation = 'context'
""")
  experiments = {
    f"hgrn2_{shape}": ["gin/models/hgrn2/base.gin", str(tmp_path / f"{shape}.gin"), str(tmp_path / "recipe.gin")]
    for shape in ("32x4", "64x1")
  }
  experiments["hgrn2_32x4_128"] = [*experiments["hgrn2_32x4"], str(tmp_path / "context_128.gin")]
  (tmp_path / "grid.gin").write_text(f"""from __gin__ import dynamic_registration
from lsm_jax import study

study.StudyGrid:
  experiments = {experiments!r}
  eval_tasks = ('val_loss',)
  final_eval_tasks = ('niah',)
  eval_batch_size = 8
  val_max_batches = 1
  niah_overrides = {{'context_lengths': {NIAH_LENGTHS!r}, 'depth_percents': (0.0, 100.0), 'max_new_tokens': 4}}
""")
  return experiments


@pytest.mark.slow  # one study process training and evaluating three runs
def test_micro_ablation_grid_reports_table_5_and_6_layouts(tmp_path):
  experiments = write_micro_grid(tmp_path)
  out = tmp_path / "study"
  command = [sys.executable, "-m", "lsm_jax.study", f"--gin_file={tmp_path / 'grid.gin'}", f"--out={out}"]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_CPU_COMPILE}",
  }
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]

  # Every run's metadata carries the name the grid gave it and its ablation group.
  for name in experiments:
    metadata = json.loads((out / "runs" / name / "run_metadata.json").read_text())
    assert metadata["run_name"] == name
    assert metadata["ablation"] == ("context" if name.endswith("_128") else "aspect")
  with open(out / "eval.csv") as f:
    rows = list(csv.DictReader(f))
  # 2 milestones (0, 8) × 3 runs of validation loss; NIAH at the last milestone only.
  assert {(r["run"], int(r["step"])) for r in rows if r["task"] == "val_loss"} == {
    (name, step) for name in experiments for step in (0, 8)
  }
  assert {(r["run"], int(r["step"])) for r in rows if r["task"] == "niah_easy"} == {(name, 8) for name in experiments}
  coordinates = {(r["run"], r["arch"], r["d_model"], r["num_layers"], r["seq_len"]) for r in rows}
  assert ("hgrn2_32x4_128", "hgrn2", "32", "4", "128") in coordinates and len(coordinates) == 3

  final = {(r["run"], r["task"], r["metric"]): float(r["value"]) for r in rows if int(r["step"]) == 8}
  tables = json.loads((out / "ablation_tables.json").read_text())
  (aspect,) = tables["aspect"]  # two shapes at 64 tokens; one run at 128
  assert aspect["seq_len"] == 64
  assert [(r["arch"], r["d_model"], r["num_layers"]) for r in aspect["rows"]] == [("hgrn2", 32, 4), ("hgrn2", 64, 1)]
  (context,) = tables["context"]  # 32 × 4 at two contexts; 64 × 1 at one
  assert (context["d_model"], context["num_layers"]) == (32, 4)
  assert [(r["run"], r["seq_len"]) for r in context["rows"]] == [("hgrn2_32x4", 64), ("hgrn2_32x4_128", 128)]
  for row in aspect["rows"] + context["rows"]:
    assert row["step"] == 8
    assert row["scores"]["val loss"] == pytest.approx(final[(row["run"], "val_loss", "loss")])
    assert row["scores"]["NIAH"] == pytest.approx(final[(row["run"], "niah_easy", "weighted_avg")])
    assert "CSR" not in row["scores"]  # not evaluated: the report shows '—'

  report = (out / "report.md").read_text()
  assert "## Aspect ratio, 64-token context (Table 5 layout)" in report
  assert (
    "| Arch | Dim | L | BoolQ | PIQA | HS | WG | ARC-E | ARC-C | OBQA | CSR | WIKI | λ | NIAH | SCROLLS "
    "| val loss | run | step |"
  ) in report
  assert "## Pre-training context at d 32 × 4 layers (Table 6 layout)" in report
  assert "| Arch | Len | BoolQ |" in report
  wide_row = next(line for line in report.splitlines() if line.startswith("| HGRN2 | 64 | 1 |"))
  assert f"| {final[('hgrn2_64x1', 'val_loss', 'loss')]:.4f} | hgrn2_64x1 | 8 |" in wide_row
  assert "| cos2 | 3072 | 8 | 43.52 |" in report  # the paper's Table 5 beside ours
  assert "- milestone checkpoints: 6 saved by the 3 finished run(s), 6 planned by the grid's 3 run(s)" in report
  assert "1,376" in report

  # A rerun (here in-process) skips every finished run and rebuilds the same tables, also from a study directory
  # shared without its checkpoints.
  for run_dir in (out / "runs").iterdir():
    shutil.rmtree(run_dir / "checkpoints")
  study.run_study(str(out), _grid(str(tmp_path / "grid.gin")))
  rerun_report = (out / "report.md").read_text()
  assert "0 run(s) trained and evaluated, 3 finished earlier and skipped" in rerun_report
  assert "- milestone checkpoints: 6 saved by the 3 finished run(s)" in rerun_report
  assert json.loads((out / "ablation_tables.json").read_text()) == tables


def _grid(path, **overrides):
  with gin.unlock_config():
    gin.clear_config()
    train_cli.parse_gin([path], [])
  grid = gin.get_configurable(study.StudyGrid)()
  with gin.unlock_config():
    gin.clear_config()
  return dataclasses.replace(grid, **overrides)


def test_shipped_ablation_grids_list_the_papers_runs():
  data_dirs = {2048: "/c2k", 4096: "/c4k", 8192: "/c8k", 16384: "/c16k"}
  runs = study.grid_runs("/unused", _grid("gin/study/ablations_all.gin", data_dirs=data_dirs))
  # Table 5: 4 archs × 4 shapes; Table 6 beyond them: 2K, 4K, 16K for the linear models, 16K for LLaMA.
  assert len(runs) == 16 + 3 * 3 + 1 and len({run.name for run in runs}) == len(runs)
  by_name = {run.name: run for run in runs}
  assert by_name["tnl_2k"].bindings == ("trainer.train.run_name = 'tnl_2k'", "DATA_DIR = '/c2k'")
  assert "DATA_DIR = '/c8k'" in by_name["llama_1792x24"].bindings
  _, planned = study.milestone_counts(runs, [])
  assert planned == 26 * 57  # every ablation run keeps the main runs' 57 milestones
  context = study.grid_runs("/unused", _grid("gin/study/ablations_context.gin"))
  assert {run.name for run in context if run.arch == "llama"} == {"llama_16k", "llama_1536x32"}
  mini = study.grid_runs("/unused", _grid("gin/study/ablation_mini.gin"))
  assert len(mini) == 10 and {run.arch for run in mini} == {"llama", "hgrn2"}


def test_grid_kinds_are_not_mixed():
  grid = study.StudyGrid(archs=("tnl",), experiments={"tnl_a": "gin/ablations/aspect/tnl_3072x8.gin"})
  with pytest.raises(ValueError, match="lists experiments and also archs"):
    study.grid_runs("/unused", grid)
  with pytest.raises(ValueError, match=r"experiments\['x'\] names gin file\(s\) that do not exist"):
    study.grid_runs("/unused", study.StudyGrid(experiments={"x": "gin/ablations/aspect/nope.gin"}))
  with pytest.raises(ValueError, match="needs either experiments"):
    study.grid_runs("/unused", study.StudyGrid())
  grid = _grid("gin/study/ablations_context.gin", data_dirs={2048: "/c2k", 8192: "/c8k"})
  with pytest.raises(ValueError, match=r"no dataset for run 'llama_16k'.s context 16384; it has \[2048, 8192\]"):
    study.grid_runs("/unused", grid)


def test_tables_group_runs_by_coordinates_and_keep_each_tasks_last_value():
  def rows(run, arch, d, layers, seq, step, task, metric, value):
    return {
      "run": run,
      "arch": arch,
      "size": "1b",
      "d_model": d,
      "num_layers": layers,
      "seq_len": seq,
      "ablation": None,
      "step": step,
      "task": task,
      "metric": metric,
      "value": value,
    }

  eval_rows = [
    rows("a", "tnl", 1536, 32, 8192, 10, "val_loss", "loss", 3.0),
    rows("a", "tnl", 1536, 32, 8192, 20, "val_loss", "loss", 2.5),
    rows("a", "tnl", 1536, 32, 8192, 20, "csr", "average", 50.0),
    rows("b", "tnl", 3072, 8, 8192, 20, "val_loss", "loss", 2.7),
    rows("c", "tnl", 1536, 32, 2048, 20, "val_loss", "loss", 2.6),
    rows("d", "llama", 1536, 32, 8192, 20, "val_loss", "loss", 2.4),
  ]  # one LLaMA run: in neither table
  tables = ablation_tables.build_tables(eval_rows)
  assert [(r["run"], r["scores"]) for r in tables["aspect"][0]["rows"]] == [
    ("a", {"val loss": 2.5, "CSR": 50.0}),
    ("b", {"val loss": 2.7}),
  ]
  assert [r["run"] for r in tables["context"][0]["rows"]] == ["c", "a"]  # by context, shortest first
  assert "| TNL | 2K | — |" in ablation_tables.format_table(tables["context"][0]["rows"], "context")
  with pytest.raises(ValueError, match="lacks the run coordinate column"):
    ablation_tables.build_tables([{k: v for k, v in eval_rows[0].items() if k != "d_model"}])
