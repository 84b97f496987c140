"""End-to-end resume through lsm_jax.trainer on a tiny LLaMA (CPU): bit-exact resume, SIGKILL during an
asynchronous save, SIGTERM preemption, and restore onto another mesh and device count.

Every run is a fresh Python process executing `run_training` below (one configuration for all, so losses are
comparable); the processes share a persistent compilation cache, so only the first run on each mesh compiles.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_CPU_COMPILE

pytestmark = pytest.mark.slow  # four training processes; about 90 s of CPU time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def run_training(model_dir, train_steps, *, data=1, fsdp=-1, checkpoint_every_steps=2, seed=0):
  """The shared tiny run: LLaMA, 2 layers, d=64, byte tokenizer, 8 × 32 tokens per step, fp32 compute."""
  from lsm_jax import optim, sharding, trainer
  from lsm_jax.models import configs

  model_config = configs.ModelConfig(
    arch="llama",
    size="smoke",
    num_layers=2,
    d_model=64,
    num_heads=2,
    head_dim=32,
    ffn_dim=128,
    vocab_size=264,
    dtype="float32",
  )
  return trainer.train(
    model_dir=str(model_dir),
    model_config=model_config,
    train_steps=train_steps,
    seq_len=32,
    global_batch_size=8,
    data_dir="embedded:bytes",
    seed=seed,
    mesh_config=sharding.MeshConfig(data=data, fsdp=fsdp),
    optimizer=optim.OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
    checkpoint_every_steps=checkpoint_every_steps,
    max_checkpoints_to_keep=2,
    num_milestones=4,
    sample_prompt=None,
    progress_bar=False,
    enable_tensorboard=False,
  )


# Runs in the child: optionally holds resume saves from a step on at their commit (array data written to the
# temporary directory, the rename to the step directory not yet done) and drops a marker file, so the test can
# SIGKILL there. Orbax commits in its checkpointer's background thread, through `atomicity.on_commit_callback`
# (a coroutine in newer versions, a plain function in older ones).
_CHILD_SCRIPT = """
import inspect, json, os, sys, time
sys.path.insert(0, {tests_dir!r})
options = json.loads(sys.argv[1])
if options["hold_save_from_step"] is not None:
  from orbax.checkpoint._src.path import atomicity
  original_commit = atomicity.on_commit_callback
  def hold(tmp_dir):
    final = tmp_dir.get_final()
    if final.parent.name == "resume" and int(final.name) >= options["hold_save_from_step"]:
      open(options["marker"], "w").write(final.name)
      time.sleep(600)
  if inspect.iscoroutinefunction(original_commit):
    async def held_commit(tmp_dir, **kwargs):
      hold(tmp_dir)
      return await original_commit(tmp_dir, **kwargs)
  else:
    def held_commit(tmp_dir, **kwargs):
      hold(tmp_dir)
      return original_commit(tmp_dir, **kwargs)
  atomicity.on_commit_callback = held_commit
from absl import logging
logging.set_verbosity(logging.INFO)  # the trainer logs "resumed from step N" and the preemption at INFO/WARNING
import test_resume
test_resume.run_training(options["model_dir"], options["train_steps"], data=options["data"], fsdp=options["fsdp"],
                         checkpoint_every_steps=options["checkpoint_every_steps"])
print("training returned", flush=True)
"""


def start_run(
  model_dir,
  train_steps,
  cache_dir,
  *,
  num_devices=8,
  data=1,
  fsdp=-1,
  checkpoint_every_steps=2,
  hold_save_from_step=None,
):
  options = {
    "model_dir": str(model_dir),
    "train_steps": train_steps,
    "data": data,
    "fsdp": fsdp,
    "checkpoint_every_steps": checkpoint_every_steps,
    "hold_save_from_step": hold_save_from_step,
    "marker": str(model_dir) + ".held",
  }
  environment = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {FAST_CPU_COMPILE}",
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )
  return subprocess.Popen(
    [sys.executable, "-c", _CHILD_SCRIPT.format(tests_dir=TESTS_DIR), json.dumps(options)],
    cwd=REPO_ROOT,
    env=environment,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def run(model_dir, train_steps, cache_dir, **kwargs):
  process = start_run(model_dir, train_steps, cache_dir, **kwargs)
  output, _ = process.communicate(timeout=400)
  assert process.returncode == 0 and "training returned" in output, output[-5000:]
  return output


def read_metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as handle:
    return {record["step"]: record for record in map(json.loads, handle)}


def resume_steps(model_dir):
  return sorted(int(name) for name in os.listdir(os.path.join(model_dir, "checkpoints", "resume")) if name.isdigit())


def wait_for(predicate, process, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      raise AssertionError(f"training exited with {process.returncode} before {what}:\n{process.stdout.read()}")
    time.sleep(0.2)
  process.kill()
  raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 20-step run and a 10-step run of the same configuration (8 devices, fsdp=8)."""
  root = tmp_path_factory.mktemp("resume")
  run(root / "uninterrupted", 20, root / "compilation_cache")
  run(root / "first_ten", 10, root / "compilation_cache")
  return root


def copy_of_first_ten(runs, tmp_path, name):
  model_dir = tmp_path / name
  shutil.copytree(runs / "first_ten", model_dir)
  assert sorted(read_metrics(model_dir)) == list(range(1, 11)) and resume_steps(model_dir) == [8, 10]
  return model_dir


def test_resume_is_bit_identical_to_uninterrupted_run(runs, tmp_path):
  model_dir = copy_of_first_ten(runs, tmp_path, "resumed")
  output = run(model_dir, 20, runs / "compilation_cache")
  assert "resumed from step 10" in output
  resumed, uninterrupted = read_metrics(model_dir), read_metrics(runs / "uninterrupted")
  assert sorted(resumed) == list(range(1, 21))
  for step in range(11, 21):
    for key in ("loss", "grad_norm", "learning_rate", "tokens_seen"):
      assert resumed[step][key] == uninterrupted[step][key], (step, key)


def test_restore_on_another_mesh_gives_the_same_loss(runs, tmp_path):
  model_dir = copy_of_first_ten(runs, tmp_path, "data2_fsdp4")
  output = run(model_dir, 12, runs / "compilation_cache", data=2, fsdp=4)
  assert "resumed from step 10" in output
  resharded, uninterrupted = read_metrics(model_dir), read_metrics(runs / "uninterrupted")
  for step in (11, 12):
    np.testing.assert_allclose(resharded[step]["loss"], uninterrupted[step]["loss"], rtol=1e-5)


def test_sigkill_during_async_save_then_rerun_on_one_device(runs, tmp_path):
  model_dir = copy_of_first_ten(runs, tmp_path, "killed")
  process = start_run(model_dir, 40, runs / "compilation_cache", hold_save_from_step=14)
  marker = str(model_dir) + ".held"
  wait_for(lambda: os.path.exists(marker), process, 300, "the asynchronous save of step 14")
  os.kill(process.pid, signal.SIGKILL)
  process.wait(timeout=30)
  assert process.returncode == -signal.SIGKILL
  assert resume_steps(model_dir) == [10, 12]  # step 14 never committed ...
  resume_dir = model_dir / "checkpoints" / "resume"
  assert [name for name in os.listdir(resume_dir) if name.startswith("14.")]  # ... though its data was written

  # The rerun, on one device instead of eight, resumes from step 12 (the last complete checkpoint).
  output = run(model_dir, 13, runs / "compilation_cache", num_devices=1)
  assert "resumed from step 12" in output
  np.testing.assert_allclose(
    read_metrics(model_dir)[13]["loss"], read_metrics(runs / "uninterrupted")[13]["loss"], rtol=1e-5
  )
  assert resume_steps(model_dir) == [12, 13]
  leftovers = [name for name in os.listdir(model_dir / "checkpoints" / "resume") if not name.isdigit()]
  assert not [name for name in leftovers if name.startswith("14")]  # the killed save's temporary data is gone


def test_sigterm_saves_and_exits_cleanly(runs, tmp_path):
  model_dir = copy_of_first_ten(runs, tmp_path, "preempted")
  # No interval saves after the resume: the only new checkpoint can come from the preemption.
  process = start_run(model_dir, 10_000, runs / "compilation_cache", checkpoint_every_steps=1000)
  wait_for(lambda: max(read_metrics(model_dir)) >= 13, process, 300, "three steps after the resume")
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-5000:]
  assert "preemption signal at step" in output and "training returned" in output
  last_step = max(read_metrics(model_dir))
  assert last_step < 10_000 and resume_steps(model_dir) == [10, last_step]
  assert os.path.isfile(model_dir / "checkpoints" / "resume" / str(last_step) / "_CHECKPOINT_METADATA")


def test_rerunning_a_finished_run_restores_without_compiling(runs, tmp_path, monkeypatch):
  """A study resumes its grid by rerunning every run: a finished one must return at once, without compiling
  the training step (seconds on a CPU, more for a big model) and without writing anything."""
  from lsm_jax import trainer

  model_dir = copy_of_first_ten(runs, tmp_path, "finished")
  before = read_metrics(model_dir)

  def no_compile(self):
    raise AssertionError("compiled the training step of a finished run")

  monkeypatch.setattr(trainer.TrainProgram, "lower_train_step", no_compile)
  summary = run_training(model_dir, 10)
  assert summary["step"] == 10
  assert read_metrics(model_dir) == before and resume_steps(model_dir) == [8, 10]


# --- integrity, roll back, one trainer per directory (docs/reliability.md) -----------------------------------------


def assert_steps_match_uninterrupted(model_dir, runs, steps):
  resumed, uninterrupted = read_metrics(model_dir), read_metrics(runs / "uninterrupted")
  for step in steps:
    for key in ("loss", "grad_norm", "learning_rate", "tokens_seen"):
      assert resumed[step][key] == uninterrupted[step][key], (step, key)


def quarantined(model_dir):
  return sorted(name.rsplit("-", 1)[0] for name in os.listdir(model_dir / "checkpoints" / "quarantine"))


def test_flipped_bit_in_resume_checkpoint_is_quarantined_and_the_run_ends_bit_identical(runs, tmp_path):
  from test_checkpoint import flip_one_bit, largest_data_file

  model_dir = copy_of_first_ten(runs, tmp_path, "flipped")
  flip_one_bit(largest_data_file(str(model_dir / "checkpoints" / "resume" / "10"), "state"))
  output = run(model_dir, 20, runs / "compilation_cache")
  assert "resume/10: file state/" in output and "fails its checksum" in output
  assert "resumed from step 8" in output
  assert quarantined(model_dir) == ["resume-10"]
  assert_steps_match_uninterrupted(model_dir, runs, range(9, 21))


def poison_resume_checkpoint(model_dir, step):
  """Rewrites resume checkpoint `step` with NaN parameters and a matching manifest: intact files, a bad state."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from lsm_jax import checkpoint

  step_dir = model_dir / "checkpoints" / "resume" / str(step)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(step_dir / "state")
  state["params"] = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), state["params"])
  shutil.rmtree(step_dir / "state")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(step_dir / "state", state)
  checkpoint.write_manifest(step_dir)


def test_nan_right_after_a_restore_rolls_back_once(runs, tmp_path):
  model_dir = copy_of_first_ten(runs, tmp_path, "nan_once")
  poison_resume_checkpoint(model_dir, 10)
  output = run(model_dir, 20, runs / "compilation_cache")
  assert "the loss became nan at step 11, 1 step(s) after restoring resume checkpoint 10" in output
  assert "rolling back once, to resume checkpoint 8" in output and "resumed from step 8" in output
  assert quarantined(model_dir) == ["resume-10"]
  assert_steps_match_uninterrupted(model_dir, runs, range(9, 21))

  # Two bad checkpoints in a row: one roll back, then a clear stop (nothing trains from NaN).
  model_dir = copy_of_first_ten(runs, tmp_path, "nan_twice")
  poison_resume_checkpoint(model_dir, 8)
  poison_resume_checkpoint(model_dir, 10)
  process = start_run(model_dir, 20, runs / "compilation_cache")
  output, _ = process.communicate(timeout=400)
  assert process.returncode != 0
  assert (
    "NonFiniteLossError: the loss became nan at step 9, 1 step(s) after restoring resume checkpoint 8, after "
    "rolling back once from resume checkpoint 10; stopping"
  ) in output
  assert quarantined(model_dir) == ["resume-10"] and resume_steps(model_dir) == [8]


def test_second_trainer_is_refused_while_the_first_finishes_unharmed(runs, tmp_path):
  from lsm_jax import checkpoint, errors

  model_dir = copy_of_first_ten(runs, tmp_path, "contended")
  first = start_run(model_dir, 20, runs / "compilation_cache")
  wait_for(lambda: (model_dir / checkpoint.LOCK_FILE).exists(), first, 300, "the first trainer's lock")
  with pytest.raises(errors.RunLockedError, match=rf"in use by another trainer \(pid {first.pid} on host"):
    run_training(model_dir, 30)  # another TRAIN_STEPS: it would rewrite the metadata and the milestones
  output, _ = first.communicate(timeout=400)
  assert first.returncode == 0 and "resumed from step 10" in output, output[-5000:]
  assert_steps_match_uninterrupted(model_dir, runs, range(11, 21))
  assert json.loads((model_dir / "run_metadata.json").read_text())["train_steps"] == 20  # not the refused 30
  assert not (model_dir / checkpoint.LOCK_FILE).exists()


def test_flipped_bit_in_a_milestone_stops_evaluation_and_export_with_one_clear_error(runs, tmp_path):
  from test_checkpoint import flip_one_bit, largest_data_file

  from lsm_jax import checkpoint
  from lsm_jax.evaluate import sweep

  model_dir = copy_of_first_ten(runs, tmp_path, "milestone")
  assert checkpoint.list_milestones(str(model_dir)) == [0, 1, 8, 10]
  flip_one_bit(largest_data_file(str(model_dir / "checkpoints" / "milestones" / "8"), "params"))
  output = tmp_path / "eval" / "results.jsonl"
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"milestones/8: file params/.* fails its checksum"):
    sweep.evaluate_run(str(model_dir), "val_loss", str(output), val_max_batches=1, progress=False)
  rows = sweep.read_table(str(output))
  assert sorted({row["step"] for row in rows}) == [0, 1]  # the milestones before it; none for 8
  assert all(np.isfinite(row["value"]) for row in rows)

  command = [
    sys.executable,
    "-m",
    "lsm_jax.export",
    f"--checkpoint={model_dir}",
    f"--out={tmp_path / 'hf'}",
    "--step=8",
    "--noverify",
  ]
  export = subprocess.run(
    command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu")
  )
  assert export.returncode == 2 and "Traceback" not in export.stderr
  assert "milestones/8: file params/" in export.stderr and "fails its checksum" in export.stderr
  assert "intact milestones nearest to step 8: 1 and 10 (the run's milestones: 0, 1, 8, 10)" in export.stderr
  assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_changed_seed_is_refused_before_anything_is_rewritten(runs, tmp_path):
  from lsm_jax import errors

  model_dir = copy_of_first_ten(runs, tmp_path, "changed")
  before = {name: (model_dir / name).read_text() for name in ("run_metadata.json", "metrics.jsonl")}
  with pytest.raises(
    errors.ConfigChangeError,
    match=r"at step 10\) with a configuration that changes the run: "
    r"seed: 0 -> 1\. Restore the original settings",
  ):
    run_training(model_dir, 20, seed=1)
  assert {name: (model_dir / name).read_text() for name in before} == before
  assert resume_steps(model_dir) == [8, 10] and not os.path.exists(model_dir / "run.lock")
