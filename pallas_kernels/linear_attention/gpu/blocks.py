"""Building blocks shared by the kernels: matmuls at the right precision, row loads, a chunk's decay factors and
masks. Every decay factor is exp of a difference of chunk-local cumulative log-decays taken in the direction that
makes it <= 0, so nothing overflows however strong the decay (the chunkwise form of
GLA, arXiv 2312.06635, as in fla's chunk_gla)."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def compiler_params(plan, num_warps, num_stages=None):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages or plan.config.num_stages)


LOG2E = 1.4426950408889634


def exp(x):
  """e^x of fp32 x as 2^(x·log2 e): Pallas lowers an fp32 exp to libdevice's expf (a range reduction around the
  hardware's 2^x) and exp2 to the approximate 2^x alone, as fla's kernels call it; relative error ~1e-7."""
  return jnp.exp2(x * LOG2E)


# Feature maps whose gradient the dq/dk kernel applies as it writes the packed projection's gradient.
KERNEL_FEATURE_MAPS = ("silu",)


def sigmoid(x):
  """The logistic function of fp32 x. On the GPU as 0.5 + 0.5·tanh(x/2) by the hardware's approximate tanh (one
  instruction, relative error ~2^-11, below the bf16 rounding of the gradients it scales): the exp and division
  spilled the dq/dk kernel's registers (docs/tuning.md has the measurement). Interpret mode has no inline PTX and
  takes 1 / (1 + e^-x)."""
  if interpret_mode():
    return 1.0 / (1.0 + exp(-x))
  return 0.5 + 0.5 * pltriton.approx_tanh(0.5 * x)


def feature_grad(plan, raw_ref, grad):
  """The fp32 gradient of the raw q or k rows in raw_ref from `grad`, that of their feature map's output."""
  if plan.feature_map is None:
    return grad
  assert plan.feature_map in KERNEL_FEATURE_MAPS, plan.feature_map
  x32 = raw_ref[...].astype(jnp.float32)
  s = sigmoid(x32)
  return grad * s * (1.0 + x32 * (1.0 - s))


class SlotRef:
  """Slot `index` of a [rows, slots, W] block ref as a [rows, W] ref that is written whole (dq and dk in the
  packed gradient)."""

  def __init__(self, ref, index):
    self.ref, self.index = ref, index

  @property
  def dtype(self):
    return self.ref.dtype

  def __setitem__(self, index, value):
    assert index is Ellipsis, index
    self.ref[:, self.index, :] = value


def interpret_mode():
  """Off the GPU the kernels run in Pallas interpret mode (tests on CPU)."""
  return jax.default_backend() != "gpu"


def matmul(a, b, contract=((1,), (0,)), one_pass=False):
  """2-D matmul with fp32 accumulation. fp32 operands keep fp32 accuracy (plain TF32 would cost ~1e-3): three
  TF32 passes on the GPU's tensor cores, exact fp32 in interpret mode. one_pass: a single TF32 pass on the GPU;
  interpret mode then rounds both operands to TF32 as the tensor cores take them, so tests on the CPU see the
  GPU's error."""
  precision = None
  if a.dtype == jnp.float32:
    if interpret_mode():
      precision = lax.Precision.HIGHEST
      if one_pass:
        a, b = tf32(a), tf32(b)
    else:
      precision = lax.DotAlgorithmPreset.TF32_TF32_F32 if one_pass else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def tf32(x):
  """fp32 x rounded to TF32's 10-bit mantissa (to nearest, ties away from zero: the PTX cvt.rna.tf32.f32)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return lax.bitcast_convert_type((bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000), jnp.float32)


def matmul_nt(a, b):  # a·bᵀ
  return matmul(a, b, ((1,), (1,)))


def matmul_tn(a, b, one_pass=False):  # aᵀ·b
  return matmul(a, b, ((0,), (0,)), one_pass)


def load_scalar(ref, index):
  """One element of a 1-D ref as a 0-d value (Triton loads need a power-of-two shape, so load 1 and sum)."""
  return jnp.sum(ref[pl.ds(index, 1)])


def load_row(ref, index):
  return ref[pl.ds(index, 1), :].astype(jnp.float32)


def split_refs(refs, plan, num_leading):
  """Kernel refs in call order: `num_leading` operands, the optional gate and reset refs (present as
  `layout.extras` passed them), then the rest."""
  leading, rest = list(refs[:num_leading]), list(refs[num_leading:])
  g_ref = rest.pop(0) if plan.mode != "none" else None
  resets_ref = rest.pop(0) if plan.has_segments else None
  return leading, g_ref, resets_ref, rest


class RowOffset:
  """A 1-D/2-D ref viewed from a dynamic row offset (the state scans index chunks inside a full-T block)."""

  def __init__(self, ref, offset):
    self.ref, self.offset = ref, offset

  def __getitem__(self, index):
    rows, *rest = index if isinstance(index, tuple) else (index,)
    return self.ref[(pl.ds(self.offset + rows.start, rows.size), *rest)]


def from_row(ref, offset):
  """ref viewed from row `offset` (None stays None: an absent gate or reset ref)."""
  return None if ref is None else RowOffset(ref, offset)


def starting_state(init_ref, shape):
  """The fp32 state a sequential kernel starts from: init_ref's ([] when there is none: zero, so that no zero
  array is written and read for it)."""
  return init_ref[0][...].astype(jnp.float32) if init_ref else jnp.zeros(shape, jnp.float32)


class ChunkFactors:
  """Decay factors and masks of a whole chunk of `size` rows (g is chunk-local: 0 before its first row).

  q_factor = exp(g_i) (≤ 1) scales queries against the state entering the chunk, k_factor = exp(g_end − g_j)
  keys into the state leaving it, state_decay = exp(g_end) (× 0 when a document starts inside) carries the state
  across. None means "no scaling"."""

  def __init__(self, plan, g_ref, resets_ref, size):
    self.g = g_rows = g_end = self.state_decay = None
    if plan.row_gates:
      self.g = g_ref[pl.ds(0, size)].astype(jnp.float32)  # [C]
      g_rows, g_end = self.g[:, None], load_scalar(g_ref, size - 1)
    elif plan.mode == "vector":
      self.g = g_rows = g_ref[pl.ds(0, size), :].astype(jnp.float32)  # [C, Dk]
      g_end = load_row(g_ref, size - 1)
    if g_end is not None:
      self.state_decay = exp(g_end)
    self.resets = resets_end = None
    if plan.has_segments:
      self.resets = resets_ref[pl.ds(0, size)]
      resets_end = load_scalar(resets_ref, size - 1)
      carried = (resets_end == 0).astype(jnp.float32)
      self.state_decay = carried if self.state_decay is None else self.state_decay * carried
    self.q_factor, self.k_factor = edge_factors(plan, g_rows, g_end, self.resets, resets_end)

  @staticmethod
  def scale(x, factor):
    return x if factor is None else x * factor


def edge_factors(plan, g, g_end, resets, resets_end):
  """Rows of a chunk against its edges: exp(g_i) (≤ 1) scales queries against the state entering the chunk,
  exp(g_end − g_j) keys into the state leaving it, zero across a document start. g is [rows, 1 or Dk], or None
  without decay; a None factor means "no scaling"."""
  q_factor = k_factor = None
  if g is not None:
    q_factor, k_factor = exp(g), exp(g_end - g)
  if plan.has_segments:
    q_factor = _and_mask(q_factor, (resets == 0)[:, None])
    k_factor = _and_mask(k_factor, (resets == resets_end)[:, None])
  return q_factor, k_factor


def _and_mask(factor, mask):
  return mask.astype(jnp.float32) if factor is None else jnp.where(mask, factor, 0.0)


def rescaled_rows(x, exponent, rows):
  """x ⊙ exp(exponent) on `rows`, zero elsewhere. The exponent is ≤ 0 on `rows` (rows of the chunk referenced
  to a sub-chunk's edge) but may be large elsewhere, so it is masked before the exp."""
  return jnp.where(rows, x * exp(jnp.where(rows, exponent, 0.0)), 0.0)


def span_within_limit(g_ref, size, g_middle, limit):
  """Whether, in every channel, the chunk's `size` rows decay by at most e^−limit from its first row to g_middle's
  row and from there to its last. Referenced to that middle row, every query factor exp(g_i − g_m) and key factor
  exp(g_m − g_j) of the chunk then lies in [e^−limit, e^limit], far inside fp32's range, so its decayed pairs are
  one matmul (the product of the two factors is the pair's exact decay ≤ 1; rounding stays relative)."""
  first, last = load_row(g_ref, 0), load_row(g_ref, size - 1)
  return jnp.max(jnp.maximum(first - g_middle, g_middle - last)) <= limit


def earlier_rows(x_ref, g_ref, g_all, start):
  """(g_r, the chunk's rows before `start` referenced to the row r just before it: x_j ⊙ exp(g_r − g_j) (≤ 1),
  zero from `start` on). g_all is the chunk's fp32 gate rows; g_r is 0 when the sub-chunk opens the chunk."""
  g_r = jnp.where(start > 0, load_row(g_ref, jnp.maximum(start - 1, 0)), 0.0)
  rows = lax.broadcasted_iota(jnp.int32, (g_all.shape[0], 1), 0)
  return g_r, rescaled_rows(x_ref[...].astype(jnp.float32), g_r - g_all, rows < start)


def for_each_sub_chunk(plan, body, total=None):
  """Vector decay: body(start, out_start) for the sub-chunks this program owns, `start` the row in the chunk and
  `out_start` the row in the output block. All of the chunk's in a loop, or (plan.parts > 1) the one the grid
  names, whose output block is that sub-chunk alone. Given `total` (an fp32 array), body returns an addend of its
  shape and the sum of `total` and the addends is returned."""
  size = plan.sub_chunk
  accumulate = (lambda carry, addend: carry + addend) if total is not None else (lambda carry, addend: carry)
  if plan.parts > 1:
    start = pl.multiple_of((pl.program_id(1) % plan.parts) * size, size)
    return accumulate(total, body(start, 0))

  def step(index, carry):
    start = pl.multiple_of(index * size, size)
    return accumulate(carry, body(start, start))

  return lax.fori_loop(0, plan.chunk // size, step, 0 if total is None else total)


def causal_mask(size, resets):
  """[size, size] bool: i ≥ j within one document (resets None: no documents)."""
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  keep = rows >= cols
  return keep if resets is None else keep & (resets[:, None] == resets[None, :])


def intra_mask(plan, g, resets):
  """[C,C] fp32 decay-and-mask matrix of a chunk for per-row or no decay: exp(g_i − g_j) for i ≥ j in one
  document."""
  keep = causal_mask(plan.chunk, resets if plan.has_segments else None)
  if plan.row_gates:
    diff = jnp.where(keep, g[:, None] - g[None, :], 0.0)
    return jnp.where(keep, exp(diff), 0.0)
  return keep.astype(jnp.float32)
