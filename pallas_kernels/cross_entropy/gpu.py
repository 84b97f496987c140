"""A language model's cross-entropy over a wide vocabulary as Pallas GPU (Triton) kernels.

* Row statistics: the log-normaliser logsumexp(row) and the target's logit, in one pass over the row. XLA reduces a
  100K-wide row in two passes (the max, then the sum of exponentials against it); this kernel keeps a running max
  and rescales its running sum as the max grows (the online softmax), reading each logit once. The target's logit
  is picked up on the way. `row_splits` programs share a row, each walking a span of its columns; their partial
  statistics are combined by XLA (a few values per row).
* Softmax gradient: (softmax(row) − one-hot(target)) · weight from the logits and the log-normaliser, one program
  per column block of a row.

Statistics are fp32 whatever the logits' dtype. Rows are read in column blocks of `block_columns`, the last one
masked. Off the GPU the kernels run in Pallas interpret mode (tests on CPU).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blocks import check_powers_of_two, rows_dividing

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Below every finite logit and exp(-inf - _FLOOR) is still 0: the running max starts here, not at -inf, so the
# first rescale is exp(_FLOOR - max) = 0 rather than exp(-inf + inf) = nan.
_FLOOR = -3.0e38


@dataclasses.dataclass(frozen=True)
class RowStatsConfig:
  """Rows per program, columns per step of a program's loop, warps and programs per row (powers of two)."""

  block_rows: int = 1
  block_columns: int = 2048
  num_warps: int = 4
  row_splits: int = 1

  def __post_init__(self):
    check_powers_of_two(self, (("block_rows", 64), ("block_columns", 65536), ("num_warps", 16), ("row_splits", 64)))


@dataclasses.dataclass(frozen=True)
class SoftmaxGradConfig:
  """Rows and columns of one program's block, and its warps (powers of two)."""

  block_rows: int = 1
  block_columns: int = 2048
  num_warps: int = 4

  def __post_init__(self):
    check_powers_of_two(self, (("block_rows", 64), ("block_columns", 65536), ("num_warps", 16)))


# The fastest of the rows × columns × warps grid on an H200: 0.375 ms for 4,096 bf16 rows of 100,280 logits, XLA's
# two passes 0.494 ms (benchmarks/results/cross_entropy_h200.md).
DEFAULT_CONFIG = RowStatsConfig()
DEFAULT_GRADIENT_CONFIG = SoftmaxGradConfig()


def interpret_mode():
  return jax.default_backend() != "gpu"


def _check_logits(logits, targets, what):
  if logits.dtype not in DTYPES:
    raise TypeError(f"pallas_gpu {what}: logits have dtype {logits.dtype}; valid: float32, bfloat16, float16.")
  if targets.shape != logits.shape[:-1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(
      f"pallas_gpu {what}: targets must be integers of shape {logits.shape[:-1]}; got {targets.dtype} {targets.shape}."
    )


def _row_block_spec(rows, width, block_columns):
  """The whole (padded) row as a block, its columns addressed by the kernel (a Triton block is a power of two wide
  and the vocabulary is not)."""
  return pl.BlockSpec((rows, pl.cdiv(width, block_columns) * block_columns), lambda i, j: (i, 0))


def _stats_kernel(logits_ref, targets_ref, max_ref, sum_ref, picked_ref, *, width, block_columns, blocks_per_split):
  rows = logits_ref.shape[0]
  targets = targets_ref[...]
  columns = jnp.arange(block_columns, dtype=jnp.int32)[None, :]
  first = pl.program_id(1) * blocks_per_split

  def step(j, carry):
    running_max, running_sum, picked = carry
    start = j * block_columns
    index = start + columns
    block = pltriton.load(
      logits_ref.at[:, pl.ds(start, block_columns)], mask=index < width, other=float("-inf")
    ).astype(jnp.float32)
    new_max = jnp.maximum(running_max, jnp.max(block, axis=-1))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(block - new_max[:, None]), axis=-1)
    picked = picked + jnp.sum(jnp.where(index == targets[:, None], block, 0.0), axis=-1)
    return new_max, running_sum, picked

  init = (jnp.full((rows,), _FLOOR, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
  last = jnp.minimum(first + blocks_per_split, pl.cdiv(width, block_columns))
  running_max, running_sum, picked = jax.lax.fori_loop(first, last, step, init)
  max_ref[...] = running_max[:, None]
  sum_ref[...] = running_sum[:, None]
  picked_ref[...] = picked[:, None]


def row_log_normalizer_and_pick_gpu(logits, targets, config: RowStatsConfig | None = None):
  """(logsumexp over the last axis, logits[..., target]) of logits [..., V] and int targets [...] in [0, V), both
  fp32 [...], by the Pallas GPU kernel. A target outside [0, V) picks 0."""
  config = DEFAULT_CONFIG if config is None else config
  _check_logits(logits, targets, "row statistics")
  batch_shape, width = logits.shape[:-1], logits.shape[-1]
  rows_2d = logits.reshape(-1, width)
  n = rows_2d.shape[0]
  rows = rows_dividing(n, config.block_rows)
  block_columns = min(config.block_columns, pl.next_power_of_2(width))
  blocks = pl.cdiv(width, block_columns)
  splits = min(config.row_splits, blocks)
  partial = pl.BlockSpec((rows, 1), lambda i, j: (i, j))
  running_max, running_sum, picked = pl.pallas_call(
    functools.partial(
      _stats_kernel, width=width, block_columns=block_columns, blocks_per_split=pl.cdiv(blocks, splits)
    ),
    grid=(n // rows, splits),
    in_specs=[_row_block_spec(rows, width, block_columns), pl.BlockSpec((rows,), lambda i, j: (i,))],
    out_specs=[partial] * 3,
    out_shape=[jax.ShapeDtypeStruct((n, splits), jnp.float32)] * 3,
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
    interpret=interpret_mode(),
    name="cross_entropy_row_stats",
  )(rows_2d, targets.reshape(n).astype(jnp.int32))
  if splits == 1:
    log_normalizer = running_max[:, 0] + jnp.log(running_sum[:, 0])
  else:
    top = jnp.max(running_max, axis=1)
    log_normalizer = top + jnp.log(jnp.sum(running_sum * jnp.exp(running_max - top[:, None]), axis=1))
  return log_normalizer.reshape(batch_shape), jnp.sum(picked, axis=1).reshape(batch_shape)


def _gradient_kernel(logits_ref, log_normalizer_ref, targets_ref, weights_ref, out_ref, *, width, block_columns):
  start = pl.program_id(1) * block_columns
  index = start + jnp.arange(block_columns, dtype=jnp.int32)[None, :]
  inside = index < width
  block = pltriton.load(logits_ref.at[:, pl.ds(start, block_columns)], mask=inside, other=0.0).astype(jnp.float32)
  probabilities = jnp.exp(block - log_normalizer_ref[...][:, None])
  gradient = (probabilities - (index == targets_ref[...][:, None]).astype(jnp.float32)) * weights_ref[...][:, None]
  pltriton.store(out_ref.at[:, pl.ds(start, block_columns)], gradient.astype(out_ref.dtype), mask=inside)


def softmax_gradient_gpu(logits, log_normalizer, targets, weights, dtype, config: SoftmaxGradConfig | None = None):
  """(exp(logits − log_normalizer) − one-hot(target)) · weight, in `dtype` [..., V], from logits [..., V], the
  fp32 log-normaliser [...], int targets [...] and fp32 row weights [...]: the gradient of weight · cross-entropy
  with respect to the logits, by the Pallas GPU kernel."""
  config = DEFAULT_GRADIENT_CONFIG if config is None else config
  _check_logits(logits, targets, "softmax gradient")
  for name, value in (("log_normalizer", log_normalizer), ("weights", weights)):
    if value.shape != logits.shape[:-1]:
      raise ValueError(f"pallas_gpu softmax gradient: {name} must have shape {logits.shape[:-1]}; got {value.shape}.")
  batch_shape, width = logits.shape[:-1], logits.shape[-1]
  rows_2d = logits.reshape(-1, width)
  n = rows_2d.shape[0]
  rows = rows_dividing(n, config.block_rows)
  block_columns = min(config.block_columns, pl.next_power_of_2(width))
  row = pl.BlockSpec((rows,), lambda i, j: (i,))
  gradient = pl.pallas_call(
    functools.partial(_gradient_kernel, width=width, block_columns=block_columns),
    grid=(n // rows, pl.cdiv(width, block_columns)),
    in_specs=[_row_block_spec(rows, width, block_columns), row, row, row],
    out_specs=_row_block_spec(rows, width, block_columns),
    out_shape=jax.ShapeDtypeStruct((n, width), dtype),
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
    interpret=interpret_mode(),
    name="cross_entropy_softmax_gradient",
  )(
    rows_2d,
    log_normalizer.reshape(n).astype(jnp.float32),
    targets.reshape(n).astype(jnp.int32),
    weights.reshape(n).astype(jnp.float32),
  )
  return gradient.reshape(*batch_shape, width)
