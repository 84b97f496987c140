"""`python -m lsm_jax.study` on a CPU micro grid: trains, evaluates every milestone, fits, writes the report."""
import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_size(path, name, layers, d_model):
  path.write_text(f"""from __gin__ import dynamic_registration
from lsm_jax.models import configs
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
def test_micro_grid_produces_a_report_with_fits(tmp_path):
  write_size(tmp_path / "xs.gin", "xs", 1, 32)
  write_size(tmp_path / "s.gin", "s", 2, 64)
  out = tmp_path / "study"
  command = [
      sys.executable, "-m", "lsm_jax.study", "--gin_file=gin/study/mini/grid.gin", f"--out={out}",
      "--gin.study.StudyGrid.archs=('tnl', 'hgrn2')",
      f"--gin.study.StudyGrid.size_files={{'xs': '{tmp_path / 'xs.gin'}', 's': '{tmp_path / 's.gin'}'}}",
      "--gin.TRAIN_STEPS=12", "--gin.SEQ_LEN=64", "--gin.GLOBAL_BATCH_SIZE=8",
      "--gin.trainer.train.num_milestones=4", "--gin.trainer.train.checkpoint_every_steps=6",
      "--gin.optim.OptimizerConfig.warmup_steps=2", "--gin.optim.OptimizerConfig.learning_rate=3e-3"]
  # Cheaper XLA compilation: the runs are tiny, so compile time dominates.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
         "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]

  runs = sorted(p.name for p in (out / "runs").iterdir())
  assert runs == ["hgrn2_s", "hgrn2_xs", "tnl_s", "tnl_xs"]
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
