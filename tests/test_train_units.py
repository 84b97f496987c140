"""Pieces of the trainer checked against independent references: the MFU peak table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm_jax import metrics


@pytest.mark.parametrize(
  "device_kind, peak",
  [
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("cpu", 1e12),
  ],
)
def test_peak_flops_table(device_kind, peak):
  assert metrics.peak_flops_per_device(device_kind) == peak


def test_peak_flops_override_and_unknown_device():
  assert metrics.peak_flops_per_device("NVIDIA H200", 5e14) == 5e14
  with pytest.raises(ValueError, match="no peak FLOP/s known for device kind 'Quantum Abacus'.*h200"):
    metrics.peak_flops_per_device("Quantum Abacus")
  with pytest.raises(ValueError, match="must be positive"):
    metrics.peak_flops_per_device("cpu", 0.0)


def test_metrics_writer_appends_json_lines(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), enable_tensorboard=True)
  writer.write(1, {"loss": np.float32(2.5), "tokens_seen": 128})
  writer.write(2, {"loss": 2.0, "tokens_seen": 256, "val_loss": 2.25})
  writer.close()
  assert metrics.read_metrics(str(tmp_path)) == [
    {"step": 1, "loss": 2.5, "tokens_seen": 128},
    {"step": 2, "loss": 2.0, "tokens_seen": 256, "val_loss": 2.25},
  ]
  assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())


def test_compiled_memory_bytes_counts_donated_buffers_once():
  """4 KiB in, 4 KiB out: donated, the output reuses the input's buffer, so the plan holds 4 KiB, not 8."""
  x = jnp.ones(1024, jnp.float32)
  donated = metrics.compiled_memory_bytes(jax.jit(lambda x: x * 2, donate_argnums=0).lower(x).compile())
  kept = metrics.compiled_memory_bytes(jax.jit(lambda x: x * 2).lower(x).compile())
  assert donated["argument"] == donated["output"] == 4096 and donated["alias"] == 4096
  assert donated["total"] == 4096 + donated["temp"] + donated["generated_code"]
  assert kept["alias"] == 0 and kept["total"] == 8192 + kept["temp"] + kept["generated_code"]


@pytest.mark.parametrize(
  "text, expected",
  [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 96.12GiB", True),
    ("CUDA out of memory. Tried to allocate 12.24 GiB", True),
    ("INVALID_ARGUMENT: shapes do not match", False),
  ],
)
def test_is_out_of_memory(text, expected):
  assert metrics.is_out_of_memory(RuntimeError(text)) is expected
