"""The launch scripts' --dry-run prints the exact commands they would run."""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu"
ARGS = [
  "--name=lsm-test",
  "--zone=us-east5-a",
  "--accelerator=v5p-128",
  "--gin_file=gin/hgrn2_7b.gin",
  "--bucket=gs://bucket/lsm",
  "--data_dir=gs://bucket/data",
  "--dry-run",
]


def run_script(script, *args, env=None):
  return subprocess.run(
    ["bash", str(script), *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, **(env or {})},
    timeout=60,
  )


def test_run_dry_run_launches_the_gin_file_on_every_worker():
  result = run_script(TPU / "run.sh", *ARGS)
  assert result.returncode == 0, result.stderr
  (line,) = result.stdout.strip().splitlines()
  assert line.startswith("gcloud compute tpus tpu-vm ssh lsm-test --zone=us-east5-a --worker=all")
  assert "python3\\ -m\\ lsm_jax.train\\ --gin_file=gin/hgrn2_7b.gin" in line
  assert "gs://bucket/lsm/hgrn2_7b" in line and "--gin.DATA_DIR" in line and "gs://bucket/data" in line
  # v5p-specific libtpu flags come from flags.sh.
  assert "xla_enable_async_reduce_scatter=true" in line


def test_run_passes_gin_overrides_through():
  result = run_script(TPU / "run.sh", *ARGS, "--gin.TRAIN_STEPS=1000")
  assert result.returncode == 0, result.stderr
  assert "--gin.TRAIN_STEPS=1000" in result.stdout


def test_create_setup_status_stop_dry_runs():
  create = run_script(TPU / "create.sh", *ARGS, "--capacity=best-effort")
  assert create.returncode == 0, create.stderr
  assert (
    "gcloud alpha compute tpus queued-resources create lsm-test --zone=us-east5-a --node-id=lsm-test "
    "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --best-effort"
  ) in create.stdout
  setup = run_script(TPU / "setup.sh", *ARGS)
  assert setup.returncode == 0, setup.stderr
  lines = setup.stdout.strip().splitlines()
  assert lines[0].startswith("tar -czf")
  assert "--worker=all" in lines[1] and "scp" in lines[1]
  assert "--worker=all" in lines[2] and "pip\\ install" in lines[2]
  status = run_script(TPU / "status.sh", *ARGS)
  assert "gs://bucket/lsm/hgrn2_7b/metrics.jsonl" in status.stdout
  stop = run_script(TPU / "stop.sh", *ARGS)
  assert "queued-resources delete lsm-test" in stop.stdout


@pytest.mark.parametrize(
  "bad_flag, message",
  [
    ("--gin_file=gin/nope.gin", "does not exist"),
    ("--bucket=/local/path", "must start with gs://"),
    ("--accelerator=v9-8", "unknown accelerator type"),
    ("--capacity=free", "valid: spot"),
    ("--frobnicate", "unknown flag"),
    ("--data_dir=", "--data_dir is required"),
  ],
)
def test_bad_flags_are_refused_with_a_clear_message(bad_flag, message):
  args = [a for a in ARGS if not a.startswith(bad_flag.split("=")[0] + "=")] + [bad_flag]
  result = run_script(TPU / "run.sh", *args)
  assert result.returncode != 0
  assert message in result.stderr


def test_slurm_example_dry_run():
  result = run_script(
    REPO / "launch" / "gpu" / "slurm_multinode.sbatch",
    "gin/hgrn2_7b.gin",
    "/shared/runs/h",
    "/shared/data",
    "--gin.TRAIN_STEPS=10",
    env={"LSM_DRY_RUN": "1"},
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == (
    "srun --kill-on-bad-exit=1 python3 -m lsm_jax.train "
    "--gin_file=gin/hgrn2_7b.gin --gin.MODEL_DIR='/shared/runs/h' "
    "--gin.DATA_DIR='/shared/data' --gin.TRAIN_STEPS=10"
  )
