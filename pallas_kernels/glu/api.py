"""Backend choice for a fused GLU's product: XLA's autodiff or the Pallas GPU kernel for its gradient."""

import functools

import jax

from pallas_kernels import backends
from pallas_kernels.glu.gpu import glu_gradient_gpu

BACKENDS = backends.BACKENDS

# What "auto" runs on a GPU: the kernel. TNL 1B's training step at 8K was faster with it than with XLA's autodiff on
# an H100 (benchmarks/results/train_step_h100_tnl_gpu_options.md).
GPU_DEFAULT = "pallas_gpu"


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps "auto" to the backend for `platform` ("tpu", "gpu", "cpu"; None: the default device's)."""
  return backends.resolve_backend("GLU", backend, GPU_DEFAULT, platform)


def _product(both, swish):
  up, gate = both[..., 0, :], both[..., 1, :]
  return up * (jax.nn.silu(gate) if swish else gate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _product_with_kernel_gradient(both, swish, config):
  return _product(both, swish)


def _forward(both, swish, config):
  return _product(both, swish), both


def _backward(swish, config, both, d_hidden):
  return (glu_gradient_gpu(d_hidden, both, swish=swish, config=config),)


_product_with_kernel_gradient.defvjp(_forward, _backward)


def glu(both, *, swish: bool, backend: str = "auto", config=None):
  """hidden = both[..., 0, :] · act(both[..., 1, :]) [..., F] from a fused GLU's projections both [..., 2, F] (up,
  gate), act SiLU when `swish` else the identity. The forward is XLA's either way; "pallas_gpu" takes the gradient
  with respect to `both` from the Pallas kernel in one array of its layout. `config`: a gpu.GluGradConfig (None: the
  default)."""
  if resolve_backend(backend) == "pallas_gpu":
    return _product_with_kernel_gradient(both, swish, config)
  return _product(both, swish)


def glu_gradient_xla(d_hidden, both, *, swish: bool):
  """XLA's form of the gradient the kernel computes (autodiff of the product), for tests and timing."""
  _, vjp = jax.vjp(lambda b: _product(b, swish), both)
  return vjp(d_hidden.astype(both.dtype))[0]
