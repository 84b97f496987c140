"""Multi-process training on CPU: two `python -m lsm_jax.train` processes with 4 fake devices each, joined by
jax.distributed (gloo CPU collectives), train the tiny smoke LLaMA on one fsdp=8 mesh spanning both, and must
reproduce one process with 8 devices: same losses, gradient norms, validation losses and checkpoints.

The multi-process run is split in two launches (steps 1-2, then 3-4 resumed from the step-2 checkpoint), so the
Orbax save of shards from both processes into one MODEL_DIR and the collective restore are both exercised.
"""

import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from conftest import FAST_CPU_COMPILE

from lsm_jax import checkpoint, metrics

pytestmark = pytest.mark.slow  # five training processes; about 80 s of CPU time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMEOUT_S = 180
# The smoke LLaMA (2 layers, d=64, byte vocabulary) on 16 × 32 tokens per step; validation and a resume
# checkpoint every 2 steps, float32 milestones so they compare at float32 precision.
OVERRIDES = (
  "--gin_file=gin/smoke/llama.gin",
  "--gin.SEQ_LEN=32",
  "--gin.EVAL_EVERY_STEPS=2",
  "--gin.trainer.train.eval_batches=1",
  "--gin.trainer.train.checkpoint_every_steps=2",
  "--gin.trainer.train.num_milestones=3",
  "--gin.trainer.train.milestone_dtype='float32'",
  "--gin.trainer.train.sample_tokens=2",
  "--gin.trainer.train.progress_bar=False",
  "--gin.trainer.train.enable_tensorboard=False",
)


def _environment(num_devices, cache_dir):
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    # Cheaper XLA:CPU code generation: compilation dominates this test; both runs use the same flags.
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {FAST_CPU_COMPILE}",
    # Cross-process collectives on CPU: gloo is jax 0.10's default; explicit, as older releases defaulted to none.
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    # The second multi-process launch reuses the first one's executables.
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )


def _start(model_dir, train_steps, cache_dir, log_dir, *, num_processes, sample=False):
  """Starts the CLI in `num_processes` processes (8 devices in all); returns [(process, log path)]."""
  port = portpicker.pick_unused_port()
  launched = []
  for process_id in range(num_processes):
    command = [
      sys.executable,
      "-m",
      "lsm_jax.train",
      *OVERRIDES,
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={train_steps}",
    ]
    if not sample:  # two jit compilations fewer; the final multi-process launch covers the sample
      command.append("--gin.trainer.train.sample_prompt=None")
    if num_processes > 1:
      command += [
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
      ]
    log_path = os.path.join(log_dir, f"{os.path.basename(model_dir)}-{train_steps}-{process_id}.log")
    with open(log_path, "w") as log:
      launched.append(
        (
          subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=_environment(8 // num_processes, cache_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
          ),
          log_path,
        )
      )
  return launched


def _finish(launched):
  """Waits for every process; fails with every process's output unless all exit 0.

  A crashed process leaves its peers blocked in collectives or Orbax barriers (minutes of timeouts), so the first
  failure, or the deadline, kills the rest.
  """
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while time.monotonic() < deadline:
      exit_codes = [process.poll() for process, _ in launched]
      if all(code is not None for code in exit_codes) or any(code not in (None, 0) for code in exit_codes):
        break
      time.sleep(0.5)
  finally:
    for process, _ in launched:
      if process.poll() is None:
        process.kill()
        process.wait()
  outputs = []
  for _, log_path in launched:
    with open(log_path) as log:
      outputs.append(log.read())
  if any(process.returncode != 0 for process, _ in launched):
    report = "\n".join(
      f"===== {log_path} (exit {process.returncode}) =====\n{output[-6000:]}"
      for (process, log_path), output in zip(launched, outputs)
    )
    pytest.fail(f"training failed:\n{report}")
  return outputs


def _records(model_dir):
  return {record["step"]: record for record in metrics.read_metrics(model_dir)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  cache_dir, single_dir, multi_dir = root / "compilation_cache", str(root / "single"), str(root / "multi")
  # The reference and the first leg run side by side: much of a launch is single-threaded imports and waits
  # at cross-process barriers, so three processes use the two cores better than two.
  single = _start(single_dir, STEPS, cache_dir, root, num_processes=1)
  first_leg = _finish(_start(multi_dir, 2, cache_dir, root, num_processes=2) + single)[:2]
  second_leg = _finish(_start(multi_dir, STEPS, cache_dir, root, num_processes=2, sample=True))
  return single_dir, multi_dir, first_leg, second_leg


def test_two_processes_reproduce_one_process(runs):
  single_dir, multi_dir, first_leg, second_leg = runs
  for leg in (first_leg, second_leg):
    for process_id, output in enumerate(leg):
      assert f"jax.distributed: process {process_id} of 2" in output
  for output in second_leg:
    assert "resumed from step 2" in output
  single, multi = _records(single_dir), _records(multi_dir)
  # One line per step: only process 0 writes metrics.jsonl (the second launch appends steps 3-4).
  assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
  assert [step for step in multi if "val_loss" in multi[step]] == [2, 4]
  for step in range(1, STEPS + 1):
    # Same rows, same math; only the order of float32 sums differs (gloo's cross-process all-reduce versus
    # XLA's in-process one), a few ulps per step that Adam's normalised updates keep far below 1e-5 over 4
    # steps. A process reading the wrong rows moves the loss by ~1e-2.
    for key in ("loss", "grad_norm", "val_loss"):
      if key in single[step]:
        np.testing.assert_allclose(multi[step][key], single[step][key], rtol=1e-5, err_msg=f"{key} at step {step}")
    for key in ("learning_rate", "tokens_seen"):
      assert multi[step][key] == single[step][key], (key, step)
  # The greedy sample runs on the global mesh in both processes; only process 0 prints it.
  assert "sample (greedy, step 4)" in second_leg[0] and "sample (greedy" not in second_leg[1]


def test_checkpoints_written_by_two_processes_hold_every_shard(runs):
  single_dir, multi_dir, _, _ = runs
  # The first launch saves its schedule's milestones; the relaunch only those after the step it resumed from.
  multi_steps = checkpoint.milestone_schedule(2, 3) + [s for s in checkpoint.milestone_schedule(STEPS, 3) if s > 2]
  assert checkpoint.list_milestones(multi_dir) == sorted(set(multi_steps))
  resume_dir = os.path.join(multi_dir, "checkpoints", "resume")
  assert sorted(int(name) for name in os.listdir(resume_dir) if name.isdigit()) == [2, 4]
  assert checkpoint.read_run_metadata(multi_dir)["train_steps"] == STEPS
  assert os.path.exists(os.path.join(multi_dir, "config.gin"))
  # Each process saved the half of every fsdp-sharded parameter that lives on its devices: initialisation
  # must match bit for bit, the trained parameters to float32 reassociation noise.
  for step, tolerance in ((0, 0.0), (STEPS, 1e-5)):
    multi_params, _ = checkpoint.load_milestone(multi_dir, step)
    single_params, _ = checkpoint.load_milestone(single_dir, step)
    flat_multi, flat_single = (dict(_flatten(params)) for params in (multi_params, single_params))
    assert flat_multi.keys() == flat_single.keys()
    for name, value in flat_single.items():
      np.testing.assert_allclose(
        np.asarray(flat_multi[name]),
        np.asarray(value),
        rtol=tolerance,
        atol=tolerance,
        err_msg=f"{name} at step {step}",
      )


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value
