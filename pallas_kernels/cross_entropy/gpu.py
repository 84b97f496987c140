"""Row statistics of a language model's logits as a Pallas GPU (Triton) kernel: the log-normaliser
logsumexp(row) and the target's logit, in one pass over the row.

XLA reduces a 100K-wide row in two passes (the max, then the sum of exponentials against it); this kernel keeps
a running max and rescales its running sum as the max grows (the online softmax), reading each logit once. The
target's logit is picked up on the way. Statistics are fp32 whatever the logits' dtype.

Rows are read in column blocks of `block_columns`, the last one masked. Off the GPU the kernel runs in Pallas
interpret mode (tests on CPU).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blocks import is_power_of_two, rows_dividing

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Below every finite logit and exp(-inf - _FLOOR) is still 0: the running max starts here, not at -inf, so the
# first rescale is exp(_FLOOR - max) = 0 rather than exp(-inf + inf) = nan.
_FLOOR = -3.0e38


@dataclasses.dataclass(frozen=True)
class RowStatsConfig:
  """Rows per program, columns per step of a program's loop and warps (powers of two)."""

  block_rows: int = 1
  block_columns: int = 2048
  num_warps: int = 4

  def __post_init__(self):
    for name, limit in (("block_rows", 64), ("block_columns", 65536), ("num_warps", 16)):
      value = getattr(self, name)
      if not is_power_of_two(value) or value > limit:
        raise ValueError(f"RowStatsConfig.{name} must be a power of two <= {limit}; got {value!r}.")


# The fastest of the rows × columns × warps grid on an H200: 0.375 ms for 4,096 bf16 rows of 100,280 logits, XLA's
# two passes 0.494 ms (benchmarks/results/cross_entropy_h200.md).
DEFAULT_CONFIG = RowStatsConfig()


def interpret_mode():
  return jax.default_backend() != "gpu"


def _kernel(logits_ref, targets_ref, log_normalizer_ref, picked_ref, *, width, block_columns):
  rows = logits_ref.shape[0]
  targets = targets_ref[...]
  columns = jnp.arange(block_columns, dtype=jnp.int32)[None, :]

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
  running_max, running_sum, picked = jax.lax.fori_loop(0, pl.cdiv(width, block_columns), step, init)
  log_normalizer_ref[...] = running_max + jnp.log(running_sum)
  picked_ref[...] = picked


def row_log_normalizer_and_pick_gpu(logits, targets, config: RowStatsConfig | None = None):
  """(logsumexp over the last axis, logits[..., target]) of logits [..., V] and int targets [...] in [0, V), both
  fp32 [...], by the Pallas GPU kernel. A target outside [0, V) picks 0."""
  config = DEFAULT_CONFIG if config is None else config
  if logits.dtype not in DTYPES:
    raise TypeError(f"pallas_gpu row statistics: logits have dtype {logits.dtype}; valid: float32, bfloat16, float16.")
  if targets.shape != logits.shape[:-1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(
      f"pallas_gpu row statistics: targets must be integers of shape {logits.shape[:-1]}; "
      f"got {targets.dtype} {targets.shape}."
    )
  batch_shape, width = logits.shape[:-1], logits.shape[-1]
  rows_2d = logits.reshape(-1, width)
  n = rows_2d.shape[0]
  rows = rows_dividing(n, config.block_rows)
  block_columns = min(config.block_columns, pl.next_power_of_2(width))
  stat = pl.BlockSpec((rows,), lambda i: (i,))
  log_normalizer, picked = pl.pallas_call(
    functools.partial(_kernel, width=width, block_columns=block_columns),
    grid=(n // rows,),
    # The whole row as the block, its columns walked by the kernel's loop (a Triton block is a power of two wide).
    in_specs=[pl.BlockSpec((rows, pl.cdiv(width, block_columns) * block_columns), lambda i: (i, 0)), stat],
    out_specs=[stat, stat],
    out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 2,
    compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
    interpret=interpret_mode(),
    name="cross_entropy_row_stats",
  )(rows_2d, targets.reshape(n).astype(jnp.int32))
  return log_normalizer.reshape(batch_shape), picked.reshape(batch_shape)
