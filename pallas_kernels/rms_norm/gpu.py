"""RMS norms as Pallas GPU (Triton) kernels: one pass over the rows forward and one backward.

Forward: s = x + delta (rounded to x's dtype, as the unfused add stores it), r = rsqrt(mean(s²) + eps) in fp32,
y = s·r. Backward, with ŷ = s·r: ds = r·(dy − ŷ·mean(dy·ŷ)) + ds_out, the stream's own cotangent added in the
same pass, so the residual add's gradient costs no extra read. XLA runs each of these as two passes (a row
reduction, then an elementwise pass reading the rows again); a row of a few thousand channels fits one program.

The gated output norm, y = x·r·sigmoid(gate), takes the gate's logits and writes both gradients in its backward
pass (dgate = dy·x·r·σ(1 − σ)); without a gate it is the norm alone.

Rows wider than a power of two are loaded as the next power of two with the tail masked (Triton's tensors are
powers of two). Off the GPU the kernels run in Pallas interpret mode (tests on CPU).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blocks import is_power_of_two, rows_dividing

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_WIDTH = 16384  # one row per program in registers; wider rows would spill


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """Rows per program and warps of the forward and backward kernels (powers of two)."""

  block_rows: int = 1
  num_warps: int = 4
  block_rows_backward: int = 1
  num_warps_backward: int = 8

  def __post_init__(self):
    for name in ("block_rows", "block_rows_backward"):
      value = getattr(self, name)
      if not is_power_of_two(value) or value > 64:
        raise ValueError(f"NormConfig.{name} must be a power of two <= 64; got {value!r}.")
    for name in ("num_warps", "num_warps_backward"):
      value = getattr(self, name)
      if not is_power_of_two(value) or value > 16:
        raise ValueError(f"NormConfig.{name} must be 1, 2, 4, 8 or 16; got {value!r}.")


# width -> config, the nearest width at or above applying: the fastest forward and backward of the rows × warps
# grid on an H200 (benchmarks/results/rms_norm_h200.md, 32,768 bf16 rows).
_TUNED = {
  1024: NormConfig(block_rows=1, num_warps=4, block_rows_backward=2, num_warps_backward=8),
  1536: NormConfig(block_rows=1, num_warps=8, block_rows_backward=1, num_warps_backward=4),
  2048: NormConfig(block_rows=1, num_warps=8, block_rows_backward=1, num_warps_backward=8),
  16384: NormConfig(block_rows=4, num_warps=8, block_rows_backward=1, num_warps_backward=8),
}


def default_config(width: int) -> NormConfig:
  for tuned_width in sorted(_TUNED):
    if width <= tuned_width:
      return _TUNED[tuned_width]
  return _TUNED[max(_TUNED)]


def interpret_mode():
  return jax.default_backend() != "gpu"


def _row_mask(width, padded):
  return (jnp.arange(padded) < width)[None, :]


def _load(ref, mask):
  return pltriton.load(ref, mask=mask, other=0).astype(jnp.float32)


def _forward_kernel(*refs, width, eps, has_delta):
  if has_delta:
    x_ref, delta_ref, y_ref, r_ref, s_ref = refs
  else:
    (x_ref, y_ref, r_ref), delta_ref, s_ref = refs, None, None
  mask = _row_mask(width, x_ref.shape[-1])
  s = _load(x_ref, mask)
  if has_delta:
    s = (s + _load(delta_ref, mask)).astype(s_ref.dtype)
    pltriton.store(s_ref, s, mask=mask)
    s = s.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.sum(s * s, axis=-1) / width + eps)
  pltriton.store(y_ref, (s * r[:, None]).astype(y_ref.dtype), mask=mask)
  r_ref[...] = r


def _backward_kernel(s_ref, r_ref, dy_ref, ds_out_ref, ds_ref, *, width):
  mask = _row_mask(width, s_ref.shape[-1])
  r = r_ref[...]
  normed = _load(s_ref, mask) * r[:, None]
  dy = _load(dy_ref, mask)
  mean_dy_normed = jnp.sum(dy * normed, axis=-1) / width
  ds = r[:, None] * (dy - normed * mean_dy_normed[:, None]) + _load(ds_out_ref, mask)
  pltriton.store(ds_ref, ds.astype(ds_ref.dtype), mask=mask)


def _row_blocks(n, width, block_rows):
  """(grid, spec of a block of rows padded to a power of two, spec of their per-row statistics) of n rows."""
  rows, padded = rows_dividing(n, block_rows), pl.next_power_of_2(width)
  return (n // rows,), pl.BlockSpec((rows, padded), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))


def _forward(x, delta, eps, config):
  """(s, y, r) of 2-D rows; s is x itself without delta."""
  n, width = x.shape
  grid, row, stat = _row_blocks(n, width, config.block_rows)
  has_delta = delta is not None
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)]
  out_specs = [row, stat]
  if has_delta:
    out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    out_specs.append(row)
  outputs = pl.pallas_call(
    functools.partial(_forward_kernel, width=width, eps=eps, has_delta=has_delta),
    grid=grid,
    in_specs=[row, row] if has_delta else [row],
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
    interpret=interpret_mode(),
    name="rms_norm_forward",
  )(*((x, delta) if has_delta else (x,)))
  y, r = outputs[:2]
  return (outputs[2] if has_delta else x), y, r


def _backward(s, r, dy, ds_out, config):
  n, width = s.shape
  grid, row, stat = _row_blocks(n, width, config.block_rows_backward)
  return pl.pallas_call(
    functools.partial(_backward_kernel, width=width),
    grid=grid,
    in_specs=[row, stat, row, row],
    out_specs=row,
    out_shape=jax.ShapeDtypeStruct(s.shape, s.dtype),
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps_backward, num_stages=1),
    interpret=interpret_mode(),
    name="rms_norm_backward",
  )(s, r, dy, ds_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _residual_rms_norm_rows(x, delta, eps, config):
  s, y, _ = _forward(x, delta, eps, config)
  return s, y


def _residual_rms_norm_rows_fwd(x, delta, eps, config):
  s, y, r = _forward(x, delta, eps, config)
  return (s, y), (s, r, delta is not None)


def _residual_rms_norm_rows_bwd(eps, config, residuals, cotangents):
  del eps
  s, r, has_delta = residuals
  ds_out, dy = cotangents
  ds = _backward(s, r, dy.astype(s.dtype), ds_out.astype(s.dtype), config)
  return ds, (ds if has_delta else None)


_residual_rms_norm_rows.defvjp(_residual_rms_norm_rows_fwd, _residual_rms_norm_rows_bwd)


def _check(x, other, name):
  if x.dtype not in DTYPES:
    raise TypeError(f"pallas_gpu rms norm: x has dtype {x.dtype}; valid: float32, bfloat16, float16.")
  if other is not None and (other.shape != x.shape or other.dtype != x.dtype):
    raise ValueError(
      f"pallas_gpu rms norm: {name} must match x's shape and dtype {x.shape} {x.dtype}; "
      f"got {other.shape} {other.dtype}."
    )
  if x.shape[-1] > MAX_WIDTH:
    raise ValueError(
      f"pallas_gpu rms norm: rows of {x.shape[-1]} channels; valid: at most {MAX_WIDTH} (backend='xla' takes any)."
    )


def residual_rms_norm_gpu(x, delta=None, *, eps, config=None):
  """(s, y): the stream s = x + delta (x without delta) and its RMS norm y = s / sqrt(mean(s²) + eps) over the
  last axis, both in x's dtype, by the Pallas GPU kernels. x [..., width], delta x's shape and dtype or None."""
  _check(x, delta, "delta")
  width = x.shape[-1]
  config = default_config(width) if config is None else config
  rows = x.reshape(-1, width)
  s, y = _residual_rms_norm_rows(rows, None if delta is None else delta.reshape(-1, width), float(eps), config)
  return s.reshape(x.shape), y.reshape(x.shape)


def _gated_forward_kernel(*refs, width, eps, gated):
  if gated:
    x_ref, gate_ref, y_ref, r_ref = refs
  else:
    (x_ref, y_ref, r_ref), gate_ref = refs, None
  mask = _row_mask(width, x_ref.shape[-1])
  x = _load(x_ref, mask)
  r = jax.lax.rsqrt(jnp.sum(x * x, axis=-1) / width + eps)
  y = x * r[:, None]
  if gated:
    y = y * jax.nn.sigmoid(_load(gate_ref, mask))
  pltriton.store(y_ref, y.astype(y_ref.dtype), mask=mask)
  r_ref[...] = r


def _gated_backward_kernel(*refs, width, gated):
  if gated:
    x_ref, r_ref, gate_ref, dy_ref, dx_ref, dgate_ref = refs
  else:
    (x_ref, r_ref, dy_ref, dx_ref), gate_ref, dgate_ref = refs, None, None
  mask = _row_mask(width, x_ref.shape[-1])
  r = r_ref[...]
  normed = _load(x_ref, mask) * r[:, None]
  d_normed = _load(dy_ref, mask)
  if gated:
    gate = jax.nn.sigmoid(_load(gate_ref, mask))
    pltriton.store(dgate_ref, (d_normed * normed * gate * (1 - gate)).astype(dgate_ref.dtype), mask=mask)
    d_normed = d_normed * gate
  mean_d_normed = jnp.sum(d_normed * normed, axis=-1) / width
  dx = r[:, None] * (d_normed - normed * mean_d_normed[:, None])
  pltriton.store(dx_ref, dx.astype(dx_ref.dtype), mask=mask)


def _gated_forward(x, gate_logits, eps, config):
  n, width = x.shape
  grid, row, stat = _row_blocks(n, width, config.block_rows)
  gated = gate_logits is not None
  return pl.pallas_call(
    functools.partial(_gated_forward_kernel, width=width, eps=eps, gated=gated),
    grid=grid,
    in_specs=[row, row] if gated else [row],
    out_specs=[row, stat],
    out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)],
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
    interpret=interpret_mode(),
    name="rms_norm_gated_forward",
  )(*((x, gate_logits) if gated else (x,)))


def _gated_backward(x, r, gate_logits, dy, config):
  n, width = x.shape
  grid, row, stat = _row_blocks(n, width, config.block_rows_backward)
  gated = gate_logits is not None
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if gated:
    out_shape.append(jax.ShapeDtypeStruct(gate_logits.shape, gate_logits.dtype))
  outputs = pl.pallas_call(
    functools.partial(_gated_backward_kernel, width=width, gated=gated),
    grid=grid,
    in_specs=[row, stat, row, row] if gated else [row, stat, row],
    out_specs=[row] * len(out_shape),
    out_shape=out_shape,
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps_backward, num_stages=1),
    interpret=interpret_mode(),
    name="rms_norm_gated_backward",
  )(*((x, r, gate_logits, dy) if gated else (x, r, dy)))
  return outputs[0], (outputs[1] if gated else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gated_rms_norm_rows(x, gate_logits, eps, config):
  return _gated_forward(x, gate_logits, eps, config)[0]


def _gated_rms_norm_rows_fwd(x, gate_logits, eps, config):
  y, r = _gated_forward(x, gate_logits, eps, config)
  return y, (x, r, gate_logits)


def _gated_rms_norm_rows_bwd(eps, config, residuals, dy):
  del eps
  x, r, gate_logits = residuals
  return _gated_backward(x, r, gate_logits, dy.astype(x.dtype), config)


_gated_rms_norm_rows.defvjp(_gated_rms_norm_rows_fwd, _gated_rms_norm_rows_bwd)


def gated_rms_norm_gpu(x, gate_logits=None, *, eps, config=None):
  """y = x / sqrt(mean(x²) + eps) · sigmoid(gate_logits) over the last axis (no gate: the norm alone) in x's dtype,
  by the Pallas GPU kernels: the output norm and gate of TNL and cosFormer2, HGRN2's output norm."""
  _check(x, gate_logits, "gate_logits")
  width = x.shape[-1]
  config = default_config(width) if config is None else config
  rows = None if gate_logits is None else gate_logits.reshape(-1, width)
  return _gated_rms_norm_rows(x.reshape(-1, width), rows, float(eps), config).reshape(x.shape)
