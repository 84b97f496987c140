"""Backend choice for the RMS norms: XLA's form or the Pallas GPU kernels."""

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.rms_norm.gpu import gated_rms_norm_gpu, residual_rms_norm_gpu

BACKENDS = backends.BACKENDS

# What "auto" runs on a GPU: the kernels made the 1B training step at 8K 1.1-1.5% faster than XLA's norms for TNL,
# HGRN2 and cosFormer2 on an H200 (benchmarks/results/train_step_h200_norms.md). Elsewhere XLA's form runs.
GPU_DEFAULT = "pallas_gpu"


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps "auto" to the backend for `platform` ("tpu", "gpu", "cpu"; None: the default device's)."""
  return backends.resolve_backend("rms-norm", backend, GPU_DEFAULT, platform)


def residual_rms_norm_xla(x, delta=None, *, eps):
  s = x if delta is None else x + delta
  s32 = s.astype(jnp.float32)
  return s, (s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)).astype(s.dtype)


def residual_rms_norm(x, delta=None, *, eps: float, backend: str = "auto", config=None):
  """(s, y): the residual stream s = x + delta (x when delta is None) and y = s / sqrt(mean(s²) + eps) over the
  last axis (no gain: OpenNLPLab's SimpleRMSNorm), both in x's dtype.

  Returning s lets a pre-norm block carry the stream through the norm: the fused backward adds the stream's own
  cotangent to the norm's in the same pass. `config`: a gpu.NormConfig for "pallas_gpu" (None: tuned default)."""
  backend = resolve_backend(backend)
  if backend == "pallas_gpu":
    return residual_rms_norm_gpu(x, delta, eps=eps, config=config)
  return residual_rms_norm_xla(x, delta, eps=eps)


def gated_rms_norm_xla(x, gate_logits=None, *, eps):
  x32 = x.astype(jnp.float32)
  normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
  return normed if gate_logits is None else normed * jax.nn.sigmoid(gate_logits)


def gated_rms_norm(x, gate_logits=None, *, eps: float, backend: str = "auto", config=None):
  """y = x / sqrt(mean(x²) + eps) · sigmoid(gate_logits) over the last axis, in x's dtype; without gate_logits
  the norm alone. The output norm and gate of a token mixer (TNL, cosFormer2; HGRN2 has no gate)."""
  backend = resolve_backend(backend)
  if backend == "pallas_gpu":
    return gated_rms_norm_gpu(x, gate_logits, eps=eps, config=config)
  return gated_rms_norm_xla(x, gate_logits, eps=eps)
