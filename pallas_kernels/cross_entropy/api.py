"""Backend choice for the loss's row statistics and softmax gradient: XLA's forms or the Pallas GPU kernels."""

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.cross_entropy.gpu import row_log_normalizer_and_pick_gpu, softmax_gradient_gpu

BACKENDS = backends.BACKENDS

# What "auto" runs on a GPU: with the kernel, TNL 1B's whole fused loss at 8K (head matmuls, statistics, gradient)
# took 53.4 ms against 57.2 ms with XLA's statistics on an H200 (benchmarks/results/cross_entropy_h200.md).
GPU_DEFAULT = "pallas_gpu"
# What "auto" runs for the softmax gradient on a GPU: the kernel. With both GPU kernels TNL 1B's training step at 8K
# was the fastest of five variants on an H100 (benchmarks/results/train_step_h100_tnl_gpu_options.md).
GPU_GRADIENT_DEFAULT = "pallas_gpu"


def resolve_backend(backend: str, platform: str | None = None, gpu_default: str | None = None) -> str:
  """Maps "auto" to the backend for `platform` ("tpu", "gpu", "cpu"; None: the default device's): on a GPU
  `gpu_default` (None: the row statistics' GPU_DEFAULT)."""
  return backends.resolve_backend("cross-entropy", backend, gpu_default or GPU_DEFAULT, platform)


def row_log_normalizer_and_pick_xla(logits, targets):
  log_normalizer = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return log_normalizer, picked


def row_log_normalizer_and_pick(logits, targets, *, backend: str = "auto", config=None):
  """(logsumexp(logits) over the last axis, logits[..., target]), both fp32 of shape targets.shape: the two row
  statistics of a cross-entropy, loss = log-normaliser − picked. No gradient: the loss's custom VJP forms its
  own. `config`: a gpu.RowStatsConfig for "pallas_gpu" (None: the default)."""
  backend = resolve_backend(backend)
  if backend == "pallas_gpu":
    return row_log_normalizer_and_pick_gpu(logits, targets, config)
  return row_log_normalizer_and_pick_xla(logits, targets)


def softmax_gradient_xla(logits, log_normalizer, targets, weights, dtype):
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  gradient = jnp.exp(logits.astype(jnp.float32) - log_normalizer[..., None]) - (vocab == targets[..., None])
  return (gradient * weights[..., None]).astype(dtype)


def softmax_gradient(logits, log_normalizer, targets, weights, dtype, *, backend: str = "auto", config=None):
  """(softmax(logits) − one-hot(target)) · weight in `dtype`, the shape of logits [..., V]: the gradient of
  Σ weight · cross-entropy with respect to the logits, from the fp32 log-normaliser [...] of
  `row_log_normalizer_and_pick`, int targets [...] and fp32 row weights [...] (the loss mask). Computed in fp32.
  "auto" on a GPU: GPU_GRADIENT_DEFAULT. `config`: a gpu.SoftmaxGradConfig for "pallas_gpu" (None: the default)."""
  backend = resolve_backend(backend, gpu_default=GPU_GRADIENT_DEFAULT)
  if backend == "pallas_gpu":
    return softmax_gradient_gpu(logits, log_normalizer, targets, weights, dtype, config)
  return softmax_gradient_xla(logits, log_normalizer, targets, weights, dtype)
