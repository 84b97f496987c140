"""What `python -m lsm_jax.train` refuses and how it exits: unknown macros, resumes that change the run, a locked
MODEL_DIR, and the exit codes of lsm_jax/errors.py (user error 2 without a traceback, SIGTERM 75).

The end-to-end recovery cases (a flipped bit in a resume checkpoint, a NaN right after a restore, a second
trainer next to a running one) train real runs and live in tests/test_resume.py.
"""

import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import gin
import pytest
from conftest import FAST_CPU_COMPILE

from lsm_jax import checkpoint, errors, train, trainer

SMOKE = "gin/smoke/llama.gin"
# The smallest smoke run the CLI can train: compiles in seconds on one CPU device.
TINY = [
  "--gin.SEQ_LEN=32",
  "--gin.GLOBAL_BATCH_SIZE=2",
  "--gin.EVAL_EVERY_STEPS=0",
  "--gin.sharding.MeshConfig.fsdp=1",
  "--gin.trainer.train.progress_bar=False",
  "--gin.trainer.train.enable_tensorboard=False",
  "--gin.trainer.train.sample_prompt=None",
]


def cli(*args, timeout=120, **popen_kwargs):
  environment = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_CPU_COMPILE}",
    PYTHONUNBUFFERED="1",
  )
  environment.pop("LSM_JAX_VERBOSE", None)
  return subprocess.Popen(
    [sys.executable, "-m", "lsm_jax.train", f"--gin_file={SMOKE}", *args],
    cwd=train.REPO_ROOT,
    env=environment,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **popen_kwargs,
  )


# --- macros ---------------------------------------------------------------------------------------------------


def test_binding_an_undefined_macro_is_refused_like_a_misspelled_parameter():
  gin.clear_config()
  try:
    with pytest.raises(
      ValueError,
      match=r"'TRAIN_STEP = 3' sets the macro TRAIN_STEP, which no gin file defines "
      r"or uses; did you mean TRAIN_STEPS\? Macros of the files: .*MODEL_DIR",
    ):
      train.parse_gin([SMOKE], ["MODEL_DIR = '/tmp/x'", "TRAIN_STEP = 3"])
    gin.clear_config()
    # Defined macros, parameters and a new macro that another binding uses stay allowed.
    train.parse_gin(
      [SMOKE], ["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 3", "MY_SEED = 5", "trainer.train.seed = %MY_SEED"]
    )
    assert gin.query_parameter("trainer.train.seed").scoped_configurable_fn() == 5
    assert gin.query_parameter("TRAIN_STEPS/macro.value") == 3
  finally:
    gin.clear_config()


def test_cli_user_error_is_one_line_without_traceback_unless_verbose(tmp_path):
  model_dir = tmp_path / "run"
  quiet = cli(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEP=3")
  _, stderr = quiet.communicate(timeout=120)
  assert quiet.returncode == errors.EXIT_USER_ERROR == 2, stderr
  assert "Traceback" not in stderr
  assert "user error: binding 'TRAIN_STEP = 3' sets the macro TRAIN_STEP" in stderr
  assert not model_dir.exists()  # refused before anything was written
  verbose = cli(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEP=3", "--verbose")
  _, stderr = verbose.communicate(timeout=120)
  assert verbose.returncode == 2 and "Traceback" in stderr and "user error: binding" in stderr


# --- resume checks --------------------------------------------------------------------------------------------

SAVED = {
  "arch": "llama",
  "size": "smoke",
  "tokenizer": "bytes",
  "seq_len": 32,
  "global_batch_size": 8,
  "seed": 0,
  "data_dir": "embedded:bytes",
  "train_steps": 20,
  "optimizer": {"learning_rate": 3e-3},
  "init_from": None,
  "model_config": {
    "arch": "llama",
    "num_layers": 2,
    "d_model": 64,
    "vocab_size": 264,
    "dtype": "float32",
    "remat_policy": "none",
    "attention_impl": "auto",
  },
}


def saved_run(tmp_path, step=8, **saved_overrides):
  (tmp_path / "checkpoints" / "resume" / str(step)).mkdir(parents=True)
  (tmp_path / checkpoint.RUN_METADATA_FILE).write_text(json.dumps({**SAVED, **saved_overrides}))
  return tmp_path


def changed(**changes):
  new = json.loads(json.dumps(SAVED))
  for key, value in changes.items():
    if key.startswith("model_config."):
      new["model_config"][key.split(".", 1)[1]] = value
    else:
      new[key] = value
  return new


@pytest.mark.parametrize(
  "key, value, shown",
  [
    ("model_config.d_model", 128, "model_config.d_model: 64 -> 128"),
    ("model_config.num_layers", 3, "model_config.num_layers: 2 -> 3"),
    ("tokenizer", "o200k_base", "tokenizer: 'bytes' -> 'o200k_base'"),
    ("seq_len", 64, "seq_len: 32 -> 64"),
    ("global_batch_size", 16, "global_batch_size: 8 -> 16"),
    ("seed", 1, "seed: 0 -> 1"),
    ("data_dir", "/data/other", "data_dir: 'embedded:bytes' -> '/data/other'"),
    ("init_from", {"path": "/runs/a", "step": None}, "init_from: None -> {'path': '/runs/a', 'step': None}"),
  ],
)
def test_resume_refuses_a_change_of_the_run_and_lists_it(tmp_path, key, value, shown):
  run_dir = saved_run(tmp_path)
  with pytest.raises(errors.ConfigChangeError, match=r"refusing to resume .* \(at step 8\) .*: " + re.escape(shown)):
    checkpoint.check_resumed_run(run_dir, changed(**{key: value}))
  with pytest.warns(RuntimeWarning, match="allowed by allow_config_change"):
    recorded = checkpoint.check_resumed_run(run_dir, changed(**{key: value}), allow_config_change=True)
  assert recorded == {"config_changes": [{"step": 8, "changes": {key: [_saved_value(key), value]}}]}


def _saved_value(key):
  return SAVED["model_config"][key.split(".", 1)[1]] if key.startswith("model_config.") else SAVED[key]


def test_resume_lists_every_difference_and_keeps_the_history(tmp_path):
  history = [{"step": 4, "changes": {"seed": [1, 0]}}]
  run_dir = saved_run(tmp_path, config_changes=history)
  with pytest.raises(errors.ConfigChangeError, match=r"global_batch_size: 8 -> 4; seed: 0 -> 2\. Restore"):
    checkpoint.check_resumed_run(run_dir, changed(global_batch_size=4, seed=2))
  # How the same model is computed, the optimizer and a longer run are not the run's identity.
  same_run = changed(
    **{
      "model_config.dtype": "bfloat16",
      "model_config.remat_policy": "full",
      # a run saved before the field existed has none
      "model_config.linear_attention_gpu_overrides": [["packed_operands", True]],
      "optimizer": {"learning_rate": 1e-3},
      "train_steps": 40,
    }
  )
  assert checkpoint.check_resumed_run(run_dir, same_run) == {"config_changes": history}


def test_resume_refuses_train_steps_below_the_reached_step(tmp_path):
  run_dir = saved_run(tmp_path, step=8)
  with pytest.raises(
    errors.UserError,
    match=r"train_steps=5 is below step 8, which the run in .* has already "
    r"reached \(checkpoints/resume/8\); give TRAIN_STEPS >= 8",
  ):
    checkpoint.check_resumed_run(run_dir, changed(train_steps=5))
  assert checkpoint.check_resumed_run(run_dir, changed(train_steps=8)) == {}
  assert checkpoint.check_resumed_run(tmp_path / "fresh", changed(seed=3)) == {}  # nothing to resume


# --- one trainer per MODEL_DIR ---------------------------------------------------------------------------------


def test_trainer_refuses_a_locked_model_dir_before_writing(tmp_path):
  model_dir = tmp_path / "run"
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      (
        "import sys, time\nfrom lsm_jax import checkpoint\n"
        f"with checkpoint.RunLock({str(model_dir)!r}):\n  print('held', flush=True)\n  time.sleep(120)\n"
      ),
    ],
    cwd=train.REPO_ROOT,
    stdout=subprocess.PIPE,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    gin.clear_config()
    train.parse_gin([SMOKE], [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 2"])
    with pytest.raises(errors.RunLockedError, match=rf"in use by another trainer \(pid {holder.pid} on host"):
      gin.get_configurable(trainer.train)(config_text=gin.config_str())
    assert sorted(os.listdir(model_dir)) == [checkpoint.LOCK_FILE]  # nothing else written
    assert json.loads((model_dir / checkpoint.LOCK_FILE).read_text())["pid"] == holder.pid
  finally:
    gin.clear_config()
    holder.kill()
    holder.wait()


# --- exit codes -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # one CLI training process: about 30 s of CPU time
def test_sigterm_saves_and_exits_with_the_preempted_code(tmp_path):
  model_dir = tmp_path / "run"
  process = cli(
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.TRAIN_STEPS=100000",
    "--gin.trainer.train.checkpoint_every_steps=100000",
    *TINY,
  )
  metrics_path = model_dir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics_path.exists() and metrics_path.read_text().count("\n") >= 2):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "no training steps within 240 s"
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == errors.EXIT_PREEMPTED == 75, stderr[-3000:]
  assert "preempted at step" in stderr and "Traceback" not in stderr
  saved = checkpoint.resume_checkpoint_steps(model_dir)
  assert len(saved) == 1 and 2 <= saved[0] < 100000  # the preemption save, nothing else
  assert checkpoint.verify_manifest(model_dir / "checkpoints" / "resume" / str(saved[0]))
  assert not (model_dir / checkpoint.LOCK_FILE).exists()  # released on exit


def test_exit_codes_of_errors():
  exit_code = train.exit_code_and_message
  no_space = RuntimeError("asynchronous save failed")
  no_space.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints")
  code, message = exit_code(no_space, True)
  assert code == 2 and message.startswith("no space left on the device:") and "/runs/x/checkpoints" in message
  assert exit_code(errors.RunLockedError("in use"), True) == (2, "in use")
  assert exit_code(ValueError("bad value"), False) == (2, "bad value")  # configuration, before training
  assert exit_code(ValueError("bad value"), True) == (1, None)  # during training: a failure, traceback
  too_big = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB")
  code, message = exit_code(too_big, False)
  assert code == 2 and "does not fit in device memory" in message and "81.00GiB" in message
  assert exit_code(too_big, True) == (1, None)
  assert exit_code(errors.NonFiniteLossError("the loss became nan at step 9"), True) == (
    1,
    "the loss became nan at step 9",
  )
  assert exit_code(KeyError("unexpected"), False) == (1, None)


_FAKE_GCLOUD = """#!/usr/bin/env bash
# Answers run.sh's gcloud calls: `ssh` exits with the next code of $FAKE_CODES, `describe` says ACTIVE.
echo "$*" >> "$FAKE_LOG"
if [[ "$*" == *"tpu-vm ssh"* ]]; then
  count=$(grep -c "tpu-vm ssh" "$FAKE_LOG")
  codes=($FAKE_CODES)
  exit "${codes[$((count - 1))]}"
fi
echo ACTIVE
"""


@pytest.mark.parametrize(
  "codes, expected_code, expected_launches",
  [
    ("75 1 0", 0, 3),  # preempted, failed, finished: relaunched twice
    ("75 2 0", 2, 2),  # a user error is not relaunched
  ],
)
def test_tpu_run_script_relaunches_on_preemption_and_failure_but_not_on_user_error(
  tmp_path, codes, expected_code, expected_launches
):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
  (bin_dir / "sleep").write_text("#!/usr/bin/env bash\n")
  for fake in bin_dir.iterdir():
    fake.chmod(0o755)
  log = tmp_path / "gcloud.log"
  result = subprocess.run(
    [
      "bash",
      "launch/tpu/run.sh",
      "--name=lsm-test",
      "--zone=us-east5-a",
      "--accelerator=v5p-128",
      "--gin_file=gin/hgrn2_7b.gin",
      "--bucket=gs://bucket/lsm",
      "--data_dir=gs://bucket/data",
    ],
    cwd=train.REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=60,
    env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_CODES=codes, FAKE_LOG=str(log)),
  )
  assert result.returncode == expected_code, result.stderr
  launches = [line for line in log.read_text().splitlines() if "tpu-vm ssh" in line]
  assert len(launches) == expected_launches
  assert all("set -o pipefail;" in line for line in launches)  # the trainer's code, not tee's
  if expected_code == 2:
    assert "user error (exit code 2" in result.stderr


# --- non-finite loss ------------------------------------------------------------------------------------------


class _SavedSteps:
  def __init__(self, steps):
    self.saved_resume_steps = steps


def test_non_finite_loss_names_the_step_the_last_good_checkpoint_and_what_to_try(tmp_path):
  for step in (4, 8, 12):
    (tmp_path / "checkpoints" / "resume" / str(step)).mkdir(parents=True)
  error = trainer._non_finite_error(str(tmp_path), 12, {"loss": float("nan"), "grad_norm": 1.0}, None, None)
  assert type(error) is errors.NonFiniteLossError
  assert str(error).startswith(
    f"the loss became nan at step 12; stopping. The last good checkpoint is resume "
    f"checkpoint 8 ({tmp_path}/checkpoints/resume/8), which a rerun resumes from. Try a "
    f"lower optim.OptimizerConfig.learning_rate"
  )
  error = trainer._non_finite_error(str(tmp_path), 3, {"loss": 2.5, "grad_norm": float("inf")}, None, None)
  assert str(error).startswith("the gradient norm became inf at step 3; stopping. The last good checkpoint is none")
  # Right after restoring checkpoint 8 (nothing saved since): the roll-back signal, naming the checkpoint.
  error = trainer._non_finite_error(str(tmp_path), 10, {"loss": float("nan"), "grad_norm": 1.0}, 8, _SavedSteps([]))
  assert isinstance(error, trainer._NonFiniteAfterRestore) and error.restored_step == 8
  assert str(error) == "the loss became nan at step 10, 2 step(s) after restoring resume checkpoint 8"
  # A save still in flight (not yet committed on disk) counts: closing the checkpointer commits it.
  error = trainer._non_finite_error(str(tmp_path), 15, {"loss": float("nan"), "grad_norm": 1.0}, 8, _SavedSteps([14]))
  assert type(error) is errors.NonFiniteLossError and "last good checkpoint is resume checkpoint 14" in str(error)


@pytest.mark.slow  # one CLI training process: about 30 s of CPU time
def test_diverging_run_stops_with_exit_code_1_and_one_message(tmp_path):
  model_dir = tmp_path / "run"
  # A learning rate of 1e38 overflows the parameters within a step or two.
  process = cli(
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.TRAIN_STEPS=20",
    "--gin.trainer.train.checkpoint_every_steps=1",
    "--gin.optim.OptimizerConfig.learning_rate=1e38",
    "--gin.optim.OptimizerConfig.warmup_steps=0",
    *TINY,
  )
  _, stderr = process.communicate(timeout=400)
  assert process.returncode == errors.EXIT_FAILED == 1, stderr[-3000:]
  match = re.search(
    r"error: the (loss|gradient norm) became (nan|inf) at step (\d+); stopping\. The last good "
    r"checkpoint is resume checkpoint (\d+) ",
    stderr,
  )
  assert match and int(match.group(4)) == int(match.group(3)) - 1, stderr[-3000:]
  assert "Traceback" not in stderr and "In call to configurable" not in stderr
  assert checkpoint.resume_checkpoint_steps(model_dir)[-1] == int(match.group(4))  # nothing non-finite was saved


# --- damaged milestones in the export and evaluation CLIs -----------------------------------------------------


@pytest.fixture
def run_with_damaged_milestones(tmp_path):
  """Milestones 0, 4, 8, 12 of a tiny LLaMA; one bit flipped in a data file of milestones 4 and 8."""
  from flax import nnx
  from test_checkpoint import flip_one_bit, largest_data_file

  from lsm_jax.models import build_model, get_config

  config = get_config(
    "llama", "70m", num_layers=1, d_model=64, num_heads=2, head_dim=32, ffn_dim=128, vocab_size=264, dtype="float32"
  )
  params = nnx.state(build_model(config, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
  run_dir = tmp_path / "run"
  saver = checkpoint.Checkpointer(
    str(run_dir),
    save_interval_steps=100,
    max_to_keep=1,
    milestone_steps=[0, 4, 8, 12],
    milestone_dtype="float32",
    async_save=False,
    run_metadata={
      **SAVED,
      "model_config": dataclasses.asdict(config),
    },
  )
  for step in (0, 4, 8, 12):
    saver.save(step, {"params": params})
  saver.close()
  for step in (4, 8):
    flip_one_bit(largest_data_file(str(run_dir / "checkpoints" / "milestones" / str(step)), "params"))
  return run_dir


def test_export_and_evaluate_clis_name_a_damaged_milestone_and_the_nearest_intact_ones(
  run_with_damaged_milestones, tmp_path, capsys
):
  from lsm_jax.evaluate import __main__ as evaluate_cli
  from lsm_jax.export import __main__ as export_cli

  run_dir = run_with_damaged_milestones
  damaged = re.escape(str(run_dir / "checkpoints" / "milestones" / "4"))
  # The outward search passes over the damaged milestone 8 to 12.
  alternatives = re.escape("intact milestones nearest to step 4: 0 and 12 (the run's milestones: 0, 4, 8, 12)")

  def one_line_error(command, argv):
    with pytest.raises(SystemExit) as exit_info:
      command(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == errors.EXIT_USER_ERROR
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    return captured.err

  out_dir = tmp_path / "hf"
  for checkpoint_argument in (f"--checkpoint={run_dir}", f"--checkpoint={run_dir}/checkpoints/milestones/4"):
    message = one_line_error(export_cli.main, [checkpoint_argument, f"--out={out_dir}", "--step=4", "--noverify"])
    assert re.match(
      rf"error: checkpoint {damaged}: file params/\S+ fails its checksum \(size \d+, CRC-32 [0-9a-f]{{8}}; the "
      rf"manifest says size \d+, CRC-32 [0-9a-f]{{8}}\)\. Nothing was exported\. Export another milestone with "
      rf"--step \({alternatives}\) or restore the damaged files from a copy$",
      message,
    ), message
    assert not (out_dir / "model.safetensors").exists()

  message = one_line_error(
    evaluate_cli.main,
    ["--run_dir", str(run_dir), "--tasks", "val_loss", "--steps", "4", "--output", str(tmp_path / "eval.jsonl")]
    + ["--tensorboard_dir", "", "--no_progress"],
  )
  assert re.match(rf"error: checkpoint {damaged}: file params/\S+ fails its checksum", message), message
  assert re.search(rf"Rerun with --steps naming intact milestones \({alternatives}\)", message), message
  # A step that is no milestone: the same one-line form, with the valid steps.
  message = one_line_error(export_cli.main, [f"--checkpoint={run_dir}", f"--out={out_dir}", "--step=5"])
  assert message == f"error: --step=5 is not a complete milestone of {run_dir}; its milestones: [0, 4, 8, 12]\n"
