"""End-to-end training through gin, in-process, on the 8 fake CPU devices of tests/conftest.py.

One tiny LLaMA smoke run on one device with every feature on (validation, checkpoints, TensorBoard, sample),
then the same run on fsdp=8 and on data=2 × fsdp=4 with gradient accumulation: the losses must agree.
"""

import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from lsm_jax import checkpoint, metrics, train, trainer

SMOKE = "gin/smoke/llama.gin"
STEPS = 8
METRIC_FIELDS = {
  "step",
  "loss",
  "grad_norm",
  "learning_rate",
  "tokens_per_sec",
  "mfu",
  "wall_time_s",
  "step_tokens_per_sec",
  "step_mfu",
  "step_time_s",
  "timestamp",
  "tokens_seen",
  "compute_pflops_days",
}


def _train(model_dir, *bindings):
  gin.clear_config()
  try:
    train.parse_gin([SMOKE], [f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {STEPS}", *bindings])
    return gin.get_configurable(trainer.train)(config_text=gin.config_str())
  finally:
    gin.clear_config()


def _losses(model_dir):
  return np.array([record["loss"] for record in metrics.read_metrics(model_dir)])


def _check_learning_and_metrics(model_dir, summary):
  records = metrics.read_metrics(model_dir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for record in records:
    assert METRIC_FIELDS <= set(record), f"missing {METRIC_FIELDS - set(record)}"
  losses = _losses(model_dir)
  assert np.all(np.isfinite(losses))
  # ln(264) ≈ 5.58 at initialisation; 8 steps of warm-up to lr 2.1e-3 bring it down by well over 0.1 nats.
  assert abs(losses[0] - np.log(264)) < 0.1
  assert losses[-1] < losses[0] - 0.15
  assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
  # Accounting: tokens and compute grow linearly with the step (16 × 128 tokens per step).
  assert records[-1]["tokens_seen"] == STEPS * 16 * 128
  np.testing.assert_allclose(records[-1]["compute_pflops_days"], STEPS * records[0]["compute_pflops_days"], rtol=1e-9)
  # Step s runs at the warm-up LR of step s: 3e-3 × s / 10 (gin/smoke/llama.gin).
  np.testing.assert_allclose([r["learning_rate"] for r in records], [3e-3 * s / 10 for s in range(STEPS)], rtol=1e-5)
  assert summary["step"] == STEPS and summary["loss"] == pytest.approx(losses[-1])
  assert isinstance(summary["sample"], str) and summary["sample"].startswith("The ")


def _check_run_directory(model_dir):
  with open(os.path.join(model_dir, "config.gin")) as f:
    config_text = f.read()
  assert "trainer.train" in config_text and f"TRAIN_STEPS = {STEPS}" in config_text
  run_metadata = checkpoint.read_run_metadata(model_dir)
  assert (run_metadata["arch"], run_metadata["size"], run_metadata["seq_len"]) == ("llama", "smoke", 128)
  assert run_metadata["model_config"]["d_model"] == 64 and run_metadata["train_steps"] == STEPS
  assert checkpoint.list_milestones(model_dir) == checkpoint.milestone_schedule(STEPS, 8)
  assert os.listdir(os.path.join(model_dir, "tensorboard"))


@pytest.mark.slow  # three smoke training runs, each compiling for its own mesh
def test_smoke_run_then_the_same_run_on_sharded_meshes(tmp_path):
  # One test, not three, so pytest-xdist never trains the single-device reference twice.
  single_dir = str(tmp_path / "single")
  summary = _train(
    single_dir,
    "sharding.MeshConfig.num_devices = 1",
    "EVAL_EVERY_STEPS = 4",
    "trainer.train.checkpoint_every_steps = 4",
    "trainer.train.sample_tokens = 8",
  )
  _check_learning_and_metrics(single_dir, summary)
  _check_run_directory(single_dir)

  common = (
    "trainer.train.enable_checkpointing = False",
    "trainer.train.sample_prompt = None",
    "trainer.train.enable_tensorboard = False",
  )
  fsdp_dir = str(tmp_path / "fsdp8")
  _train(fsdp_dir, *common, "sharding.MeshConfig.fsdp = 8")
  data_fsdp_dir = str(tmp_path / "data2_fsdp4")
  # 1 row per shard per microbatch: 8-row microbatches, 2 accumulated per 16-row step; the loss runs over
  # 64-token chunks (the single-device run takes the whole 128 tokens at once).
  _train(
    data_fsdp_dir,
    *common,
    "sharding.MeshConfig.data = 2",
    "sharding.MeshConfig.fsdp = 4",
    "PER_SHARD_MICROBATCH_SIZE = 1",
    "trainer.train.loss_chunk_length = 64",
  )
  # Same data, same math; only the order of float32 reductions differs (per-shard partial sums, then the
  # cross-device and across-microbatch sums). That moves losses by a few ulps per step; Adam's normalised
  # update keeps the trajectories within 1e-5 relative over 8 steps.
  single_device_losses = _losses(single_dir)
  np.testing.assert_allclose(_losses(fsdp_dir), single_device_losses, rtol=1e-5)
  np.testing.assert_allclose(_losses(data_fsdp_dir), single_device_losses, rtol=1e-5)


def _fail_if_called(*args, **kwargs):
  raise AssertionError("compilation or model construction started before the configuration was validated")


@pytest.mark.parametrize(
  "bindings, message",
  [
    (["GLOBAL_BATCH_SIZE = 12"], r"global_batch_size 12 is not divisible by data × fsdp = 1 × 8 = 8 batch shards"),
    (
      ["PER_SHARD_MICROBATCH_SIZE = 3"],
      r"global_batch_size 16 is not a multiple of the microbatch: per_shard_microbatch_size 3 × 8 batch shards",
    ),
    (["sharding.MeshConfig.data = 3"], r"needs a multiple of 3 devices, but there are 8"),
  ],
)
def test_bad_numbers_fail_before_compilation(tmp_path, monkeypatch, bindings, message):
  import lsm_jax.models

  monkeypatch.setattr(jax, "jit", _fail_if_called)
  monkeypatch.setattr(lsm_jax.models, "build_model", _fail_if_called)
  with pytest.raises(ValueError, match=message):
    _train(str(tmp_path / "run"), *bindings)


def test_cli_reports_a_missing_macro_and_a_misspelled_binding(tmp_path):
  command = [sys.executable, "-m", "lsm_jax.train", f"--gin_file={SMOKE}"]
  missing = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=train.REPO_ROOT)
  assert missing.returncode != 0
  assert "MODEL_DIR/macro.value set to `%gin.REQUIRED` but not subsequently overridden" in missing.stderr
  misspelled = subprocess.run(
    [*command, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.trainer.train.eval_batchez=2"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=train.REPO_ROOT,
  )
  assert misspelled.returncode != 0 and "eval_batchez" in misspelled.stderr
  assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


def test_gin_dot_flags_become_bindings():
  assert train.rewrite_gin_args(["prog", "--gin.MODEL_DIR='/tmp/x'", "--gin.trainer.train.seed=3", "--gin_file=a"]) == [
    "prog",
    "--gin_bindings=MODEL_DIR = '/tmp/x'",
    "--gin_bindings=trainer.train.seed = 3",
    "--gin_file=a",
  ]
  with pytest.raises(ValueError, match="--gin.NAME=VALUE"):
    train.rewrite_gin_args(["--gin.MODEL_DIR"])


def test_multiprocess_detection_reads_the_launchers_environment():
  assert not train.multiprocess_requested({})
  assert not train.multiprocess_requested({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
  assert train.multiprocess_requested({"SLURM_NTASKS": "4"})
  assert train.multiprocess_requested({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"})
  assert train.multiprocess_requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
