"""The training loop's guards and accounting: the memory-plan check before step 1, the milestone spacing of short
runs, the checkpoint storage estimate and free-space check, failed saves, and wall-clock throughput.

Runs train the tiny LLaMA of gin/smoke/llama.gin on one of the fake CPU devices of tests/conftest.py.
"""

import contextlib
import logging
import os
import re
import resource
import signal
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm_jax import aot, checkpoint, metrics, sharding, train, trainer
from lsm_jax.data import loader
from lsm_jax.models import configs

SMOKE = "gin/smoke/llama.gin"
ONE_DEVICE = "sharding.MeshConfig.num_devices = 1"
QUIET = (
  "trainer.train.sample_prompt = None",
  "trainer.train.enable_tensorboard = False",
  "trainer.train.progress_bar = False",
)
GIB = 1 << 30

# A failed save's writes can still finish after the checkpointer closed (it drops those echoes only while open);
# their callbacks then find Orbax's event loop closed, which Python reports as ignored.
_ignore_orbax_closed_loop_callback = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _train(model_dir, *bindings, **arguments):
  gin.clear_config()
  try:
    train.parse_gin([SMOKE], [f"MODEL_DIR = '{model_dir}'", ONE_DEVICE, *QUIET, *bindings])
    return gin.get_configurable(trainer.train)(**arguments)
  finally:
    gin.clear_config()


def _step_dirs(model_dir, kind):
  directory = os.path.join(model_dir, "checkpoints", kind)
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def _smoke_program(**overrides):
  """The program of gin/smoke/llama.gin on one device, built from its gin bindings (and `overrides` of
  build_train_program's arguments) without train()."""
  gin.clear_config()
  try:
    train.parse_gin([SMOKE], ["MODEL_DIR = '/unused'", ONE_DEVICE])
    arguments = aot.program_arguments_from_gin()
  finally:
    gin.clear_config()
  mesh = sharding.make_mesh(arguments.pop("mesh_config"))
  return trainer.build_train_program(mesh=mesh, **{**arguments, **overrides})


# --- memory plan ---------------------------------------------------------------------------------------------------


def test_a_step_beyond_the_memory_limit_stops_before_step_1(tmp_path):
  model_dir = str(tmp_path / "run")
  limit_gib = 1e-4  # 105 KB: the smoke model's state alone is larger
  sigterm_handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(trainer.StepDoesNotFitError) as raised:
    _train(model_dir, f"trainer.train.device_memory_limit_gib = {limit_gib}")
  # The run's checkpointer was closed on the way out: the SIGTERM handler it installed is gone again.
  assert signal.getsignal(signal.SIGTERM) is sigterm_handler
  message = str(raised.value)
  needed, available = (
    float(x) for x in re.search(r"needs ([\d.e-]+) GiB per device .* device has ([\d.e-]+) GiB", message).groups()
  )
  # Both numbers are the real ones: the plan of the same program compiled here, and the limit given.
  plan = metrics.compiled_memory_bytes(_smoke_program().lower_train_step().compile())
  assert needed == pytest.approx(plan["total"] / GIB, rel=1e-2)  # printed to 3 digits
  assert available == pytest.approx(limit_gib, rel=1e-2)
  for knob in (
    "ModelConfig.remat_policy, now 'none'",
    *configs.REMAT_POLICIES,
    "PER_SHARD_MICROBATCH_SIZE, now 16",
    "gin/mesh/",
  ):
    assert knob in message
  # Stopped before the first step and before the initial checkpoint.
  assert not os.path.exists(os.path.join(model_dir, "metrics.jsonl"))
  assert _step_dirs(model_dir, "milestones") == _step_dirs(model_dir, "resume") == []


def test_bad_memory_limit_is_refused_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="device_memory_limit_gib must be None .* or a positive number of GiB, got -1"):
    _train(str(tmp_path / "run"), "trainer.train.device_memory_limit_gib = -1")


def test_an_unknown_loss_logits_dtype_is_refused_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="loss_logits_dtype 'float16' is not one of float32, bfloat16"):
    _train(str(tmp_path / "run"), "trainer.train.loss_logits_dtype = 'float16'")
  assert not os.path.exists(os.path.join(str(tmp_path / "run"), "metrics.jsonl"))


def test_an_unknown_compiler_option_is_refused_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="compiler_options .*No such compile option: 'xla_gpu_no_such_option'"):
    _train(str(tmp_path / "run"), "trainer.train.compiler_options = {'xla_gpu_no_such_option': True}")
  with pytest.raises(ValueError, match="'sometimes' is not a valid bool value"):
    _train(str(tmp_path / "run"), "trainer.train.compiler_options = {'xla_gpu_enable_cublaslt': 'sometimes'}")
  assert not os.path.exists(os.path.join(str(tmp_path / "run"), "metrics.jsonl"))


def test_compiler_options_reach_the_compiled_steps(tmp_path):
  """The options are those the train and eval steps compile with: XLA's dump option writes their HLO where told."""
  dump = tmp_path / "dump"
  program = _smoke_program(compiler_options={"xla_dump_to": str(dump)})
  assert not any("train_step" in name for name in os.listdir(dump))  # only the options' check compiled so far
  program.lower_train_step().compile()
  assert any("train_step" in name for name in os.listdir(dump))


# --- milestones, storage, saves ------------------------------------------------------------------------------------


def test_short_run_milestones_keep_a_minimum_spacing():
  steps = checkpoint.milestone_schedule(40, 57)
  assert steps == [0, 6, 13, 20, 26, 33, 40]  # isqrt(40) = 6 intervals: 7 milestones instead of 41
  assert min(np.diff(steps)) >= 6
  for total in (10, 99, 1000, 3135):
    steps = checkpoint.milestone_schedule(total, 57)
    gaps = np.diff(steps)
    assert steps[0] == 0 and steps[-1] == total and len(steps) == 1 + int(np.sqrt(total))
    assert gaps.min() >= int(np.sqrt(total)) and gaps.max() - gaps.min() <= 1
  # From (57 - 1)^2 = 3,136 steps on, the log-then-even schedule is unchanged: 57 milestones starting 0, 1, 2, 4.
  long_run = checkpoint.milestone_schedule(3136, 57)
  assert len(long_run) == 57 and long_run[:4] == [0, 1, 2, 4]


def test_storage_estimate_counts_milestones_and_resume_checkpoints():
  abstract_state = {
    "params": {"w": jax.ShapeDtypeStruct((10, 10), jnp.float32), "i": jax.ShapeDtypeStruct((3,), jnp.int32)},
    "opt_state": {"mu": jax.ShapeDtypeStruct((10, 10), jnp.float32)},
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  estimate = checkpoint.storage_estimate(
    abstract_state,
    train_steps=10,
    milestone_steps=[0, 5, 10],
    milestone_dtype="bfloat16",
    save_interval_steps=4,
    max_to_keep=2,
  )
  assert estimate.milestone_bytes == 100 * 2 + 3 * 4  # floating leaves in bf16, integers as they are
  assert estimate.resume_bytes == 400 + 12 + 400 + 4 + 8
  assert estimate.num_resume == 3  # saves at 4, 8, 10; max_to_keep 2 + the one being written
  assert estimate.total_bytes == 3 * 212 + 3 * 824
  one_save = checkpoint.storage_estimate(
    abstract_state,
    train_steps=3,
    milestone_steps=[0, 3],
    milestone_dtype="float32",
    save_interval_steps=4,
    max_to_keep=2,
  )
  assert (one_save.num_resume, one_save.milestone_bytes) == (1, 412)  # only the final save


def test_too_little_free_space_stops_before_training(tmp_path, monkeypatch):
  model_dir = str(tmp_path / "run")
  real_disk_usage = checkpoint.shutil.disk_usage
  free = 1 << 20  # 1 MiB; the smoke run's checkpoints need several

  def small_disk(path):
    return real_disk_usage(path)._replace(free=free)

  monkeypatch.setattr(checkpoint.shutil, "disk_usage", small_disk)
  with pytest.raises(checkpoint.InsufficientDiskSpaceError) as raised:
    _train(model_dir)
  message = str(raised.value)
  program = _smoke_program()
  expected = checkpoint.storage_estimate(
    program.abstract_state,
    train_steps=60,
    milestone_steps=checkpoint.milestone_schedule(60, 8),
    milestone_dtype="bfloat16",
    save_interval_steps=20,
    max_to_keep=2,
  )
  assert f"has {free / GIB:.3g} GiB free" in message
  assert f"need {expected.total_bytes / GIB:.3g} GiB more" in message
  assert "8 milestones x" in message and "3 resume checkpoints x" in message
  assert not os.path.exists(os.path.join(model_dir, "metrics.jsonl"))
  assert not os.path.exists(os.path.join(model_dir, "checkpoints"))
  # Remote directories are not checked (object stores have no free space to ask for).
  checkpoint.check_free_space("gs://bucket/run", expected)


def _limit_file_size():
  """Files beyond 100 KB can no longer be written: a real write error (EFBIG) from the kernel, as root ignores
  permissions and a full disk cannot be made here."""
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextlib.contextmanager
def _file_size_limit_restored():
  """Writes past the limit fail with EFBIG instead of killing the process (SIGXFSZ ignored); the limit and the
  signal handler are restored on exit."""
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, previous_handler)


@_ignore_orbax_closed_loop_callback
def test_a_failed_save_names_the_checkpoint_and_the_cause_and_keeps_the_previous_one(tmp_path, caplog):
  run_metadata = {"arch": "llama", "size": "test", "global_batch_size": 1, "seq_len": 1}
  state = {"params": {"w": jax.random.normal(jax.random.key(0), (256, 256))}, "step": jnp.int32(5)}
  absl_filters = list(logging.getLogger("absl").filters)
  saver = checkpoint.Checkpointer(
    str(tmp_path), save_interval_steps=5, max_to_keep=2, milestone_steps=[], run_metadata=run_metadata
  )
  saver.save(5, state)
  saver.wait_until_finished()
  # The 256 KB array does not fit under the file size limit, the JSON metadata does.
  with _file_size_limit_restored(), pytest.raises(checkpoint.CheckpointSaveError) as raised:
    _limit_file_size()
    saver.save(10, {**state, "step": jnp.int32(10)})
    saver.wait_until_finished()  # the asynchronous write fails in the background
  message = str(raised.value)
  assert f"saving checkpoint {tmp_path}/checkpoints/resume/10 failed: File too large (errno 27)" in message
  assert "checkpoints saved before it are intact" in message
  saver.close()  # the failure is reported once, not again while closing
  # ... and only by that error: Orbax's own records of it (a traceback per background thread) are dropped while a
  # Checkpointer is open, and its other records pass again once none is.
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "orbax" in r.pathname]
  assert logging.getLogger("absl").filters == absl_filters
  reader = checkpoint.Checkpointer(
    str(tmp_path), save_interval_steps=5, max_to_keep=2, milestone_steps=[], run_metadata=run_metadata
  )
  try:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, step = reader.restore_latest(abstract)
  finally:
    reader.close()
  assert step == 5
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])


class _FileSizeLimitFrom:
  """Wraps a BatchLoader: once batch `step` is read, files beyond 100 KB can no longer be written (EFBIG).
  Batches from `slow_from` on take `delay` seconds more to read."""

  def __init__(self, batch_loader, step, *, slow_from=None, delay=0.0):
    self._loader, self._step, self._slow_from, self._delay = batch_loader, step, slow_from, delay
    self.tokenizer = batch_loader.tokenizer

  def local_batch(self, step, *args):
    if step == self._step:
      _limit_file_size()
    if self._slow_from is not None and step >= self._slow_from:
      time.sleep(self._delay)
    return self._loader.local_batch(step, *args)


@_ignore_orbax_closed_loop_callback
def test_a_save_failing_mid_run_stops_training_with_one_error_and_the_earlier_checkpoints_restore(tmp_path):
  model_dir = str(tmp_path / "run")

  def make_loader(data_dir, **kwargs):
    return _FileSizeLimitFrom(loader.make_loader(data_dir, **kwargs), step=6)

  with _file_size_limit_restored():
    # Milestones 0, 1, 8, 12 and resume checkpoints every 4 steps, saved synchronously: batch 6 is read after
    # the saves of step 4 finished, so the saves of step 8 are the first to fail.
    with pytest.raises(checkpoint.CheckpointSaveError) as raised:
      _train(
        model_dir,
        "TRAIN_STEPS = 12",
        "trainer.train.num_milestones = 4",
        "trainer.train.checkpoint_every_steps = 4",
        "trainer.train.async_checkpointing = False",
        make_loader=make_loader,
      )
  assert re.search(
    rf"saving checkpoint {model_dir}/checkpoints/\w+/8 failed: File too large \(errno 27\)", str(raised.value)
  )
  # Milestone 8 (bf16 parameters only) is saved before the resume checkpoint and may fit in files under the limit;
  # the resume checkpoint of step 8 cannot, so the run stops there with step 4 its latest resume point.
  assert _step_dirs(model_dir, "milestones") in ([0, 1], [0, 1, 8]) and _step_dirs(model_dir, "resume") == [4]
  # The run resumes from the intact step-4 checkpoint and finishes.
  summary = _train(
    model_dir, "TRAIN_STEPS = 12", "trainer.train.num_milestones = 4", "trainer.train.checkpoint_every_steps = 4"
  )
  assert summary["step"] == 12 and _step_dirs(model_dir, "milestones") == [0, 1, 8, 12]
  assert [r["step"] for r in metrics.read_metrics(model_dir)][-8:] == list(range(5, 13))


@_ignore_orbax_closed_loop_callback
def test_a_background_save_failing_stops_training_at_the_next_step_naming_that_checkpoint(tmp_path):
  model_dir = str(tmp_path / "run")

  # Milestones 0 and 1, resume checkpoints at 30 and 60, saved asynchronously. Batch 5 is read long after the
  # step-1 milestone's few kilobytes were written, so the resume checkpoint of step 30 is the first save to fail,
  # in the background. Steps after it read their batches 0.1 s slower, leaving that write time to fail.
  def make_loader(data_dir, **kwargs):
    return _FileSizeLimitFrom(loader.make_loader(data_dir, **kwargs), step=5, slow_from=30, delay=0.1)

  with _file_size_limit_restored():
    with pytest.raises(checkpoint.CheckpointSaveError) as raised:
      _train(
        model_dir,
        "TRAIN_STEPS = 60",
        "trainer.train.num_milestones = 3",
        "trainer.train.checkpoint_every_steps = 30",
        make_loader=make_loader,
      )
  # Found by the next step's check, not by the save of step 60 waiting for it (which would also name step 60).
  assert f"saving checkpoint {model_dir}/checkpoints/resume/30 failed: File too large (errno 27)" in str(raised.value)
  assert max(r["step"] for r in metrics.read_metrics(model_dir)) < 45
  assert _step_dirs(model_dir, "milestones") == [0, 1] and _step_dirs(model_dir, "resume") == []


def test_a_preemption_notice_during_a_milestone_save_stops_only_after_a_resume_checkpoint(tmp_path, monkeypatch):
  # SIGTERM lands while step 8 saves its milestone (no resume checkpoint due there): the run must not stop at
  # step 8 claiming a saved checkpoint, but save a resume checkpoint at step 9 and stop there.
  model_dir = str(tmp_path / "run")
  save = checkpoint.Checkpointer.save

  def save_then_signal(self, step, state, **kwargs):
    save(self, step, state, **kwargs)
    if step == 8:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal)
  bindings = ("TRAIN_STEPS = 12", "trainer.train.num_milestones = 4", "trainer.train.checkpoint_every_steps = 100")
  summary = _train(model_dir, *bindings)
  assert summary["preempted"] and summary["step"] == 9
  assert _step_dirs(model_dir, "milestones") == [0, 1, 8] and _step_dirs(model_dir, "resume") == [9]
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  summary = _train(model_dir, *bindings)
  assert not summary["preempted"] and summary["step"] == 12
  assert [r["step"] for r in metrics.read_metrics(model_dir)][-3:] == [10, 11, 12]


# --- the loop: wall-clock throughput, prefetching, milestones on disk -----------------------------------------------


def test_step_timer_separates_wall_time_from_step_time():
  clock = iter(
    [
      0.0,  # start
      1.0,
      1.1,  # dispatch step 1, dispatch step 2 (the loop runs ahead)
      3.0,  # step 1 seen complete: wall 3.0, step 3.0 - 1.0
      3.2,
      5.0,  # dispatch step 3; step 2 complete: started at 3.0 (after step 1), 2.0
      9.0,
      9.5,
    ]
  ).__next__  # step 3 complete (4 s with a checkpoint); dispatch 4 (not completed)
  timer = metrics.StepTimer(clock)
  timer.dispatching(), timer.dispatching()
  timer.completed()
  assert timer.interval() == pytest.approx((3.0, 2.0))
  timer.dispatching()
  timer.completed()
  timer.completed()
  assert timer.interval() == pytest.approx(((2.0 + 4.0) / 2, (2.0 + 4.0) / 2))
  timer.dispatching()
  with pytest.raises(ValueError, match="needs a completed step"):
    timer.interval()


def test_prefetched_yields_the_batches_of_the_plain_loop_and_raises_at_the_failing_step():
  built = []

  def make(step):
    built.append(step)
    if step == 7:
      raise OSError("unreadable record")
    return {"step": step}

  stream = loader.prefetched(make, range(3, 10), depth=2)
  assert [next(stream) for _ in range(4)] == [(step, {"step": step}) for step in range(3, 7)]
  with pytest.raises(OSError, match="unreadable record"):
    next(stream)
  stream.close()
  assert built == list(range(3, 10))[: len(built)] and len(built) <= 7
  with pytest.raises(ValueError, match="prefetch depth must be a positive int, got 0"):
    loader.prefetched(make, range(3), depth=0)


def test_short_run_wall_clock_throughput_and_milestones(tmp_path):
  """40 steps with 57 milestones requested, checkpoints every 4 steps and validation every 5: the logged
  tokens/s are tokens over the wall time between the steps' own timestamps, and checkpoint and validation time
  shows in the wall-clock figures but not in the step-only ones."""
  model_dir = str(tmp_path / "run")
  start = time.perf_counter()
  _train(
    model_dir,
    "TRAIN_STEPS = 40",
    "trainer.train.num_milestones = 57",
    "trainer.train.checkpoint_every_steps = 4",
    "EVAL_EVERY_STEPS = 5",
    "trainer.train.eval_batches = 1",
    "trainer.train.async_checkpointing = False",
  )
  elapsed = time.perf_counter() - start
  assert checkpoint.list_milestones(model_dir) == [0, 6, 13, 20, 26, 33, 40]
  # The storage estimate against the disk: 7 milestones and the 2 resume checkpoints kept (the estimate adds the
  # one being written while the oldest still exists); Orbax compresses a little and adds kilobytes of metadata.
  estimate = checkpoint.storage_estimate(
    _smoke_program().abstract_state,
    train_steps=40,
    milestone_steps=checkpoint.milestone_schedule(40, 57),
    milestone_dtype="bfloat16",
    save_interval_steps=4,
    max_to_keep=2,
  )
  on_disk = sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(os.path.join(model_dir, "checkpoints"))
    for name in names
  )
  kept = estimate.num_milestones * estimate.milestone_bytes + 2 * estimate.resume_bytes
  assert 0.8 * kept < on_disk < estimate.total_bytes

  records = metrics.read_metrics(model_dir)
  assert [r["step"] for r in records] == list(range(1, 41))
  tokens_per_step = 16 * 128
  wall = np.array([tokens_per_step / r["tokens_per_sec"] for r in records])
  np.testing.assert_allclose(wall, [r["wall_time_s"] for r in records], rtol=1e-9)
  # Between two records, the wall time of the steps in between is exactly the time between their timestamps.
  for first, last in ((0, 39), (0, 20), (9, 30)):
    between = records[last]["timestamp"] - records[first]["timestamp"]
    assert tokens_per_step * (last - first) / between == pytest.approx(
      tokens_per_step * (last - first) / wall[first + 1 : last + 1].sum(), rel=0.05
    )
  assert wall.sum() < elapsed
  step_time = np.array([r["step_time_s"] for r in records])
  assert np.all(step_time <= wall * (1 + 1e-9))
  for record in records:
    assert record["step_tokens_per_sec"] == pytest.approx(tokens_per_step / record["step_time_s"], rel=1e-9)
    assert record["mfu"] == pytest.approx(record["step_mfu"] * record["step_time_s"] / record["wall_time_s"], rel=1e-9)
  # Validation follows steps 5, 10, ..., a (synchronous) save steps 4, 8, ... and the milestones: the next step's
  # wall time carries that work, its step time does not.
  busy = {*range(4, 41, 4), *range(5, 41, 5), 6, 13, 20, 26, 33}
  gap = wall - step_time  # indexed by step - 1
  after_work = [step - 1 for step in range(2, 41) if step - 1 in busy]
  after_plain_steps = [step - 1 for step in range(2, 41) if step - 1 not in busy]
  assert np.median(gap[after_work]) > np.median(gap[after_plain_steps])
