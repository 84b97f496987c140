"""Training metrics: device peak FLOP/s for MFU, and the writers (metrics.jsonl, TensorBoard, console)."""
import json
import math
import os
from typing import Mapping

import jax

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no structured sparsity). Matched as a
# case-insensitive substring of `device.device_kind`; the first match wins, so longer names come first.
PEAK_BF16_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("h800", 989e12),
    ("a100", 312e12),
    ("tpu v6", 918e12),   # v6e (Trillium) reports "TPU v6 lite"
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
  raise ValueError(f"no peak FLOP/s known for device kind {device_kind!r}; known: "
                   f"{', '.join(p for p, _ in PEAK_BF16_FLOPS_BY_DEVICE_KIND)}. "
                   "Set trainer.train.peak_flops_per_device in gin.")


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> dict[str, int] | None:
  """XLA's per-device memory plan of a compiled program (buffer assignment: the same number whatever ran
  before in the process): argument, output, alias, temp and generated-code bytes, and their total, in which
  donated inputs that alias outputs count once. None where the backend reports no plan."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  parts = {"argument": int(memory.argument_size_in_bytes), "output": int(memory.output_size_in_bytes),
           "alias": int(memory.alias_size_in_bytes), "temp": int(memory.temp_size_in_bytes),
           "generated_code": int(memory.generated_code_size_in_bytes)}
  parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
  return parts


def is_out_of_memory(error: BaseException) -> bool:
  """Whether a JAX/XLA error is a failed allocation (at compile or run time)."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


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
      for key, value in scalars.items():
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
