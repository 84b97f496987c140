"""Training metrics: device peak FLOP/s for MFU, memory plans and limits, step timing, and the writers
(metrics.jsonl, TensorBoard, console)."""

import collections
import json
import math
import os
import time
from typing import Mapping

import jax

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no structured sparsity). Matched as a
# case-insensitive substring of `device.device_kind`; the first match wins, so longer names come first.
PEAK_BF16_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (
  ("h200", 989e12),
  ("h100", 989e12),
  ("h800", 989e12),
  ("a100", 312e12),
  ("tpu v6", 918e12),  # v6e (Trillium) reports "TPU v6 lite"
  ("tpu v5p", 459e12),
  ("tpu v5 lite", 197e12),  # v5e
  ("tpu v5e", 197e12),
  ("tpu v5", 459e12),
  ("tpu v4", 275e12),
  ("cpu", 1e12),  # nominal, so CPU runs print a finite, comparable MFU; not a measured peak
)


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float:
  """Peak FLOP/s of one device; `override` (e.g. from gin) wins over the table."""
  if override is not None:
    if override <= 0:
      raise ValueError(f"peak FLOP/s override must be positive, got {override}")
    return float(override)
  kind = device_kind.lower()
  for pattern, peak in PEAK_BF16_FLOPS_BY_DEVICE_KIND:
    if pattern in kind:
      return peak
  raise ValueError(
    f"no peak FLOP/s known for device kind {device_kind!r}; known: "
    f"{', '.join(p for p, _ in PEAK_BF16_FLOPS_BY_DEVICE_KIND)}. "
    "Set trainer.train.peak_flops_per_device in gin."
  )


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> dict[str, int] | None:
  """XLA's per-device memory plan of a compiled program (buffer assignment: the same number whatever ran
  before in the process): argument, output, alias, temp and generated-code bytes, and their total, in which
  donated inputs that alias outputs count once. None where the backend reports no plan."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  parts = {
    "argument": int(memory.argument_size_in_bytes),
    "output": int(memory.output_size_in_bytes),
    "alias": int(memory.alias_size_in_bytes),
    "temp": int(memory.temp_size_in_bytes),
    "generated_code": int(memory.generated_code_size_in_bytes),
  }
  parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
  return parts


def device_memory_limit_bytes(devices) -> int | None:
  """The smallest allocator limit (`memory_stats()["bytes_limit"]`) among `devices`; None where a device
  reports none (CPU)."""
  limits = []
  for device in devices:
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def peak_memory_gib(devices) -> float | None:
  """The largest `peak_bytes_in_use` among `devices` in GiB, None where devices report no memory statistics."""
  peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in devices]
  return None if not peaks or None in peaks else max(peaks) / (1 << 30)


def is_out_of_memory(error: BaseException) -> bool:
  """Whether a JAX/XLA error is a failed allocation (at compile or run time)."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class StepTimer:
  """Wall-clock and compiled-step time of the steps of a loop that runs ahead of the device.

  Call `dispatching()` right before each step is dispatched and `completed()` once the host has seen that step
  finish (its metrics fetched), in step order. A step's wall time runs from the previous step's completion
  (or the timer's start) to its own: data, evaluation, checkpoints and host work all count. Its step time runs
  from the later of its dispatch and the previous completion to its completion: the device's time on the step
  as far as the host can see it. `interval()` averages both over the steps completed since its last call.
  """

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self._dispatch_times = collections.deque()
    self._previous_completion = clock()
    self._interval_wall = self._interval_step = 0.0
    self._interval_steps = 0

  def dispatching(self) -> None:
    self._dispatch_times.append(self._clock())

  def completed(self) -> None:
    now = self._clock()
    started = max(self._dispatch_times.popleft(), self._previous_completion)
    self._interval_wall += now - self._previous_completion
    self._interval_step += now - started
    self._interval_steps += 1
    self._previous_completion = now

  def interval(self) -> tuple[float, float]:
    """(wall seconds per step, step seconds per step) since the previous call."""
    if not self._interval_steps:
      raise ValueError("StepTimer.interval() needs a completed step since its previous call")
    averages = self._interval_wall / self._interval_steps, self._interval_step / self._interval_steps
    self._interval_wall = self._interval_step = 0.0
    self._interval_steps = 0
    return averages


def throughput(
  wall_time_s: float, step_time_s: float, *, tokens_per_step: int, flops_per_step: float, peak_flops: float
) -> dict[str, float]:
  """Per-step throughput scalars: `tokens_per_sec` and `mfu` by wall clock, `step_*` by compiled-step time.

  `peak_flops` is the peak of all devices together.
  """
  return {
    "tokens_per_sec": tokens_per_step / wall_time_s,
    "mfu": flops_per_step / wall_time_s / peak_flops,
    "wall_time_s": wall_time_s,
    "step_tokens_per_sec": tokens_per_step / step_time_s,
    "step_mfu": flops_per_step / step_time_s / peak_flops,
    "step_time_s": step_time_s,
  }


def _jsonable(value):
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 writes; other processes keep the same call sequence and do nothing.
  """

  def __init__(self, model_dir: str, *, enable_tensorboard: bool = True):
    self.is_writer = jax.process_index() == 0
    self.jsonl_path = os.path.join(model_dir, "metrics.jsonl")
    self._jsonl = None
    self._tensorboard = None
    if not self.is_writer:
      return
    os.makedirs(model_dir, exist_ok=True)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    if enable_tensorboard:
      from tensorboardX import SummaryWriter  # heavy import; only the writing process needs it

      self._tensorboard = SummaryWriter(os.path.join(model_dir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.is_writer:
      return
    record = {"step": int(step), **{key: _jsonable(value) for key, value in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tensorboard is not None:
      for key in scalars:
        if isinstance(record[key], (int, float)):
          self._tensorboard.add_scalar(key, record[key], int(step))

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    if self.is_writer and self._tensorboard is not None:
      self._tensorboard.add_text(tag, text, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def read_metrics(model_dir: str) -> list[dict]:
  path = os.path.join(model_dir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def format_progress(scalars: Mapping[str, float]) -> str:
  """Short postfix for the console progress bar."""
  parts = [f"loss={scalars['loss']:.4f}"]
  if "val_loss" in scalars:
    parts.append(f"val={scalars['val_loss']:.4f}")
  parts.append(f"tok/s={scalars['tokens_per_sec']:.3g}")
  parts.append(f"mfu={100 * scalars['mfu']:.1f}%")
  return " ".join(parts)
