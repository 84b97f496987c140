"""`python -m lsm_jax.study --parallel=2` on a CPU micro grid: two worker processes train and evaluate every
milestone, the main process fits what finished and writes the report, a failed run is named with its log; a
rerun skips the finished runs."""

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import FAST_CPU_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_size(path, name, layers, d_model, extra=""):
  path.write_text(f"""from __gin__ import dynamic_registration
from lsm_jax import trainer
from lsm_jax.models import configs
{extra}
configs.ModelConfig:
  size = '{name}'
  num_layers = {layers}
  d_model = {d_model}
  num_heads = 2
  head_dim = {d_model // 2}
  ffn_dim = {2 * d_model}
  dtype = 'float32'
""")


@pytest.mark.slow
def test_parallel_micro_grid_produces_a_report_with_fits_and_resumes(tmp_path):
  write_size(tmp_path / "xs.gin", "xs", 1, 32)
  write_size(tmp_path / "s.gin", "s", 2, 64)
  # A size whose runs fail in their workers (the trainer rejects the setting before compiling anything).
  write_size(tmp_path / "bad.gin", "bad", 1, 32, extra="trainer.train.peak_flops_per_device = -1.0")
  out = tmp_path / "study"
  size_files = ", ".join(f"'{size}': '{tmp_path / size}.gin'" for size in ("xs", "s", "bad"))
  command = [
    sys.executable,
    "-m",
    "lsm_jax.study",
    "--gin_file=gin/study/mini/grid.gin",
    f"--out={out}",
    "--parallel=2",
    "--gin.study.StudyGrid.archs=('tnl', 'hgrn2')",
    "--gin.study.StudyGrid.val_max_batches=4",
    f"--gin.study.StudyGrid.size_files={{{size_files}}}",
    "--gin.TRAIN_STEPS=12",
    "--gin.SEQ_LEN=64",
    "--gin.GLOBAL_BATCH_SIZE=8",
    "--gin.trainer.train.num_milestones=4",
    "--gin.trainer.train.checkpoint_every_steps=6",
    "--gin.trainer.train.log_every_steps=1",
    "--gin.optim.OptimizerConfig.warmup_steps=2",
    "--gin.optim.OptimizerConfig.learning_rate=3e-3",
  ]
  # Cheaper XLA compilation: the runs are tiny, so compile time dominates.
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_CPU_COMPILE}",
  }
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-4000:]
  for run in ("tnl_bad", "hgrn2_bad"):  # started twice, then named on stderr with their log tails (the cause)
    assert f"- {run}: worker exited with status 1 in each of 2 attempts" in result.stderr
    assert (out / "runs" / run / "log.txt").read_text().count("$ ") == 2
  assert result.stderr.count("peak FLOP/s override must be positive, got -1.0") >= 2

  runs = sorted(p.name for p in (out / "runs").iterdir())
  assert runs == ["hgrn2_bad", "hgrn2_s", "hgrn2_xs", "tnl_bad", "tnl_s", "tnl_xs"]
  for run in ["hgrn2_s", "hgrn2_xs", "tnl_s", "tnl_xs"]:  # each trained in its own worker, logging to its own file
    assert "study: evaluating" in (out / "runs" / run / "log.txt").read_text()
    assert json.loads((out / "runs" / run / "study_run.json").read_text())["run"] == run
  with open(out / "eval.csv") as f:
    rows = list(csv.DictReader(f))
  # Every milestone of every run is evaluated: 4 milestones (0, 1, 2|4 …, 12) × 4 runs.
  evaluated = {(r["arch"], r["size"], int(r["step"])) for r in rows if r["task"] == "val_loss"}
  assert len(evaluated) == 16
  fits = json.loads((out / "fits.json").read_text())
  assert set(fits["fits"]) == {"tnl", "hgrn2"}
  for arch_fit in fits["fits"].values():
    assert arch_fit["loss"]["exponent"] < 0  # loss falls with compute
  report = (out / "report.md").read_text()
  assert "Fitted exponents beside the paper's Table 3" in report
  for arch in ("tnl", "hgrn2"):
    assert f"| {arch} | -0." in report  # the fitted loss exponent is negative: loss falls with compute
  assert (out / "plots" / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "2 worker processes" in report and "wall time:" in report
  assert "## Failed runs" in report and "### tnl_bad" in report

  # A rerun skips the finished runs (only the failing ones start again); the same fits come back.
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-4000:]
  assert "0 run(s) trained and evaluated, 4 finished earlier and skipped" in (out / "report.md").read_text()
  assert json.loads((out / "fits.json").read_text()) == fits


def test_runs_are_scheduled_largest_first_by_their_size_files():
  from lsm_jax import study

  sizes = ("1m", "3m", "10m", "25m", "50m")
  grid = study.StudyGrid(
    archs=("llama", "hgrn2"),
    run_file="gin/study/mini/run.gin",
    size_files={size: f"gin/study/mini/sizes/{size}.gin" for size in sizes},
  )
  runs = study.grid_runs("/unused", grid)
  costs = {run.name: study.run_cost(run) for run in runs}
  # The mini sizes are named after their non-embedding parameter counts (Appendix A.1, within ~10%).
  for name, cost in costs.items():
    nominal = float(name.split("_")[1][:-1]) * 1e6
    assert 0.8 * nominal < cost < 1.15 * nominal, (name, cost)
  # The workers' queue, against the sizes the run names state.
  nominal = [float(run.name.split("_")[1][:-1]) for run in study.largest_first(runs, costs)]
  assert nominal == sorted(nominal, reverse=True) and len(nominal) == len(runs)


def test_a_misspelled_run_binding_stops_the_study_before_any_run_naming_the_run():
  from lsm_jax import study

  grid = study.StudyGrid(
    archs=("llama", "hgrn2"),
    run_file="gin/study/mini/run.gin",
    size_files={size: f"gin/study/mini/sizes/{size}.gin" for size in ("1m", "3m")},
    run_bindings=("trainer.train.num_milestone = 4",),
  )
  with pytest.raises(ValueError, match=r"run llama_1m of the study grid: .*num_milestone"):
    study.grid_runs("/unused", grid)
  valid = dataclasses.replace(grid, run_bindings=("trainer.train.num_milestones = 4",))
  assert [run.name for run in study.grid_runs("/unused", valid)] == ["llama_1m", "llama_3m", "hgrn2_1m", "hgrn2_3m"]
