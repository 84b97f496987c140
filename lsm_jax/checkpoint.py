"""Orbax checkpoints: a rolling full-state `resume/` manager and a kept-forever params-only `milestones/` manager.

Layout under MODEL_DIR (docs/interfaces.md):
  checkpoints/resume/<step>/{state,metadata}      params, optimizer state, step, RNG; asynchronous; latest N kept;
                                                  saved every K steps, when forced (end of training) and on
                                                  preemption (JAX's preemption sync point; SIGTERM in one process)
  checkpoints/milestones/<step>/{params,metadata} params cast to bfloat16 or float32 on the milestone schedule
  checkpoints/quarantine/                         checkpoints that failed their checksums or to restore, moved
                                                  aside (resume-<step>-<time>)
  checkpoints/*/<step>/lsm_jax_manifest.json      size and CRC-32 of every file of the step, written by process 0
                                                  once the (asynchronous) save has committed; verified on restore
  run_metadata.json                               the run's description plus `milestone_steps` and `code_version`
  run.lock                                        the live trainer's host, pid, start time and heartbeat

Every checkpoint carries a JSON `metadata` item: step, arch, size, model_config, tokens_seen,
compute_pflops_days, code_version (`git describe`), the gin config text (MODEL_DIR/config.gin), the save time,
and for milestones the parameter layout (tree path, shape, dtype) so they load without a model.

Milestone schedule (Pythia-style, see `milestone_schedule`): with the paper's 300B tokens at 3,932,160 tokens
per step (76,294 steps) the default 57 milestones per run give 57 x 24 = 1,368 milestones over the 24 main
runs; the paper reports 1,376 (= 57.33 x 24) including its ablation runs and does not state the spacing.

Integrity (docs/reliability.md): a checkpoint whose files differ from its manifest is never restored: the trainer
quarantines it and falls back to the next older one, `load_milestone` raises CorruptCheckpointError. A checkpoint
without a manifest (written by an older lsm_jax, or the process died between the commit and the manifest) restores
with an "unverified" warning.

Only the V0 `CheckpointManager` + args API is used: it exists in every orbax-checkpoint version we target.
Paths go through etils.epath, so MODEL_DIR may be local or gs://.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lsm_jax import errors
from lsm_jax.flops import PFLOP_S_DAY

MILESTONE_DTYPES = ("bfloat16", "float32")
RUN_METADATA_FILE = "run_metadata.json"
MANIFEST_FILE = "lsm_jax_manifest.json"
LOCK_FILE = "run.lock"
_STATE_ITEM, _PARAMS_ITEM, _METADATA_ITEM = "state", "params", "metadata"


def milestone_schedule(total_steps: int, num_checkpoints: int = 57) -> list[int]:
  """Pythia-style milestone steps: 0, then 1, 2, 4, ... (powers of two), then evenly spaced up to total_steps.

  The even part is `total_steps * j // n_even` for j = 1..n_even; the log part is every power of two below the
  first even step, so the two never collide. n_even is the smallest count that makes the schedule exactly
  `num_checkpoints` distinct steps, ending at `total_steps`. With total_steps=143,000 and 154 checkpoints this is
  Pythia's schedule (0, 1, ..., 512, 1000, 2000, ..., 143000).

  Short runs: a run of T steps keeps at most 1 + isqrt(T) milestones. When more are requested, the schedule is
  isqrt(T) + 1 evenly spaced steps `T * j // isqrt(T)` (j = 0..isqrt(T)), so neighbours are at least isqrt(T)
  steps apart (40 steps: 0, 6, 13, 20, 26, 33, 40 instead of one per step). Neighbouring steps of a short run
  differ little in loss while every milestone costs a copy of the weights; the square root lets the count grow
  with the run but slower than the run. Runs of at least (num_checkpoints - 1)^2 steps (3,136 for 57) are not
  affected. When num_checkpoints cannot hold every power of two below total_steps (e.g. 6 milestones of a
  60-step smoke run), the schedule is 0, num_checkpoints - 2 powers of two with exponents spread evenly, and
  total_steps.

  The paper's grid default: 76,294 steps (300B tokens / 3,932,160 per step), 57 per run -> 24 runs x 57 =
  1,368 milestones (the paper's 1,376 includes ablation runs; its spacing is unpublished).
  """
  if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 0:
    raise ValueError(f"total_steps must be a non-negative int, got {total_steps!r}")
  if isinstance(num_checkpoints, bool) or not isinstance(num_checkpoints, (int, np.integer)) or num_checkpoints < 2:
    raise ValueError(f"num_checkpoints must be an int >= 2 (step 0 and the last step), got {num_checkpoints!r}")
  total_steps, num_checkpoints = int(total_steps), int(num_checkpoints)
  short_run_intervals = math.isqrt(total_steps)
  if num_checkpoints > 1 + short_run_intervals:
    intervals = max(1, short_run_intervals)  # total_steps = 0: the single milestone 0
    return sorted({total_steps * j // intervals for j in range(intervals + 1)})

  def powers_of_two_below(limit: int) -> list[int]:
    powers = []
    while (power := 2 ** len(powers)) < limit:
      powers.append(power)
    return powers

  for num_even in range(1, num_checkpoints):
    log_part = powers_of_two_below(total_steps // num_even)
    if 1 + len(log_part) + num_even == num_checkpoints:
      even_part = [total_steps * j // num_even for j in range(1, num_even + 1)]
      return [0, *log_part, *even_part]
  largest_exponent = len(powers_of_two_below(total_steps)) - 1
  exponents = np.rint(np.linspace(0, largest_exponent, num_checkpoints - 2)).astype(int)
  return [0, *(2 ** int(exponent) for exponent in exponents), total_steps]


class InsufficientDiskSpaceError(errors.UserError):
  """A local MODEL_DIR's filesystem has less free space than the run's checkpoints need."""


class CheckpointSaveError(errors.UserError):
  """Writing a checkpoint failed (disk full, permissions, ...); the checkpoints saved before it are intact."""


_GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class StorageEstimate:
  """The most disk a run's checkpoints occupy at once (array bytes; Orbax's metadata adds kilobytes)."""

  num_milestones: int
  milestone_bytes: int  # the parameters in milestone_dtype
  num_resume: int  # resume checkpoints alive at once
  resume_bytes: int  # parameters, optimizer state, step and RNG as trained

  @property
  def total_bytes(self) -> int:
    return self.num_milestones * self.milestone_bytes + self.num_resume * self.resume_bytes

  def describe(self) -> str:
    plural = lambda count: "" if count == 1 else "s"
    return (
      f"{self.total_bytes / _GIB:.3g} GiB = {self.num_milestones} milestone{plural(self.num_milestones)} x "
      f"{self.milestone_bytes / _GIB:.3g} GiB + {self.num_resume} resume checkpoint{plural(self.num_resume)} x "
      f"{self.resume_bytes / _GIB:.3g} GiB"
    )


def _nbytes(leaf: Any, dtype: Any = None) -> int:
  return int(np.prod(leaf.shape)) * jnp.dtype(dtype or leaf.dtype).itemsize


def storage_estimate(
  abstract_state: Mapping[str, Any],
  *,
  train_steps: int,
  milestone_steps: Iterable[int],
  milestone_dtype: str,
  save_interval_steps: int,
  max_to_keep: int,
) -> StorageEstimate:
  """The checkpoint storage of a run of `train_steps` steps, from the train state's shapes and dtypes.

  Milestones are kept forever, each the parameters with floating leaves in `milestone_dtype`. Resume
  checkpoints (every `save_interval_steps` and at the last step) hold the whole state; Orbax deletes the oldest
  only after the next one is written, so up to max_to_keep + 1 exist at once.
  """
  if milestone_dtype not in MILESTONE_DTYPES:
    raise ValueError(f"milestone_dtype must be one of {MILESTONE_DTYPES}, got {milestone_dtype!r}")
  params = jax.tree.leaves(abstract_state["params"])
  milestone_bytes = sum(
    _nbytes(leaf, milestone_dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else None) for leaf in params
  )
  resume_saves = len({*range(save_interval_steps, train_steps + 1, save_interval_steps), train_steps} - {0})
  return StorageEstimate(
    num_milestones=len(set(milestone_steps)),
    milestone_bytes=milestone_bytes,
    num_resume=min(max_to_keep + 1, resume_saves),
    resume_bytes=sum(_nbytes(leaf) for leaf in jax.tree.leaves(abstract_state)),
  )


def _bytes_under(directory: str) -> int:
  total = 0
  for root, _, files in os.walk(directory):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # removed while walking (an old checkpoint rotated away)
        pass
  return total


def check_free_space(model_dir: str, estimate: StorageEstimate) -> None:
  """Raises InsufficientDiskSpaceError when a local `model_dir` lacks room for the run's checkpoints.

  What the run's checkpoints already occupy there (a resumed run) counts towards the estimate. Remote paths
  (gs:// and other URLs) are not checked: object stores report no free space.
  """
  if "://" in str(model_dir):
    return
  directory = os.path.abspath(model_dir)
  existing = _bytes_under(os.path.join(directory, "checkpoints"))
  needed = max(0, estimate.total_bytes - existing)
  probe = directory
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  free = shutil.disk_usage(probe).free
  if needed > free:
    already = f", {existing / _GIB:.3g} GiB of which are already saved" if existing else ""
    raise InsufficientDiskSpaceError(
      f"{directory} has {free / _GIB:.3g} GiB free, but this run's checkpoints need {needed / _GIB:.3g} GiB "
      f"more ({estimate.describe()}{already}). Free space, choose another MODEL_DIR, or save less: "
      f"trainer.train.num_milestones, max_checkpoints_to_keep, milestone_dtype='bfloat16'."
    )


# Orbax logs each failed write from its background threads with a traceback (through absl's logger) before the
# failure reaches the caller, which Checkpointer reports as one CheckpointSaveError: these records repeat it.
_ORBAX_SAVE_FAILURE_LOGS = re.compile(
  r"_SignalingThread\.run\(\) raised an exception|Failed to run \d+ Handler Commit operations|Save Finalize thread"
)


class _SaveFailureEchoes(logging.Filter):
  """While a Checkpointer is open, drops what only repeats a failed save that it raises as one CheckpointSaveError:
  Orbax's error records of the failure, and the "Event loop is closed" errors of TensorStore writes that finish
  after Orbax closed the failed save's event loop (Python reports those as unraisable exceptions, with a
  traceback each)."""

  def __init__(self):
    super().__init__()
    self._open = 0
    self._lock = threading.Lock()
    self._previous_unraisablehook = None

  def filter(self, record: logging.LogRecord) -> bool:
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (from_orbax and record.levelno >= logging.ERROR and _ORBAX_SAVE_FAILURE_LOGS.search(str(record.msg)))

  def _unraisablehook(self, unraisable) -> None:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    self._previous_unraisablehook(unraisable)

  def attach(self) -> None:
    with self._lock:
      self._open += 1
      if self._open == 1:
        logging.getLogger("absl").addFilter(self)
        self._previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._unraisablehook

  def detach(self) -> None:
    with self._lock:
      self._open -= 1
      if self._open == 0:
        logging.getLogger("absl").removeFilter(self)
        if sys.unraisablehook == self._unraisablehook:  # not replaced by someone else meanwhile
          sys.unraisablehook = self._previous_unraisablehook


_save_failure_echoes = _SaveFailureEchoes()


def _failure_cause(error: BaseException) -> str:
  """The operating system's reason (TensorStore reports it as os_error_code), else the error's first line."""
  code = getattr(error, "errno", None)
  if code is None and (match := re.search(r"os_error_code='?(\d+)", str(error))):
    code = int(match.group(1))
  first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:400]
  return f"{os.strerror(code)} (errno {code}): {first_line}" if code else f"{type(error).__name__}: {first_line}"


def code_version() -> str:
  """`git describe --always --dirty --tags` of the lsm_jax checkout, else the package version."""
  package_dir = os.path.dirname(os.path.abspath(__file__))
  try:
    described = subprocess.run(
      ["git", "describe", "--always", "--dirty", "--tags"],
      cwd=package_dir,
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    ).stdout.strip()
    if described:
      return described
  except (OSError, subprocess.SubprocessError):
    pass
  from lsm_jax import __version__

  return f"lsm_jax-{__version__}"


def _jsonable(value: Any, where: str) -> Any:
  """Converts numpy/jax scalars and arrays to Python values; rejects anything JSON cannot hold."""
  if isinstance(value, Mapping):
    return {str(key): _jsonable(item, f"{where}.{key}") for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(value).tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(
    f"{where} must be JSON-serializable (dict, list, str, number, bool, None or an array), got {type(value).__name__}"
  )


def _as_path(directory: str | os.PathLike) -> epath.Path:
  """Local directories become absolute (Orbax needs that); gs:// and other URLs stay as they are."""
  path = epath.Path(directory)
  return path if "://" in str(directory) else path.absolute()


def _write_json_atomically(path: epath.Path, payload: Mapping[str, Any]) -> None:
  temporary = path.parent / f"{path.name}.tmp-{os.getpid()}"
  temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
  temporary.replace(path)


def read_run_metadata(run_dir: str) -> dict:
  """The run's metadata (arch, size, model_config, ..., milestone_steps, code_version)."""
  path = _as_path(run_dir) / RUN_METADATA_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: run_dir must be a MODEL_DIR written by lsm_jax training")
  return json.loads(path.read_text())


def _param_layout(params: Any) -> list[dict]:
  """(tree path, shape, dtype) of every leaf; JSON keeps int keys distinct from str keys inside lists."""
  layout = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = []
    for entry in path:
      if not isinstance(entry, jax.tree_util.DictKey):
        raise TypeError(
          f"params must be a pure nested dict of arrays; found {type(entry).__name__} at {jax.tree_util.keystr(path)}"
        )
      keys.append(entry.key if isinstance(entry.key, (int, str)) else str(entry.key))
    layout.append({"path": keys, "shape": list(leaf.shape), "dtype": str(leaf.dtype)})
  return layout


def _nested_dict_from_layout(layout: list[dict], make_leaf) -> dict:
  tree: dict = {}
  for entry in layout:
    node = tree
    for key in entry["path"][:-1]:
      node = node.setdefault(key, {})
    node[entry["path"][-1]] = make_leaf(entry)
  return tree


def _cast_floating(tree: Any, dtype: str) -> Any:
  return jax.tree.map(lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


def _check_abstract_state(abstract_state: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    if getattr(leaf, "sharding", None) is None or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(
        f"abstract_state leaf {jax.tree_util.keystr(path)} must be a jax.ShapeDtypeStruct carrying "
        f"the current sharding (e.g. jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...)));"
        f" got {leaf!r}"
      )


def _incomplete_reason(step_dir: epath.Path, items: Iterable[str]) -> str | None:
  """Why a finalized-looking step directory cannot be a whole checkpoint, or None when its files are present."""
  if not (step_dir / "_CHECKPOINT_METADATA").exists():
    return "its _CHECKPOINT_METADATA file is missing (the save never finished)"
  for item in items:
    if not (step_dir / item).is_dir():
      return f"its '{item}' item is missing"
  return None


class CorruptCheckpointError(errors.LsmJaxError, ValueError):
  """A checkpoint's files differ from its manifest (bit rot, a truncated copy, a damaged disk).

  `step_dir`: the damaged checkpoint's directory (MODEL_DIR/checkpoints/<resume|milestones>/<step>).
  """

  def __init__(self, message: str, step_dir: str | os.PathLike):
    super().__init__(message)
    self.step_dir = epath.Path(step_dir)


class UnrestorableCheckpointsError(errors.UserError, RuntimeError):
  """Resume checkpoints exist but none restores: a relaunch would fail the same way, so nothing restarts."""


# --- integrity manifests ----------------------------------------------------------------------------------------

_READ_CHUNK_BYTES = 16 << 20


def _files_under(directory: epath.Path) -> list[epath.Path]:
  files = []
  for path in directory.iterdir():
    if path.is_dir():
      files.extend(_files_under(path))
    elif path.name != MANIFEST_FILE:
      files.append(path)
  return files


def _size_and_crc32(path: epath.Path) -> tuple[int, int]:
  size, crc = 0, 0
  with path.open("rb") as handle:
    while chunk := handle.read(_READ_CHUNK_BYTES):
      size += len(chunk)
      crc = zlib.crc32(chunk, crc)
  return size, crc


def write_manifest(step_dir: str | os.PathLike) -> None:
  """Records size and CRC-32 of every file under a committed step directory (atomically, as its last file)."""
  step_dir = _as_path(step_dir)
  files = {}
  for path in sorted(_files_under(step_dir), key=str):
    size, crc = _size_and_crc32(path)
    files[str(path.relative_to(step_dir))] = {"size": size, "crc32": crc}
  _write_json_atomically(step_dir / MANIFEST_FILE, {"algorithm": "crc32", "files": files})


def verify_manifest(step_dir: str | os.PathLike) -> bool:
  """True when every file of the manifest matches; False when the step has no manifest (unverified).

  Raises CorruptCheckpointError naming the first file that is missing or differs. Files that are not in the
  manifest are not checked (Orbax writes nothing into a step after its commit).
  """
  step_dir = _as_path(step_dir)
  manifest_path = step_dir / MANIFEST_FILE
  if not manifest_path.exists():
    return False
  try:
    manifest = json.loads(manifest_path.read_text())
    expected_files = manifest["files"]
  except (ValueError, KeyError, TypeError) as error:
    raise CorruptCheckpointError(
      f"checkpoint {step_dir}: its manifest {MANIFEST_FILE} is unreadable ({type(error).__name__}: {error})", step_dir
    ) from error
  for name, expected in sorted(expected_files.items()):
    path = step_dir / name
    if not path.exists():
      raise CorruptCheckpointError(f"checkpoint {step_dir}: file {name} of its manifest is missing", step_dir)
    size, crc = _size_and_crc32(path)
    if (size, crc) != (expected["size"], expected["crc32"]):
      raise CorruptCheckpointError(
        f"checkpoint {step_dir}: file {name} fails its checksum (size {size}, CRC-32 "
        f"{crc:08x}; the manifest says size {expected['size']}, CRC-32 "
        f"{expected['crc32']:08x})",
        step_dir,
      )
  return True


def _verify_on_process_zero(step_dir: epath.Path) -> tuple[bool, str | None]:
  """(has manifest, problem or None), computed by process 0 and shared with every process."""
  verified, problem = False, None
  if jax.process_index() == 0:
    try:
      verified = verify_manifest(step_dir)
    except CorruptCheckpointError as error:
      problem = str(error)
  if jax.process_count() > 1:
    # Every process takes the same branch; the message itself stays on process 0.
    code = multihost_utils.broadcast_one_to_all(np.int32(2 if problem else int(verified)))
    verified, problem = int(code) == 1, problem or ("fails its checksums (see process 0)" if int(code) == 2 else None)
  return verified, problem


def _move_to_quarantine(model_dir: epath.Path, step_dirs: Iterable[epath.Path], reason: str) -> None:
  """Moves checkpoint step directories to checkpoints/quarantine/ (process 0; every process calls)."""
  step_dirs = list(step_dirs)
  if not step_dirs:
    return
  if jax.process_index() == 0:
    quarantine_dir = model_dir / "checkpoints" / "quarantine"
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    for step_dir in step_dirs:
      destination = quarantine_dir / f"{step_dir.parent.name}-{step_dir.name}-{stamp}"
      step_dir.rename(destination)
      warnings.warn(f"moved checkpoint {step_dir} to {destination}: {reason}", RuntimeWarning, stacklevel=3)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("lsm_jax.checkpoint.quarantine")


def resume_checkpoint_steps(model_dir: str | os.PathLike) -> list[int]:
  """Steps of the committed resume checkpoints of a run directory (none when it has no checkpoints)."""
  directory = _as_path(model_dir) / "checkpoints" / "resume"
  return _step_numbers(directory) if directory.is_dir() else []


def quarantine_resume_checkpoint(model_dir: str | os.PathLike, step: int, reason: str) -> None:
  """Moves resume checkpoint `step` aside, e.g. when training from it gives a non-finite loss."""
  model_dir = _as_path(model_dir)
  _move_to_quarantine(model_dir, [model_dir / "checkpoints" / "resume" / str(step)], reason)


# --- resuming the same run --------------------------------------------------------------------------------------

# What a run is: changing any of these mid-run changes what its checkpoints and curves mean.
RUN_DEFINING_KEYS = ("tokenizer", "seq_len", "global_batch_size", "seed", "data_dir", "init_from")
# How the run started, written once when it starts and kept when it resumes (a resume never re-reads its source).
RUN_ORIGIN_KEYS = ("init_from_milestone",)
# ModelConfig fields that choose how the same model is computed (kernels, remat, compute dtype), free to change.
EXECUTION_MODEL_FIELDS = (
  "dtype",
  "linear_attention_backend",
  "chunk_size",
  "linear_attention_gpu_overrides",
  "remat_policy",
  "attention_impl",
  "unroll_layers",
  "fused_mlp",
  "glu_backend",
  "norm_backend",
)


def _run_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  differences = {}
  saved_model, new_model = saved.get("model_config") or {}, new.get("model_config") or {}
  for field in sorted(set(saved_model) | set(new_model)):
    if field not in EXECUTION_MODEL_FIELDS and saved_model.get(field) != new_model.get(field):
      differences[f"model_config.{field}"] = (saved_model.get(field), new_model.get(field))
  for key in RUN_DEFINING_KEYS:
    if key in saved and _jsonable(saved[key], key) != _jsonable(new.get(key), key):
      differences[key] = (saved[key], new.get(key))
  return differences


def check_resumed_run(
  model_dir: str | os.PathLike, run_metadata: Mapping[str, Any], *, allow_config_change: bool = False
) -> dict:
  """Refuses to resume a run under a configuration that changes its meaning; call before writing anything.

  Applies when MODEL_DIR holds resume checkpoints and a run_metadata.json: `run_metadata['train_steps']` below
  the newest checkpoint's step is a UserError; a difference in the model's definition (ModelConfig except
  EXECUTION_MODEL_FIELDS) or in RUN_DEFINING_KEYS is a ConfigChangeError listing every difference, unless
  `allow_config_change`, which records the differences. Returns the entries to merge into the new run
  metadata: `config_changes`, the list of recorded changes (each {"step", "changes": {key: [old, new]}}), and the
  saved RUN_ORIGIN_KEYS.
  """
  steps = resume_checkpoint_steps(model_dir)
  metadata_path = _as_path(model_dir) / RUN_METADATA_FILE
  if not steps or not metadata_path.exists():
    return {}
  saved = json.loads(metadata_path.read_text())
  history = list(saved.get("config_changes", []))
  reached = steps[-1]
  if run_metadata["train_steps"] < reached:
    raise errors.UserError(
      f"train_steps={run_metadata['train_steps']} is below step {reached}, which the run in "
      f"{model_dir} has already reached (checkpoints/resume/{reached}); give TRAIN_STEPS >= "
      f"{reached}, or another MODEL_DIR for a shorter run"
    )
  differences = _run_differences(saved, run_metadata)
  if differences:
    listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())
    if not allow_config_change:
      raise errors.ConfigChangeError(
        f"refusing to resume {model_dir} (at step {reached}) with a configuration that changes the run: "
        f"{listing}. Restore the original settings or use another MODEL_DIR; to continue anyway pass "
        f"--gin.trainer.train.allow_config_change=True (the change is recorded in {RUN_METADATA_FILE})."
      )
    warnings.warn(
      f"resuming {model_dir} at step {reached} with changed configuration (allowed by allow_config_change): {listing}",
      RuntimeWarning,
      stacklevel=2,
    )
    history.append({"step": reached, "changes": {key: [old, new] for key, (old, new) in differences.items()}})
  carried = {key: saved[key] for key in RUN_ORIGIN_KEYS if key in saved}
  return {**carried, "config_changes": history} if history else carried


# --- one trainer per run directory -----------------------------------------------------------------------------


def _pid_is_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


class RunLock:
  """MODEL_DIR/run.lock: one writer per run directory, held by process 0 of the trainer.

  The lock file records host, pid, start time and a heartbeat that a thread refreshes every `heartbeat_s`. A
  second trainer refuses (RunLockedError naming the holder) unless the lock is stale: its pid is dead on this
  host, or, from another host (shared storage such as gs://), its heartbeat is older than `stale_after_s`; a
  stale lock is taken over with a warning. Local directories are created with O_EXCL, so of two simultaneous
  starts one wins; on object stores the lock is written and read back (best effort: they have no exclusive
  create). Use as a context manager; every process enters it, only process 0 touches the file.
  """

  _held_tokens: set[str] = set()  # locks held by this process (a same-pid record with another token is stale)

  def __init__(self, model_dir: str | os.PathLike, *, stale_after_s: float = 600.0, heartbeat_s: float = 60.0):
    if not 0 < heartbeat_s < stale_after_s:
      raise ValueError(f"RunLock needs 0 < heartbeat_s < stale_after_s, got {heartbeat_s} and {stale_after_s}")
    self.model_dir = _as_path(model_dir)
    self.path = self.model_dir / LOCK_FILE
    self.stale_after_s = stale_after_s
    self.heartbeat_s = heartbeat_s
    self._record: dict | None = None
    self._stop = threading.Event()
    self._heartbeat_thread: threading.Thread | None = None

  def _new_record(self) -> dict:
    now = time.time()
    return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "token": uuid.uuid4().hex,
      "started_at": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
      "heartbeat_unix": now,
    }

  def _read(self) -> dict | None:
    try:
      record = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: treated as stale
    return record if isinstance(record, dict) else {}

  def _stale_reason(self, record: dict) -> str | None:
    """Why `record` no longer guards the directory, or None while its holder is alive."""
    if not {"host", "pid", "token", "heartbeat_unix"} <= set(record):
      return "the lock file is unreadable"
    if record["host"] == socket.gethostname():
      if record["pid"] == os.getpid():
        return None if record["token"] in RunLock._held_tokens else "this process left it behind"
      return None if _pid_is_alive(record["pid"]) else f"process {record['pid']} is no longer running"
    age = time.time() - record["heartbeat_unix"]
    return (
      f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
      if (age > self.stale_after_s)
      else None
    )

  @staticmethod
  def describe(record: dict) -> str:
    return (
      f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started_at')}, heartbeat "
      f"{time.time() - record.get('heartbeat_unix', 0):.0f} s ago"
    )

  def _create(self, record: dict) -> bool:
    """Writes the lock file unless it exists; False when another writer got there first."""
    payload = json.dumps(record, indent=2, sort_keys=True)
    if "://" not in str(self.path):
      try:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(descriptor, "w") as handle:
        handle.write(payload)
      return True
    if self.path.exists():
      return False
    self.path.write_text(payload)
    time.sleep(1.0)  # let a concurrent writer's object land, then see who won
    return (self._read() or {}).get("token") == record["token"]

  def _acquire_on_process_zero(self) -> str | None:
    """Takes the lock; returns the holder's description when it is held by a live trainer."""
    self.model_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      record = self._new_record()
      if self._create(record):
        self._record = record
        return None
      holder = self._read()
      if holder is None:
        continue  # released in between
      reason = self._stale_reason(holder)
      if reason is None:
        return self.describe(holder)
      warnings.warn(
        f"taking over the stale lock {self.path} ({self.describe(holder)}): {reason}", RuntimeWarning, stacklevel=3
      )
      self.path.unlink(missing_ok=True)
    holder = self._read() or {}
    return self.describe(holder)

  def __enter__(self) -> RunLock:
    holder = self._acquire_on_process_zero() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      refused = bool(multihost_utils.broadcast_one_to_all(np.int32(holder is not None)))
      holder = holder or ("another trainer (see process 0)" if refused else None)
    if holder is not None:
      raise errors.RunLockedError(
        f"{self.model_dir} is in use by another trainer ({holder}); two trainers would overwrite each other's "
        f"checkpoints. Wait for it to finish, stop it, or choose another MODEL_DIR. If that trainer is gone, "
        f"delete {self.path}."
      )
    if self._record is not None:
      RunLock._held_tokens.add(self._record["token"])
      self._stop.clear()
      self._heartbeat_thread = threading.Thread(target=self._heartbeat, name="lsm_jax-run-lock", daemon=True)
      self._heartbeat_thread.start()
    return self

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      current = self._read()
      if not current or current.get("token") != self._record["token"]:
        warnings.warn(
          f"{self.path} was taken over by {self.describe(current or {})} while this trainer runs",
          RuntimeWarning,
          stacklevel=1,
        )
        return
      self._record["heartbeat_unix"] = time.time()
      try:
        _write_json_atomically(self.path, self._record)
      except OSError as error:  # a full disk must not kill training; the next beat retries
        warnings.warn(f"could not refresh {self.path}: {error}", RuntimeWarning, stacklevel=1)

  def __exit__(self, *exc_info) -> None:
    if self._record is None:
      return
    self._stop.set()
    if self._heartbeat_thread is not None:
      self._heartbeat_thread.join()
    RunLock._held_tokens.discard(self._record["token"])
    if (self._read() or {}).get("token") == self._record["token"]:
      self.path.unlink(missing_ok=True)
    self._record = None


class Checkpointer:
  """The two checkpoint managers of one run. Every process calls every method (Orbax saves collectively).

  Training loop protocol (trainer): `restore_latest(abstract_state)` once; if it returns None call
  `save(0, state)` (milestone 0 = initialization); after each step call `check_background_saves()`, poll
  `reached_preemption(step)` once, then `save(step, state, metadata=...)` and stop if it was True; after the last
  step `save(last, state, force=True)`; finally `close()`.
  """

  def __init__(
    self,
    model_dir: str,
    *,
    save_interval_steps: int,
    max_to_keep: int,
    milestone_steps: Iterable[int],
    milestone_dtype: str = "bfloat16",
    async_save: bool = True,
    run_metadata: Mapping[str, Any],
  ):
    if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be a positive int, got {max_to_keep!r}")
    if milestone_dtype not in MILESTONE_DTYPES:
      raise ValueError(f"milestone_dtype must be one of {MILESTONE_DTYPES}, got {milestone_dtype!r}")
    steps = list(milestone_steps)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in steps):
      raise ValueError(f"milestone_steps must be non-negative ints, got {steps!r}")
    if not isinstance(run_metadata, Mapping):
      raise TypeError(f"run_metadata must be a dict, got {type(run_metadata).__name__}")

    self.model_dir = _as_path(model_dir)
    self.save_interval_steps = save_interval_steps
    self.milestone_steps = sorted({int(s) for s in steps})
    self.milestone_dtype = milestone_dtype
    self.run_metadata = _jsonable(
      {
        **run_metadata,
        "milestone_steps": self.milestone_steps,
        "milestone_dtype": milestone_dtype,
        "save_interval_steps": save_interval_steps,
        "max_to_keep": max_to_keep,
        "code_version": run_metadata.get("code_version") or code_version(),
      },
      "run_metadata",
    )
    if jax.process_index() == 0:
      self.model_dir.mkdir(parents=True, exist_ok=True)
      _write_json_atomically(self.model_dir / RUN_METADATA_FILE, self.run_metadata)

    policies = ocp.checkpoint_managers
    self._resume = ocp.CheckpointManager(
      self.model_dir / "checkpoints" / "resume",
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="resume"),
        save_decision_policy=policies.AnySavePolicy(
          [policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()]
        ),
      ),
    )
    # Milestones are saved on exactly `milestone_steps` (decided in `save`) and never deleted.
    # Both managers name their multi-process barriers after the step ("async_commit_complete.<step>"); when
    # they save the same step concurrently the barriers collide unless each has its own prefix.
    self._milestones = ocp.CheckpointManager(
      self.model_dir / "checkpoints" / "milestones",
      options=ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="milestones"),
      ),
    )

    # With jax.distributed, JAX's preemption notifier owns SIGTERM and `reached_preemption_sync_point` reports
    # it; in a single process that service does not run, so a Python handler records the signal instead.
    self._sigterm_received = False
    self._previous_sigterm_handler = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_sigterm_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._preemption_step: int | None = None
    # Manifests are written once a save has committed, off the training thread, by process 0.
    self._unmanifested: list[tuple[Any, epath.Path]] = []  # (manager, step directory)
    self._manifest_writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsm_jax-manifest")
    self._manifest_jobs: list[concurrent.futures.Future] = []
    self.saved_resume_steps: list[int] = []  # resume checkpoints this Checkpointer saved
    self._latest_save_dirs: dict[str, epath.Path] = {}  # "milestone" / "resume" -> step directory being written
    self._started_save_dirs: list[epath.Path] = []  # every step directory this Checkpointer began to write
    self._unchecked_saves: dict[str, Any] = {}  # "milestone" / "resume" -> manager whose last save is unchecked
    self._save_failure: CheckpointSaveError | None = None
    _save_failure_echoes.attach()
    self._dropping_save_failure_echoes = True

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._sigterm_received = True

  def reached_preemption(self, step: int) -> bool:
    """True once a preemption notice (SIGTERM) reached every process; the caller saves and stops at `step`."""
    if self._preemption_step is not None:
      return step >= self._preemption_step
    if self._sigterm_received or self._resume.reached_preemption(int(step)):
      self._preemption_step = int(step)
      return True
    return False

  def _preemption_noticed_by(self, step: int) -> bool:
    # Only what reached_preemption has already seen: a signal arriving between the trainer's poll and its save
    # must not turn that save into the last one while the trainer goes on.
    return self._preemption_step is not None and step >= self._preemption_step

  def _checkpoint_metadata(self, step: int, metadata: Mapping[str, Any] | None) -> dict:
    record = {
      key: self.run_metadata[key]
      for key in ("arch", "size", "model_config", "code_version")
      if key in self.run_metadata
    }
    batch_tokens = self.run_metadata.get("global_batch_size"), self.run_metadata.get("seq_len")
    if all(isinstance(value, int) for value in batch_tokens):
      record["tokens_seen"] = step * batch_tokens[0] * batch_tokens[1]
    if isinstance(self.run_metadata.get("flops_per_step"), (int, float)):
      record["compute_pflops_days"] = step * self.run_metadata["flops_per_step"] / PFLOP_S_DAY
    gin_path = self.model_dir / "config.gin"
    if gin_path.exists():
      record["gin_config"] = gin_path.read_text()
    record.update(_jsonable(dict(metadata or {}), "metadata"))
    record["step"] = step
    record["saved_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return record

  def _saves_due(self, step: int, force: bool) -> tuple[bool, bool]:
    """(milestone due, resume checkpoint due) at `step`."""
    milestone = step in self.milestone_steps and step not in self._milestones.all_steps()
    # Orbax's policies decide the regular saves (every K steps; preemption through JAX's sync point). Step 0,
    # the untrained initialization, needs no resume checkpoint unless forced.
    resume = step not in self._resume.all_steps() and (
      force or self._preemption_noticed_by(step) or (step > 0 and self._resume.should_save(step))
    )
    return milestone, resume

  def save_due(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, force=force)` would write a checkpoint (the trainer checks the loss first)."""
    return any(self._saves_due(int(step), force))

  def save(
    self, step: int, state: Mapping[str, Any], *, force: bool = False, metadata: Mapping[str, Any] | None = None
  ) -> None:
    """Saves the milestone (step in milestone_steps) and the resume checkpoint (interval, force or preemption)."""
    step = int(step)
    if not isinstance(state, Mapping) or "params" not in state:
      raise ValueError(
        f"state must be a dict with at least 'params' (train state: params, opt_state, step, rng); "
        f"got {type(state).__name__} with keys {list(state) if isinstance(state, Mapping) else None}"
      )
    self._write_committed_manifests()
    save_milestone, save_resume = self._saves_due(step, force)
    if not (save_milestone or save_resume):
      return
    record = self._checkpoint_metadata(step, metadata)
    with self._reporting_save_failures():
      if save_milestone:
        params = _cast_floating(state["params"], self.milestone_dtype)
        milestone_record = {**record, "param_layout": _param_layout(params), "dtype": self.milestone_dtype}
        self._latest_save_dirs["milestone"] = epath.Path(self._milestones.directory) / str(step)
        self._started_save_dirs.append(self._latest_save_dirs["milestone"])
        self._milestones.save(
          step,
          force=True,
          args=ocp.args.Composite(
            **{_PARAMS_ITEM: ocp.args.StandardSave(params), _METADATA_ITEM: ocp.args.JsonSave(milestone_record)}
          ),
        )
        self._unmanifested.append((self._milestones, epath.Path(self._milestones.directory) / str(step)))
        self._unchecked_saves["milestone"] = self._milestones
      if save_resume:
        self._latest_save_dirs["resume"] = epath.Path(self._resume.directory) / str(step)
        self._started_save_dirs.append(self._latest_save_dirs["resume"])
        self._resume.save(
          step,
          force=True,
          args=ocp.args.Composite(
            **{_STATE_ITEM: ocp.args.StandardSave(dict(state)), _METADATA_ITEM: ocp.args.JsonSave(record)}
          ),
        )
        self._unmanifested.append((self._resume, epath.Path(self._resume.directory) / str(step)))
        self._unchecked_saves["resume"] = self._resume
        self.saved_resume_steps.append(step)
    self._write_committed_manifests()

  @contextlib.contextmanager
  def _reporting_save_failures(self):
    """Turns a failed write, raised now or left by an asynchronous save, into one CheckpointSaveError naming the
    checkpoint and the cause. Orbax writes into a temporary directory and deletes old checkpoints only after a
    save committed, so the checkpoints saved before stay intact. Once reported, the same failure seen again
    (Orbax re-raising it while closing) is not raised twice."""
    try:
      yield
    except CheckpointSaveError:
      raise
    except Exception as error:  # Orbax and TensorStore raise ValueError, OSError, ... for a failed write
      if self._save_failure is not None:
        return
      text = str(error)
      # An asynchronous save's failure surfaces when the next save starts, so the failed one may be older than
      # the latest: the cause names its temporary directory.
      named = [path for path in self._started_save_dirs if f"{path}.orbax-checkpoint-tmp" in text]
      paths = named or list(self._latest_save_dirs.values()) or [self.model_dir / "checkpoints"]
      self._save_failure = CheckpointSaveError(
        f"saving checkpoint {' and '.join(map(str, paths))} failed: {_failure_cause(error)}. The checkpoints "
        f"saved before it are intact; free space or fix permissions under {self.model_dir}, then restart to "
        f"resume from the latest one."
      )
      raise self._save_failure from error

  def _write_committed_manifests(self, *, wait: bool = False) -> None:
    """Queues the manifests of saves that have committed (all of them with `wait`, after waiting)."""
    waiting = []
    for manager, step_dir in self._unmanifested:
      if wait or not manager.is_saving_in_progress():
        if jax.process_index() == 0:
          self._manifest_jobs.append(self._manifest_writer.submit(self._write_manifest_if_present, step_dir))
      else:
        waiting.append((manager, step_dir))
    self._unmanifested = waiting
    if wait:
      for job in self._manifest_jobs:
        job.result()
    self._manifest_jobs = [job for job in self._manifest_jobs if not job.done()]

  @staticmethod
  def _write_manifest_if_present(step_dir: epath.Path) -> None:
    if not step_dir.is_dir():  # rotated away (max_to_keep) before its manifest was due
      return
    try:
      write_manifest(step_dir)
    except OSError as error:  # a full disk leaves the checkpoint unverified, not training dead
      warnings.warn(f"could not write the manifest of {step_dir}: {error}", RuntimeWarning, stacklevel=1)

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest complete resume checkpoint into `abstract_state`'s shapes, dtypes and shardings.

    Checkpoints that are incomplete, fail their manifest's checksums or fail to restore are skipped with a
    warning naming their directory; once an older one restores, the skipped newer ones are moved to
    checkpoints/quarantine/ so later saves at those steps are possible. A checkpoint without a manifest restores
    with an "unverified" warning. Returns None when there is no checkpoint; raises when checkpoints exist but none
    restores (so a run never silently restarts from scratch over them).
    """
    _check_abstract_state(abstract_state)
    self._resume.reload()
    skipped = []
    for step in sorted(self._resume.all_steps(), reverse=True):
      step_dir = epath.Path(self._resume.directory) / str(step)
      problem = _incomplete_reason(step_dir, (_STATE_ITEM, _METADATA_ITEM))
      verified = False
      if problem is None:
        verified, problem = _verify_on_process_zero(step_dir)
      if problem is None:
        try:
          restored = self._resume.restore(
            step,
            args=ocp.args.Composite(
              **{_STATE_ITEM: ocp.args.StandardRestore(abstract_state), _METADATA_ITEM: ocp.args.JsonRestore()}
            ),
          )
        except Exception as error:  # Orbax/TensorStore raise many types for damaged files.
          problem = f"restoring it failed: {type(error).__name__}: {str(error)[:300]}"
      if problem is not None:
        warnings.warn(f"skipping resume checkpoint {step_dir}: {problem}", RuntimeWarning, stacklevel=2)
        skipped.append((step, step_dir, problem))
        continue
      if not verified:
        warnings.warn(
          f"resume checkpoint {step_dir} has no {MANIFEST_FILE} (saved by an older lsm_jax, or the "
          f"process stopped before writing it): restored unverified",
          RuntimeWarning,
          stacklevel=2,
        )
      for _, skipped_dir, problem in skipped:
        _move_to_quarantine(self.model_dir, [skipped_dir], f"skipped on restore: {problem}")
      self._resume.reload()
      return restored[_STATE_ITEM], step
    if skipped:
      details = "; ".join(f"{step_dir}: {problem}" for _, step_dir, problem in skipped)
      raise UnrestorableCheckpointsError(
        f"none of the resume checkpoints under {self._resume.directory} could be restored ({details}). Check that "
        f"the model and optimizer match the run, or move these directories away to start from scratch."
      )
    return None

  def check_background_saves(self) -> None:
    """Raises the CheckpointSaveError of an asynchronous save that failed; returns at once while saves run.

    Polled every step, so a failed write (a full disk) stops training at the next step rather than at the next
    save, which may be hours later.
    """
    for kind, manager in list(self._unchecked_saves.items()):
      if manager.is_saving_in_progress():
        continue
      del self._unchecked_saves[kind]
      with self._reporting_save_failures():
        manager.wait_until_finished()  # a finished save returns at once; a failed one raises its error

  def resume_steps(self) -> list[int]:
    """Steps of the resume checkpoints on disk (finished saves only)."""
    self._resume.reload()
    return sorted(self._resume.all_steps())

  def wait_until_finished(self) -> None:
    """Waits for asynchronous saves and their manifests."""
    with self._reporting_save_failures():
      self._resume.wait_until_finished()
      self._milestones.wait_until_finished()
    self._write_committed_manifests(wait=True)

  def close(self) -> None:
    """Waits for asynchronous saves and manifests, releases the managers, restores the previous SIGTERM handler."""
    try:
      with self._reporting_save_failures():
        try:
          self._resume.close()
        finally:
          self._milestones.close()
      self._write_committed_manifests(wait=True)
    finally:
      self._manifest_writer.shutdown()
      if self._dropping_save_failure_echoes:
        _save_failure_echoes.detach()
        self._dropping_save_failure_echoes = False
      if self._previous_sigterm_handler is not None:
        signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
        self._previous_sigterm_handler = None


def _milestones_dir(run_dir: str) -> epath.Path:
  directory = _as_path(run_dir) / "checkpoints" / "milestones"
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} does not exist: run_dir must be a MODEL_DIR with milestone checkpoints")
  return directory


def _step_numbers(directory: epath.Path) -> list[int]:
  """Finished step directories are named by their number; saves in progress have temporary names."""
  return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def list_milestones(run_dir: str) -> list[int]:
  """Steps of the complete milestone checkpoints of a run; incomplete ones are skipped with a warning.

  Reads the directory itself (no CheckpointManager), so evaluation can list a run that is still training;
  saves in progress live in temporary directories whose names are not plain step numbers.
  """
  directory = _milestones_dir(run_dir)
  complete = []
  for step in _step_numbers(directory):
    step_dir = directory / str(step)
    problem = _incomplete_reason(step_dir, (_PARAMS_ITEM, _METADATA_ITEM))
    if problem:
      warnings.warn(f"skipping milestone checkpoint {step_dir}: {problem}", RuntimeWarning, stacklevel=2)
    else:
      complete.append(step)
  return complete


def resolve_milestone(path: str, step: int | None = None, *, path_name: str, step_name: str) -> tuple[str, int]:
  """(run directory, milestone step) of `path`: a run directory (milestone `step`, default its last complete one)
  or one milestone directory RUN_DIR/checkpoints/milestones/<step>. `path_name` and `step_name` name the two
  settings in the errors (e.g. "--checkpoint" and "--step")."""
  if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
    raise ValueError(f"{step_name} must be None (the last milestone) or a milestone step >= 0, got {step!r}")
  directory = _as_path(path)
  if directory.name.isdigit() and directory.parent.name == "milestones":
    named_step = int(directory.name)
    if step is not None and step != named_step:
      raise ValueError(f"{step_name}={step} contradicts the milestone directory {path_name}={directory}")
    return str(directory.parent.parent.parent), named_step
  if not (directory / "checkpoints" / "milestones").is_dir():
    raise ValueError(
      f"{path_name}={directory} must be a run directory (with checkpoints/milestones/) or a milestone directory "
      f"MODEL_DIR/checkpoints/milestones/<step>"
    )
  steps = list_milestones(str(directory))
  if not steps:
    raise ValueError(f"{path_name}={directory} has no complete milestone checkpoint")
  if step is not None and step not in steps:
    raise ValueError(f"{step_name}={step} is not a complete milestone of {directory}; its milestones: {steps}")
  return str(directory), steps[-1] if step is None else int(step)


def milestone_metadata(run_dir: str, step: int) -> dict:
  """The metadata item of milestone `step` (model_config, param_layout, tokens_seen, ...), without reading the
  parameters or checking their files (load_milestone does)."""
  step_dir = _milestone_step_dir(run_dir, step)
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
    return reader.restore(step_dir / _METADATA_ITEM)


def nearest_intact_milestones(run_dir: str, step: int) -> list[int]:
  """The closest complete milestone before `step` and the closest after it whose files match their manifests
  (a milestone without a manifest counts: it loads with a warning). Checks outwards from `step`, so a run with
  one damaged milestone reads two others, not all of them."""
  steps = [other for other in list_milestones(run_dir) if other != step]
  directory = _milestones_dir(run_dir)

  def first_intact(candidates):
    for candidate in candidates:
      try:
        verify_manifest(directory / str(candidate))
      except CorruptCheckpointError:
        continue
      return [candidate]
    return []

  earlier = [other for other in steps if other < step]
  later = [other for other in steps if other > step]
  return first_intact(reversed(earlier)) + first_intact(later)


def intact_alternatives(error: CorruptCheckpointError) -> str:
  """For a damaged milestone: which milestones of its run to use instead, e.g. 'intact milestones nearest to step
  8: 1 and 10 (the run's milestones: 0, 1, 8, 10)'."""
  step_dir = error.step_dir
  if step_dir.parent.name != "milestones" or not step_dir.name.isdigit():
    return f"{step_dir} is not a milestone directory"
  run_dir, step = str(step_dir.parent.parent.parent), int(step_dir.name)
  nearest = nearest_intact_milestones(run_dir, step)
  every = ", ".join(map(str, list_milestones(run_dir)))
  if not nearest:
    return f"no other milestone of {run_dir} is intact (its milestones: {every})"
  nearest_text = " and ".join(map(str, nearest))
  return f"intact milestones nearest to step {step}: {nearest_text} (the run's milestones: {every})"


def _milestone_step_dir(run_dir: str, step: int) -> epath.Path:
  """The directory of complete milestone `step`; ValueError naming the available steps otherwise."""
  directory = _milestones_dir(run_dir)
  steps = _step_numbers(directory)
  if step not in steps:
    raise ValueError(f"no milestone at step {step} in {directory}; available steps: {steps}")
  step_dir = directory / str(step)
  problem = _incomplete_reason(step_dir, (_PARAMS_ITEM, _METADATA_ITEM))
  if problem:
    raise ValueError(f"milestone checkpoint {step_dir} is incomplete: {problem}")
  return step_dir


def load_milestone(run_dir: str, step: int, *, dtype: str | None = None, sharding: Any = None) -> tuple[dict, dict]:
  """Params (pure nested dict) and metadata of milestone `step`; no model code needed.

  dtype: cast floating params on restore (default: as saved). sharding (an extension of the interface, for
  sharded evaluation): one jax Sharding for every leaf, or a pure dict of Shardings shaped like the params;
  default: the first local device.

  Raises CorruptCheckpointError when a file differs from the milestone's manifest (nothing is returned, so
  evaluation and export never see damaged weights); a milestone without a manifest loads with a warning.
  """
  if dtype is not None and dtype not in MILESTONE_DTYPES:
    raise ValueError(f"dtype must be None or one of {MILESTONE_DTYPES}, got {dtype!r}")
  step_dir = _milestone_step_dir(run_dir, step)
  if not verify_manifest(step_dir):
    warnings.warn(
      f"milestone checkpoint {step_dir} has no {MANIFEST_FILE} (saved by an older lsm_jax, or the "
      f"trainer stopped before writing it): loaded unverified",
      RuntimeWarning,
      stacklevel=2,
    )
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
    metadata = reader.restore(step_dir / _METADATA_ITEM)

  def abstract_leaf(entry):
    saved = jnp.dtype(entry["dtype"])
    wanted = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(saved, jnp.floating) else saved
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), wanted)

  abstract_params = _nested_dict_from_layout(metadata["param_layout"], abstract_leaf)
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    target = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: target, abstract_params)
  else:
    shardings = sharding
    if jax.tree.structure(shardings) != jax.tree.structure(abstract_params):
      raise ValueError(
        f"sharding must be one jax Sharding or a dict of Shardings shaped like the params of "
        f"{step_dir}; got a tree with structure {jax.tree.structure(shardings)}"
      )
  abstract_params = jax.tree.map(
    lambda leaf, target: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target), abstract_params, shardings
  )
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(step_dir / _PARAMS_ITEM, abstract_params)
  return params, metadata
