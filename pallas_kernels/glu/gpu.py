"""The gradient of a fused GLU's product as a Pallas GPU (Triton) kernel.

A fused GLU computes its up and gate projections as one matmul whose output `both` [..., 2, F] holds up in slot 0
and gate in slot 1; hidden = up · act(gate), with act the identity (SGLU) or SiLU (SwiGLU). The product's
gradient goes back to that matmul as one array of the same layout: d_both[..., 0, :] = d_hidden · act(gate),
d_both[..., 1, :] = d_hidden · up · act'(gate). XLA forms it from autodiff's two padded slices added, each output
element computing its half, which reads d_hidden once per half; this kernel reads d_hidden, up and gate once and
writes both halves, one program per block of rows and columns. Arithmetic is fp32. Off the GPU the kernel runs in
Pallas interpret mode (tests on CPU).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blocks import check_powers_of_two, rows_dividing

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class GluGradConfig:
  """Rows and columns of one program's block (the columns a power of two that divides F, halved until it does) and
  its warps (powers of two)."""

  # The fastest of the grid at TNL 1B's 32,768 × 4096 on an H100 (benchmarks/results/glu_h100.md)
  block_rows: int = 1
  block_columns: int = 2048
  num_warps: int = 8

  def __post_init__(self):
    check_powers_of_two(self, (("block_rows", 64), ("block_columns", 8192), ("num_warps", 16)))


DEFAULT_CONFIG = GluGradConfig()


def interpret_mode():
  return jax.default_backend() != "gpu"


def _kernel(d_hidden_ref, both_ref, d_both_ref, *, swish):
  d_hidden = d_hidden_ref[...].astype(jnp.float32)
  up = both_ref[:, 0, :].astype(jnp.float32)
  gate = both_ref[:, 1, :].astype(jnp.float32)
  if swish:
    sigmoid = jax.nn.sigmoid(gate)
    d_up = d_hidden * gate * sigmoid
    d_gate = d_hidden * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
  else:
    d_up, d_gate = d_hidden * gate, d_hidden * up
  d_both_ref[:, 0, :] = d_up.astype(d_both_ref.dtype)
  d_both_ref[:, 1, :] = d_gate.astype(d_both_ref.dtype)


def glu_gradient_gpu(d_hidden, both, *, swish: bool, config: GluGradConfig | None = None):
  """d_both [..., 2, F] in both's dtype, the gradient of hidden = both[..., 0, :] · act(both[..., 1, :]) given
  d_hidden [..., F], by the Pallas GPU kernel. act: SiLU when `swish`, else the identity."""
  config = DEFAULT_CONFIG if config is None else config
  if both.dtype not in DTYPES or d_hidden.dtype not in DTYPES:
    raise TypeError(
      f"pallas_gpu GLU gradient: dtypes {d_hidden.dtype} (d_hidden) and {both.dtype} (both); valid: float32, "
      "bfloat16, float16."
    )
  if both.ndim < 2 or both.shape[-2] != 2 or d_hidden.shape != both.shape[:-2] + both.shape[-1:]:
    raise ValueError(
      f"pallas_gpu GLU gradient: both must be [..., 2, F] and d_hidden [..., F] with the same leading axes; got "
      f"{both.shape} and {d_hidden.shape}."
    )
  width = both.shape[-1]
  n = d_hidden.size // width
  rows = rows_dividing(n, config.block_rows)
  columns = rows_dividing(width, config.block_columns)
  if columns < 16:
    raise ValueError(
      f"pallas_gpu GLU gradient: width {width} has no power-of-two block of at least 16 columns dividing it; valid: "
      "a multiple of 16."
    )
  d_both = pl.pallas_call(
    functools.partial(_kernel, swish=swish),
    grid=(n // rows, width // columns),
    in_specs=[
      pl.BlockSpec((rows, columns), lambda i, j: (i, j)),
      pl.BlockSpec((rows, 2, columns), lambda i, j: (i, 0, j)),
    ],
    out_specs=pl.BlockSpec((rows, 2, columns), lambda i, j: (i, 0, j)),
    out_shape=jax.ShapeDtypeStruct((n, 2, width), both.dtype),
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
    interpret=interpret_mode(),
    name="glu_gradient",
  )(d_hidden.reshape(n, width), both.reshape(n, 2, width))
  return d_both.reshape(both.shape)
