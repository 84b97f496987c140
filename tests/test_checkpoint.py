"""lsm_jax.checkpoint on a synthetic train state (params dict + optax AdamW state + step + rng), 8 fake CPU devices."""

import glob
import json
import math
import os
import signal
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsm_jax import checkpoint

# Pythia's published schedule (GPT-NeoX config: extra-save-iters plus checkpoint-factor 1000 to 143,000).
PYTHIA_STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 143_001, 1000))

RUN_METADATA = {
  "arch": "tnl",
  "size": "70m",
  "model_config": {"num_layers": 2, "d_model": 16},
  "tokenizer": "bytes",
  "seq_len": 32,
  "global_batch_size": 8,
  "train_steps": 12,
  "flops_per_step": 1.0e15,
}


def make_state(seed=0, sharding_for=None):
  """A train state shaped like the trainer's; `sharding_for(shape)` places each leaf."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {
    "embedder": {"embedding": jax.random.normal(keys[0], (64, 16))},
    "layers": {
      0: {"q_proj": {"kernel": jax.random.normal(keys[1], (16, 32))}},
      1: {"q_proj": {"kernel": jax.random.normal(keys[2], (16, 32))}},
    },
    "final_norm": {"scale": jnp.ones((16,))},
  }
  optimizer = optax.adamw(1e-2, weight_decay=0.1)
  opt_state = optimizer.init(params)
  grads = jax.tree.map(lambda leaf: jnp.cos(leaf) * 0.1, params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  state = {"params": params, "opt_state": opt_state, "step": jnp.int32(7), "rng": jax.random.key_data(keys[3])}
  if sharding_for is not None:
    state = jax.tree.map(lambda leaf: jax.device_put(leaf, sharding_for(leaf.shape)), state)
  return state


def fsdp_sharding(mesh, axes):
  """Shards the first dimension over `axes` when it divides evenly, else replicates (like logical rules)."""
  size = int(np.prod([mesh.shape[axis] for axis in axes]))
  return lambda shape: NamedSharding(mesh, PartitionSpec(axes) if shape and shape[0] % size == 0 else PartitionSpec())


def abstract_of(state, sharding_for):
  return jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(leaf.shape)), state
  )


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def make_checkpointer(model_dir, **overrides):
  arguments = dict(save_interval_steps=5, max_to_keep=2, milestone_steps=[0, 1, 2, 4, 8, 12], run_metadata=RUN_METADATA)
  arguments.update(overrides)
  return checkpoint.Checkpointer(str(model_dir), **arguments)


# --- milestone schedule -------------------------------------------------------------------------------------------


def test_schedule_reproduces_pythia():
  assert checkpoint.milestone_schedule(143_000, 154) == PYTHIA_STEPS


def test_schedule_paper_default_has_57_log_then_even_steps():
  total = -(-300_000_000_000 // 3_932_160)  # 76,294 steps cover 300B tokens
  steps = checkpoint.milestone_schedule(total)
  assert len(steps) == 57 and len(set(steps)) == 57
  assert steps[0] == 0 and steps[-1] == total and steps == sorted(steps)
  log_part = []
  while steps[1 + len(log_part)] == 2 ** len(log_part):
    log_part.append(steps[1 + len(log_part)])
  even_part = steps[1 + len(log_part) :]
  assert log_part == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
  assert log_part[-1] < even_part[0] <= 2 * log_part[-1]  # every power of two below the even spacing
  gaps = np.diff([0, *even_part])
  assert gaps.max() - gaps.min() <= 1
  assert 24 * len(steps) == 1368


@pytest.mark.parametrize("total_steps", [1, 2, 3, 10, 60, 100, 1000, 4097, 76_294])
@pytest.mark.parametrize("num_checkpoints", [2, 5, 6, 20, 57, 154])
def test_schedule_properties(total_steps, num_checkpoints):
  steps = checkpoint.milestone_schedule(total_steps, num_checkpoints)
  assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == total_steps
  assert len(steps) == min(num_checkpoints, 1 + math.isqrt(total_steps))  # short runs: at most 1 + isqrt(T)
  if len(steps) == total_steps + 1:
    return  # every step
  log_length = 0  # the log part: the leading run of powers of two
  while 1 + log_length < len(steps) - 1 and steps[1 + log_length] & (steps[1 + log_length] - 1) == 0:
    log_length += 1
  even_part = steps[1 + log_length :]
  if len(even_part) > 2:
    gaps = np.diff(even_part)
    assert gaps.max() - gaps.min() <= 1


def test_schedule_with_few_checkpoints_spreads_powers_of_two():
  # 6 milestones cannot hold 1, 2, ..., 32 below 60: the powers of two are thinned, 0 and 60 kept.
  steps = checkpoint.milestone_schedule(60, 6)
  assert len(steps) == 6 and steps[0] == 0 and steps[-1] == 60
  inner = steps[1:-1]
  assert all(s & (s - 1) == 0 for s in inner) and inner[0] == 1 and inner[-1] == 32


def test_schedule_rejects_bad_input():
  with pytest.raises(ValueError, match="total_steps"):
    checkpoint.milestone_schedule(-1)
  with pytest.raises(ValueError, match="num_checkpoints must be an int >= 2"):
    checkpoint.milestone_schedule(100, 1)
  with pytest.raises(ValueError, match="total_steps"):
    checkpoint.milestone_schedule(10.5)


# --- save / restore -----------------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_metadata_is_stored(tmp_path):
  (tmp_path / "config.gin").write_text("train.train_steps = 12\n")
  state = make_state()
  replicated = lambda shape: jax.sharding.SingleDeviceSharding(jax.devices()[0])
  checkpointer = make_checkpointer(tmp_path)
  checkpointer.save(5, state, metadata={"tokens_seen": 1280, "loss": np.float32(2.5)})
  checkpointer.close()

  checkpointer = make_checkpointer(tmp_path)
  restored, step = checkpointer.restore_latest(abstract_of(state, replicated))
  checkpointer.close()
  assert step == 5
  assert_trees_equal(restored, state)

  run_metadata = checkpoint.read_run_metadata(str(tmp_path))
  assert run_metadata["milestone_steps"] == [0, 1, 2, 4, 8, 12]
  assert run_metadata["arch"] == "tnl" and run_metadata["code_version"]
  step_metadata = json.loads((tmp_path / "checkpoints/resume/5/metadata/metadata").read_text())
  assert step_metadata["step"] == 5 and step_metadata["tokens_seen"] == 1280 and step_metadata["loss"] == 2.5
  assert step_metadata["compute_pflops_days"] == pytest.approx(5 * 1.0e15 / 8.64e19)
  assert step_metadata["gin_config"] == "train.train_steps = 12\n"
  assert step_metadata["arch"] == "tnl" and step_metadata["size"] == "70m"
  assert step_metadata["code_version"] == run_metadata["code_version"]


def test_restore_without_checkpoint_returns_none(tmp_path):
  checkpointer = make_checkpointer(tmp_path)
  state = make_state()
  single = lambda shape: jax.sharding.SingleDeviceSharding(jax.devices()[0])
  assert checkpointer.restore_latest(abstract_of(state, single)) is None
  with pytest.raises(ValueError, match="ShapeDtypeStruct carrying the current sharding"):
    checkpointer.restore_latest(jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), state))
  checkpointer.close()


@pytest.mark.parametrize("target", ["data2_fsdp4", "one_device"])
def test_resharded_restore(tmp_path, target):
  devices = np.array(jax.devices())
  assert devices.size == 8
  save_mesh = Mesh(devices.reshape(8), ("fsdp",))
  state = make_state(sharding_for=fsdp_sharding(save_mesh, ("fsdp",)))
  assert state["params"]["embedder"]["embedding"].sharding.spec == PartitionSpec(("fsdp",))
  checkpointer = make_checkpointer(tmp_path)
  checkpointer.save(10, state)
  checkpointer.close()

  if target == "data2_fsdp4":
    restore_mesh = Mesh(devices.reshape(2, 4), ("data", "fsdp"))
    sharding_for = fsdp_sharding(restore_mesh, ("fsdp",))
  else:
    restore_mesh = Mesh(devices[:1].reshape(1), ("fsdp",))
    sharding_for = fsdp_sharding(restore_mesh, ("fsdp",))
  checkpointer = make_checkpointer(tmp_path)
  restored, step = checkpointer.restore_latest(abstract_of(state, sharding_for))
  checkpointer.close()
  assert step == 10
  assert_trees_equal(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == sharding_for(leaf.shape)
  assert len(restored["params"]["embedder"]["embedding"].sharding.device_set) == restore_mesh.size


def _corrupt_data_files(step_dir):
  data_files = [
    f
    for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
    if os.path.isfile(f) and os.sep + "d" + os.sep in f
  ]
  assert data_files
  for path in data_files:
    with open(path, "wb") as handle:
      handle.write(b"not a checkpoint")


# A failed TensorStore read can leave an Orbax asyncio callback behind that fires after its loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_and_incomplete_checkpoints_are_skipped_with_warning(tmp_path):
  state = make_state()
  single = lambda shape: jax.sharding.SingleDeviceSharding(jax.devices()[0])
  checkpointer = make_checkpointer(tmp_path, max_to_keep=4)
  for step in (5, 10, 15, 20):
    checkpointer.save(step, jax.tree.map(lambda leaf: leaf + step if leaf.dtype == jnp.float32 else leaf, state))
  checkpointer.close()
  resume_dir = tmp_path / "checkpoints" / "resume"
  os.remove(resume_dir / "20" / "_CHECKPOINT_METADATA")  # a save that never finished
  _corrupt_data_files(str(resume_dir / "15"))  # damaged files

  checkpointer = make_checkpointer(tmp_path, max_to_keep=4)
  with pytest.warns(RuntimeWarning) as caught:
    restored, step = checkpointer.restore_latest(abstract_of(state, single))
  messages = [str(w.message) for w in caught]
  assert any(str(resume_dir / "20") in m and "never finished" in m for m in messages)
  assert any(str(resume_dir / "15") in m and "fails its checksum" in m for m in messages)
  assert step == 10
  np.testing.assert_array_equal(
    restored["params"]["final_norm"]["scale"], np.asarray(state["params"]["final_norm"]["scale"]) + 10
  )
  # The skipped ones are moved aside, so training can save those steps again.
  assert checkpointer.resume_steps() == [5, 10]
  assert len(glob.glob(str(tmp_path / "checkpoints" / "quarantine" / "resume-*"))) == 2
  checkpointer.save(15, state)
  checkpointer.wait_until_finished()
  assert checkpointer.resume_steps() == [5, 10, 15]
  checkpointer.close()


# A failed TensorStore read can leave an Orbax asyncio callback behind that fires after its loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_all_checkpoints_unrestorable_raises_instead_of_restarting(tmp_path):
  state = make_state()
  checkpointer = make_checkpointer(tmp_path)
  checkpointer.save(5, state)
  checkpointer.close()
  _corrupt_data_files(str(tmp_path / "checkpoints" / "resume" / "5"))
  checkpointer = make_checkpointer(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(checkpoint.UnrestorableCheckpointsError, match="none of the resume checkpoints"):
      checkpointer.restore_latest(abstract_of(state, lambda s: jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  checkpointer.close()
  assert os.path.isdir(tmp_path / "checkpoints" / "resume" / "5")  # nothing moved when nothing restored


def test_an_open_checkpointer_drops_only_the_event_loop_errors_left_by_a_failed_save(tmp_path, monkeypatch):
  # TensorStore writes that finish after Orbax closed a failed save's event loop raise "Event loop is closed" as
  # unraisable exceptions: they repeat the CheckpointSaveError. Other unraisable errors still reach the hook.
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  saver = make_checkpointer(tmp_path)
  try:
    for error in (RuntimeError("Event loop is closed"), RuntimeError("other"), ValueError("Event loop is closed")):
      sys.unraisablehook(
        types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=None)
      )
  finally:
    saver.close()
  assert [(type(a.exc_value), str(a.exc_value)) for a in reported] == [
    (RuntimeError, "other"),
    (ValueError, "Event loop is closed"),
  ]
  assert sys.unraisablehook == reported.append  # the previous hook is back once no Checkpointer is open


# --- milestones ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("milestone_dtype", ["bfloat16", "float32"])
def test_milestones_kept_resume_rotated_and_dtype(tmp_path, milestone_dtype):
  states = {}
  checkpointer = make_checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2, milestone_dtype=milestone_dtype)
  for step in range(13):
    states[step] = make_state(seed=step)
    checkpointer.save(step, states[step], force=step == 12, metadata={"tokens_seen": step * 256})
  checkpointer.wait_until_finished()
  assert checkpointer.resume_steps() == [10, 12]
  checkpointer.close()

  assert checkpoint.list_milestones(str(tmp_path)) == [0, 1, 2, 4, 8, 12]
  for step in (0, 4, 12):
    params, metadata = checkpoint.load_milestone(str(tmp_path), step)
    expected = jax.tree.map(lambda leaf: np.asarray(leaf.astype(milestone_dtype)), states[step]["params"])
    assert_trees_equal(params, expected)
    assert metadata["step"] == step and metadata["tokens_seen"] == step * 256 and metadata["dtype"] == milestone_dtype
  params32, _ = checkpoint.load_milestone(str(tmp_path), 8, dtype="float32")
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params32))
  np.testing.assert_array_equal(
    params32["layers"][1]["q_proj"]["kernel"],
    np.asarray(states[8]["params"]["layers"][1]["q_proj"]["kernel"].astype(milestone_dtype).astype(jnp.float32)),
  )
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  sharded, _ = checkpoint.load_milestone(str(tmp_path), 12, sharding=NamedSharding(mesh, PartitionSpec()))
  assert all(leaf.sharding == NamedSharding(mesh, PartitionSpec()) for leaf in jax.tree.leaves(sharded))
  per_leaf = jax.tree.map(lambda leaf: fsdp_sharding(mesh, ("fsdp",))(leaf.shape), states[12]["params"])
  sharded, _ = checkpoint.load_milestone(str(tmp_path), 12, sharding=per_leaf)
  assert sharded["embedder"]["embedding"].sharding.spec == PartitionSpec(("fsdp",))
  assert_trees_equal(sharded, jax.tree.map(lambda leaf: np.asarray(leaf.astype(milestone_dtype)), states[12]["params"]))
  with pytest.raises(ValueError, match="sharding must be one jax Sharding or a dict"):
    checkpoint.load_milestone(str(tmp_path), 12, sharding={"embedder": per_leaf["embedder"]})
  with pytest.raises(ValueError, match=r"no milestone at step 3 .*available steps: \[0, 1, 2, 4, 8, 12\]"):
    checkpoint.load_milestone(str(tmp_path), 3)
  with pytest.raises(ValueError, match="dtype must be"):
    checkpoint.load_milestone(str(tmp_path), 4, dtype="float16")


def test_incomplete_milestone_is_listed_with_warning_only(tmp_path):
  checkpointer = make_checkpointer(tmp_path)
  for step in (0, 1, 2):
    checkpointer.save(step, make_state(seed=step))
  checkpointer.close()
  os.remove(tmp_path / "checkpoints" / "milestones" / "1" / "_CHECKPOINT_METADATA")
  with pytest.warns(RuntimeWarning, match=r"milestones/1: .*never finished"):
    assert checkpoint.list_milestones(str(tmp_path)) == [0, 2]
  with pytest.raises(ValueError, match="incomplete"):
    checkpoint.load_milestone(str(tmp_path), 1)


def test_constructor_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="milestone_dtype must be one of"):
    make_checkpointer(tmp_path, milestone_dtype="float16")
  with pytest.raises(ValueError, match="save_interval_steps"):
    make_checkpointer(tmp_path, save_interval_steps=0)
  with pytest.raises(ValueError, match="milestone_steps"):
    make_checkpointer(tmp_path, milestone_steps=[-1])
  with pytest.raises(FileNotFoundError, match="run_metadata.json"):
    checkpoint.read_run_metadata(str(tmp_path / "missing"))


def test_sigterm_reaches_preemption_and_forces_a_save(tmp_path):
  checkpointer = make_checkpointer(tmp_path, save_interval_steps=100)
  state = make_state()
  checkpointer.save(3, state)
  assert not checkpointer.reached_preemption(3)
  os.kill(os.getpid(), signal.SIGTERM)
  assert checkpointer.reached_preemption(4)
  checkpointer.save(4, state)
  checkpointer.wait_until_finished()
  assert checkpointer.resume_steps() == [4]
  checkpointer.close()
  assert signal.getsignal(signal.SIGTERM) is not checkpointer._on_sigterm


# --- integrity manifests ------------------------------------------------------------------------------------------


def largest_data_file(step_dir, item):
  data_files = [
    f
    for f in glob.glob(os.path.join(step_dir, item, "**", "*"), recursive=True)
    if os.path.isfile(f) and os.sep + "d" + os.sep in f
  ]
  return max(data_files, key=os.path.getsize)


def flip_one_bit(path):
  """Flips the lowest bit of the middle byte: what bit rot or a bad copy does, undetectable by size."""
  with open(path, "r+b") as handle:
    handle.seek(os.path.getsize(path) // 2)
    byte = handle.read(1)[0]
    handle.seek(-1, os.SEEK_CUR)
    handle.write(bytes([byte ^ 1]))


@pytest.mark.parametrize("async_save", [True, False])
def test_manifest_lists_every_file_with_its_crc32(tmp_path, async_save):
  import zlib

  checkpointer = make_checkpointer(tmp_path, async_save=async_save)
  for step in (4, 5):  # a milestone, then a resume checkpoint
    checkpointer.save(step, make_state())
  checkpointer.close()
  for step_dir in (tmp_path / "checkpoints/resume/5", tmp_path / "checkpoints/milestones/4"):
    manifest = json.loads((step_dir / checkpoint.MANIFEST_FILE).read_text())
    on_disk = sorted(
      str(path.relative_to(step_dir))
      for path in step_dir.rglob("*")
      if path.is_file() and path.name != checkpoint.MANIFEST_FILE
    )
    assert sorted(manifest["files"]) == on_disk and any("ocdbt.process_0" in name for name in on_disk)
    for name, entry in manifest["files"].items():
      data = (step_dir / name).read_bytes()
      assert entry == {"size": len(data), "crc32": zlib.crc32(data)}
    assert checkpoint.verify_manifest(step_dir)


def test_one_bit_flip_in_resume_checkpoint_is_quarantined_and_previous_restored(tmp_path):
  state = make_state()
  single = lambda shape: jax.sharding.SingleDeviceSharding(jax.devices()[0])
  checkpointer = make_checkpointer(tmp_path)
  for step in (5, 10):
    checkpointer.save(step, jax.tree.map(lambda leaf: leaf + step if leaf.dtype == jnp.float32 else leaf, state))
  checkpointer.close()
  resume_dir = tmp_path / "checkpoints" / "resume"
  flip_one_bit(largest_data_file(str(resume_dir / "10"), "state"))

  checkpointer = make_checkpointer(tmp_path)
  with pytest.warns(RuntimeWarning) as caught:
    restored, step = checkpointer.restore_latest(abstract_of(state, single))
  messages = [str(w.message) for w in caught]
  assert any(str(resume_dir / "10") in m and "fails its checksum" in m for m in messages), messages
  assert any("moved checkpoint" in m and str(resume_dir / "10") in m for m in messages), messages
  assert step == 5
  assert_trees_equal(restored, jax.tree.map(lambda leaf: leaf + 5 if leaf.dtype == jnp.float32 else leaf, state))
  assert checkpointer.resume_steps() == [5]
  quarantined = glob.glob(str(tmp_path / "checkpoints" / "quarantine" / "resume-10-*"))
  assert len(quarantined) == 1 and os.path.isfile(os.path.join(quarantined[0], checkpoint.MANIFEST_FILE))
  checkpointer.close()


def test_checkpoint_without_manifest_restores_unverified(tmp_path):
  state = make_state()
  checkpointer = make_checkpointer(tmp_path)
  checkpointer.save(5, state)
  checkpointer.close()
  os.remove(tmp_path / "checkpoints/resume/5" / checkpoint.MANIFEST_FILE)
  checkpointer = make_checkpointer(tmp_path)
  with pytest.warns(RuntimeWarning, match=r"resume/5 has no lsm_jax_manifest.json .*restored unverified"):
    restored, step = checkpointer.restore_latest(
      abstract_of(state, lambda shape: jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    )
  checkpointer.close()
  assert step == 5
  assert_trees_equal(restored, state)


def test_one_bit_flip_in_milestone_refuses_to_load(tmp_path):
  checkpointer = make_checkpointer(tmp_path)
  for step in (0, 1):
    checkpointer.save(step, make_state(seed=step))
  checkpointer.close()
  step_dir = tmp_path / "checkpoints" / "milestones" / "1"
  flip_one_bit(largest_data_file(str(step_dir), "params"))
  assert checkpoint.list_milestones(str(tmp_path)) == [0, 1]  # listing stays cheap; loading verifies
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"milestones/1: file params/.* fails its checksum"):
    checkpoint.load_milestone(str(tmp_path), 1)
  params, _ = checkpoint.load_milestone(str(tmp_path), 0)
  assert_trees_equal(
    params, jax.tree.map(lambda leaf: np.asarray(leaf.astype("bfloat16")), make_state(seed=0)["params"])
  )


# --- run lock -----------------------------------------------------------------------------------------------------


def write_lock(model_dir, **fields):
  import socket
  import time

  record = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "token": "someone-else",
    "started_at": "2000-01-01T00:00:00+00:00",
    "heartbeat_unix": time.time(),
  }
  record.update(fields)
  os.makedirs(model_dir, exist_ok=True)
  (model_dir / checkpoint.LOCK_FILE).write_text(json.dumps(record))
  return record


def test_run_lock_refuses_a_live_holder_and_is_released_on_exit(tmp_path):
  import subprocess
  import sys

  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    write_lock(tmp_path, pid=holder.pid)
    with pytest.raises(
      checkpoint.errors.RunLockedError,
      match=rf"in use by another trainer \(pid {holder.pid} on "
      rf"host .*started 2000-01-01",
    ):
      with checkpoint.RunLock(tmp_path):
        pass
    assert json.loads((tmp_path / checkpoint.LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
  finally:
    holder.kill()
    holder.wait()
  # The holder is dead now: its lock is stale and taken over with a warning.
  with pytest.warns(RuntimeWarning, match=rf"taking over the stale lock .*process {holder.pid} is no longer running"):
    with checkpoint.RunLock(tmp_path) as lock:
      record = json.loads(lock.path.read_text())
      assert record["pid"] == os.getpid() and record["token"] != "someone-else"
      # A second trainer in this very process (e.g. a thread) is refused as well.
      with pytest.raises(checkpoint.errors.RunLockedError, match=f"pid {os.getpid()}"):
        with checkpoint.RunLock(tmp_path):
          pass
  assert not (tmp_path / checkpoint.LOCK_FILE).exists()


def test_run_lock_from_another_host_goes_stale_by_heartbeat(tmp_path):
  import time

  write_lock(tmp_path, host="other-host", pid=1, heartbeat_unix=time.time() - 5)
  with pytest.raises(checkpoint.errors.RunLockedError, match="pid 1 on host other-host"):
    with checkpoint.RunLock(tmp_path, stale_after_s=60, heartbeat_s=1):
      pass
  write_lock(tmp_path, host="other-host", pid=1, heartbeat_unix=time.time() - 120)
  with pytest.warns(RuntimeWarning, match=r"heartbeat is 12\d s old \(stale after 60 s\)"):
    with checkpoint.RunLock(tmp_path, stale_after_s=60, heartbeat_s=0.05) as lock:
      first_beat = json.loads(lock.path.read_text())["heartbeat_unix"]
      deadline = time.monotonic() + 30  # a loaded machine may starve the thread for a while, not forever
      while json.loads(lock.path.read_text())["heartbeat_unix"] == first_beat and time.monotonic() < deadline:
        time.sleep(0.05)
      assert json.loads(lock.path.read_text())["heartbeat_unix"] > first_beat  # the heartbeat thread beats
  assert not (tmp_path / checkpoint.LOCK_FILE).exists()
  with pytest.raises(ValueError, match="heartbeat_s < stale_after_s"):
    checkpoint.RunLock(tmp_path, stale_after_s=1, heartbeat_s=5)
