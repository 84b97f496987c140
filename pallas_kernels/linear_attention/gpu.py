"""Pallas GPU (Hopper) kernels for chunked linear attention, lowered through Triton ("pallas_gpu" backend).

fla's decomposition, which keeps every SM busy when batch·heads is small:
  forward   1. state scan: one program per (batch·head, Dk tile, Dv tile) walks the chunks and writes the
               state entering each chunk (h) and the final state;
            2. (per-key-channel decay) intra-chunk scores: A [C, C] per chunk, masked and decayed;
            3. output: fully parallel over (chunk, batch·head, Dv tile): o = q̄·h + A·v, matmuls only.
  backward  the state scan again (recomputes h), the reverse scan of the state gradient (dh, dh0), then two
            chunk-parallel kernels: dv = Aᵀ·do + k̄·dh (Dv tiles; A saved by the forward) and dq, dk (Dk tiles).
Without per-key-channel decay the forward is instead one fused kernel that walks the chunks with the state in
registers and never stores the per-chunk states (fla's fused_chunk form). Sequential kernels with few programs
split time into segments (two-level scan): each segment's final state from zero, a small kernel combining the
segments in order, then every segment from its true starting state.
Decay factors use chunk-local cumulative log-decays g so that every exponent is <= 0 (kernels.md §7).
Data-dependent (per key channel) decay works on 16-token sub-chunks inside each chunk, with no state carried
through them: a sub-chunk's queries read the chunk's earlier keys (and its keys the chunk's later queries)
through one matmul whose factors are referenced to the row at the sub-chunk's edge (both ≤ 1, never overflowing),
and the diagonal 16×16 blocks exactly for any gate strength, one program per sub-chunk: the forward's by one
matmul halving and then elementwise in fp32 (_diag_block), the dq/dk kernel's as four nested levels of matmuls
(_nested_levels). Loops have dynamic offsets, never Python-unrolled: Triton keeps scf.for rolled, so the program
(and its compile time) stays the size of one body. The exception is the state scans' deliberate unroll of
SCAN_UNROLL chunks when few programs run (latency-bound), whose body is small.
Segment resets become masks from a chunk-local count of document starts (`resets`): a query sees the
carried state only before the chunk's first reset, a key feeds the outgoing state only after its last one.
States travel between kernels value-major ([.., Dv, Dk]) so that per-key-channel decays scale columns.
The decay gradient telescopes only to the end of each chunk (as fla's chunk_gla does):
d log α_r = Σ_{r≤t≤e} (q·dq − k·dk)_t + Σ_v S_e·dS_e, e the chunk's last row, S_e the state leaving the chunk and
dS_e its gradient from later rows; the dq/dk kernel emits q·dq − k·dk, the dv kernel Σ_v S_e·dS_e, a small kernel
the sums. The suffix sum cancels heavily; summed over the whole sequence (kernels.md §3.3) its error grows with T,
which forced fp32 states. Chunk-local, bf16 states suffice: only the intra-chunk
dq/dk matmuls keep fp32 operands, and only when a decay gradient is wanted (HGRN2; TNL's decay is a fixed buffer).
Off the GPU the kernels run in Pallas interpret mode (for tests on CPU).
"""
from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.linear_attention import reference

DEFAULT_CHUNK_SIZE = 64
# Per-key-channel decay: 32-token chunks of two 16-token sub-chunks, one program each. H200, 8×2048×16×128,
# forward+backward kernel time: 3.15 ms against 4.22 at 64 tokens (2 warps; 3.65 vs 3.92 at 4 warps;
# benchmarks/results/kernel_profile_h200_sweeps_session4.md).
VECTOR_CHUNK_SIZE = 32
# Warps of the chunk-parallel kernels (output, dv, dq/dk). Per-key-channel decay's 16-row sub-chunk programs run
# best with 2: HGRN2 forward+backward 3.15 ms against 3.65 with 4 at 8×2048 (7.59 vs 8.58 ms at 1×32768; 1 warp
# 5.13 ms); the 64-row chunks of fixed and no decay with 4 (2 and 8 warps slower; kernel_profile_h200_sweeps_session4).
VECTOR_NUM_WARPS = 2
DEFAULT_NUM_WARPS = 4
# The dq/dk kernel with per-key-channel decay: 64-wide Dk tiles at 4 warps. H200, 8×2048×16×128: 1.53 ms against
# 1.68 at 32-wide tiles and 2 warps (4.14 ms at 64-wide and 2 warps: registers; kernel_profile_h200_session6.md).
VECTOR_KEY_TILE = 64
VECTOR_KEY_WARPS = 4
SUB_CHUNK = 16  # vector decay: the sub-chunks whose diagonal blocks need more than one matmul (fla's chunk_gla)
SCORES_WARPS = 8  # the intra-chunk score kernel's warps (its own measured best; see _intra_scores_kernel)
# Halvings of the score kernel's 16×16 diagonal blocks done as matmuls before the elementwise loop (_diag_block):
# H200, 8×2048×16×128: 447 µs with one (two 8-wide blocks left), 484 µs with two, 536 µs with none
# (kernel_profile_h200_session7.md).
SCORE_LEVELS = 1
# 16-bit inputs: the dq/dk kernel's fp32 matmuls (the decay gradient's intra-chunk terms) in one TF32 pass, as
# fla's chunk_gla takes them: 1.30 ms against 1.54 for three passes at 8×2048×16×128, decay-gradient error
# 2.96e-3 against 2.88e-3 (bound 1e-2). fp32 inputs keep three: one gave 9.7e-4 against the 1e-4 bound.
ONE_PASS_TF32_BELOW_32_BIT = True
SCAN_TILE = 64  # Dk and Dv tile of the state scans: B·H·(Dk/64)·(Dv/64) sequential programs
# State scans with fewer programs than this (about two per H200 SM) are latency-bound: they unroll SCAN_UNROLL
# chunks per iteration. TNL at 1×32768×16×128: scan 613 → 408 µs; unrolling 8 exceeded shared memory.
LATENCY_BOUND_PROGRAMS = 256
SCAN_UNROLL = 4
# Sequential kernels can split the time axis into segments walked in parallel (two-level scan): each segment's
# local final state from zero, a short combine over the segments, then the segments again from their true
# starting states. The fused forward splits while it has fewer than SEGMENT_PROGRAMS programs; the state scans
# only below SEGMENT_SCANS_BELOW programs (B·H < 32 at 128×128 heads), with SEGMENT_SCAN_TILE-wide state tiles
# (fewer re-reads of their operands) and then up to SEGMENT_PROGRAMS programs. H200, HGRN2 at 4×8192×12×128:
# unsegmented 352 µs, four segments 926 µs; at 1×32768×16×128, 32 segments of 128-wide tiles 535 µs against 1.03 ms.
# Segments keep at least MIN_SEGMENT_CHUNKS chunks.
SEGMENT_PROGRAMS = 512
SEGMENT_SCANS_BELOW = 128
SEGMENT_SCAN_TILE = 128
MIN_SEGMENT_CHUNKS = 8
COMBINE_TILE = 32  # the segment combine is elementwise: small tiles, many programs
FUSED_VALUE_TILE = 64  # Dv tile of the fused forward: its fp32 state [64, Dk] stays in registers
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_WIDE_DIM = 128  # largest Dk/Dv the kernels take with 32-bit inputs


class _Config:
  """Static kernel configuration (hashable, a nondiff argument of the custom_vjp)."""

  def __init__(self, mode, has_segments, chunk, num_warps, num_stages, scan_tile, split_sub_chunks, key_tile,
               key_warps, scan_unroll, fused_forward, segment_programs, fused_value_tile, segment_scan_tile,
               one_pass_tf32, score_levels):
    self.mode, self.has_segments, self.chunk = mode, has_segments, chunk
    self.num_warps, self.num_stages, self.scan_tile, self.key_tile = num_warps, num_stages, scan_tile, key_tile
    self.sub_chunk = min(SUB_CHUNK, chunk) if mode == "vector" else chunk
    # Vector decay: one program per sub-chunk (`parts` per chunk) instead of one looping over the chunk's.
    self.parts = chunk // self.sub_chunk if split_sub_chunks and mode == "vector" else 1
    self.key_warps, self.scan_unroll = key_warps, scan_unroll
    self.fused_forward, self.segment_programs = fused_forward, segment_programs
    self.fused_value_tile, self.segment_scan_tile = fused_value_tile, segment_scan_tile
    self.one_pass_tf32, self.score_levels = one_pass_tf32, score_levels
    self._key = (mode, has_segments, chunk, num_warps, num_stages, scan_tile, self.parts, key_tile, key_warps,
                 scan_unroll, fused_forward, segment_programs, fused_value_tile, segment_scan_tile, one_pass_tf32,
                 score_levels)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Config) and self._key == other._key


def fits_shared_memory(dtype, dim_k, dim_v) -> bool:
  """32-bit inputs with a 256-wide head asked for 256–320 KB per block on the H200 (227 KB available)."""
  return jnp.dtype(dtype).itemsize < 4 or max(dim_k, dim_v) <= MAX_WIDE_DIM


def _is_power_of_two(n):
  return n > 0 and n & (n - 1) == 0


def _compiler_params(config, num_warps=None):
  return pltriton.CompilerParams(num_warps=num_warps or config.num_warps, num_stages=config.num_stages)


def _interpret():
  return jax.default_backend() != "gpu"


def _dot(a, b, contract=((1,), (0,)), one_pass=False):
  """2-D matmul with fp32 accumulation. fp32 operands keep fp32 accuracy (plain TF32 would cost ~1e-3): three
  TF32 passes on the GPU's tensor cores, exact fp32 in interpret mode; one_pass: a single TF32 pass on the GPU."""
  precision = None
  if a.dtype == jnp.float32:
    precision = lax.Precision.HIGHEST if _interpret() else (
        lax.DotAlgorithmPreset.TF32_TF32_F32 if one_pass else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _dot_nt(a, b):  # a·bᵀ
  return _dot(a, b, ((1,), (1,)))


def _dot_tn(a, b, one_pass=False):  # aᵀ·b
  return _dot(a, b, ((0,), (0,)), one_pass)


def _scalar(ref, index):
  """One element of a 1-D ref as a 0-d value (Triton loads need a power-of-two shape, so load 1 and sum)."""
  return jnp.sum(ref[pl.ds(index, 1)])


def _row(ref, index):
  return ref[pl.ds(index, 1), :].astype(jnp.float32)


# ------------------------------------------------------------------------------------------ chunk helpers
def _intra_mask(config, g, resets):
  """[C,C] fp32 decay-and-mask matrix of a chunk for scalar/no decay: exp(g_i − g_j) for i ≥ j in one document."""
  size = config.chunk
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  keep = rows >= cols
  if config.has_segments:
    keep = keep & (resets[:, None] == resets[None, :])
  if config.mode == "scalar":
    diff = jnp.where(keep, g[:, None] - g[None, :], 0.0)
    return jnp.where(keep, jnp.exp(diff), 0.0)
  return keep.astype(jnp.float32)


def _nested_levels(g):
  """Vector decay inside a sub-chunk without elementwise loops: every pair i > j of its c rows lies in exactly one
  level s (c/2, …, 1), where both sit in one 2s-row block, i in its second half and j in its first. Through the
  block's reference row r (the first half's last) exp(g_i − g_j) = exp(g_i − g_r)·exp(g_r − g_j), both factors
  ≤ 1, so each level is one matmul of rescaled rows, exact for any gate strength. Yields per level (a, b, same):
  a [c, W] the query-side factors (zero on first halves), b [c, W] the key-side ones (zero on second halves),
  same [c, c] the same-block mask that the matmul's result needs. g: the sub-chunk's fp32 gate rows [c, W]."""
  size = g.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (size, 1), 0)
  pair_rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  pair_cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  half = size // 2
  while half >= 1:
    shift = (2 * half).bit_length() - 1
    second = (rows & (2 * half - 1)) >= half
    reference = ((rows >> shift) << shift) + half - 1
    # Each row's reference gate row by a one-hot matmul (no gathers in Triton); its rounding cancels in a·b.
    g_reference = _dot((pair_cols == reference).astype(jnp.float32), g)
    a = jnp.where(second, jnp.exp(jnp.where(second, g - g_reference, 0.0)), 0.0)
    b = jnp.where(second, 0.0, jnp.exp(jnp.where(second, 0.0, g_reference - g)))
    yield a, b, (pair_rows >> shift) == (pair_cols >> shift)
    half //= 2


def _block_rows(ref, start, sub, width, offset):
  """[sub, W] fp32: for each row i of the sub-chunk at `start`, ref's row i − (i mod width) + offset (one row load
  per width-row block, merged by selects: Triton has no gathers)."""
  rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
  merged = _row(ref, start + offset)
  for first in range(width, sub, width):
    merged = jnp.where(rows >= first, _row(ref, start + first + offset), merged)
  return merged


def _diag_block(q_sub, k_ref, g_sub, g_ref, start, sub, levels, dtype):
  """Vector decay: the [c,c] block A_ij = Σ_d q_id k_jd exp(g_id − g_jd) (i ≥ j; document masks are the
  caller's) with no exponent ever positive. The first `levels` halvings of _nested_levels are one matmul each
  (pairs in opposite halves of a 2s-row block, s = c/2, c/4, …, through the block's row s − 1: both factors
  ≤ 1; `dtype` operands, as the off-diagonal scores); the pairs left, inside blocks of w = c/2^levels rows, are
  elementwise in fp32, one key offset j < w per iteration for all blocks at once (row i meets key
  i − (i mod w) + j): w iterations instead of c, and half or less of the exponentials."""
  rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
  pair_rows = lax.broadcasted_iota(jnp.int32, (sub, sub), 0)
  cols = lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
  block = jnp.zeros((sub, sub), jnp.float32)
  width = sub
  if levels:
    k_sub = k_ref[pl.ds(start, sub), :].astype(jnp.float32)
  for _ in range(levels):
    half = width // 2
    second = (rows & (width - 1)) >= half
    g_reference = _block_rows(g_ref, start, sub, width, half - 1)
    factor = jnp.exp(jnp.where(second, g_sub - g_reference, g_reference - g_sub))
    a = jnp.where(second, q_sub * factor, 0.0).astype(dtype)
    b = jnp.where(second, 0.0, k_sub * factor).astype(dtype)
    shift = width.bit_length() - 1
    block = block + jnp.where((pair_rows >> shift) == (cols >> shift), _dot_nt(a, b), 0.0)
    width = half
  offsets = rows & (width - 1)

  def add_offset(j, block):
    exponent = jnp.where(offsets >= j, g_sub - _block_rows(g_ref, start, sub, width, j), -jnp.inf)
    column = jnp.sum(q_sub * _block_rows(k_ref, start, sub, width, j) * jnp.exp(exponent), axis=1)
    return jnp.where(cols == rows - offsets + j, column[:, None], block)

  # A loop, not unrolled: keeps the Triton program (and its compile time) small.
  return lax.fori_loop(0, width, add_offset, block)


class _ChunkFactors:
  """Decay factors and masks of a whole chunk of `size` rows (g is chunk-local: 0 before its first row).

  q_factor = exp(g_i) (≤ 1) scales queries against the state entering the chunk, k_factor = exp(g_end − g_j)
  keys into the state leaving it, state_decay = exp(g_end) (× 0 when a document starts inside) carries the state
  across. None means "no scaling"."""

  def __init__(self, config, g_ref, resets_ref, size):
    self.g = g_rows = g_end = self.state_decay = None
    if config.mode == "scalar":
      self.g = g_ref[pl.ds(0, size)].astype(jnp.float32)  # [C]
      g_rows, g_end = self.g[:, None], _scalar(g_ref, size - 1)
    elif config.mode == "vector":
      self.g = g_rows = g_ref[pl.ds(0, size), :].astype(jnp.float32)  # [C, Dk]
      g_end = _row(g_ref, size - 1)
    if g_end is not None:
      self.state_decay = jnp.exp(g_end)
    self.resets = resets_end = None
    if config.has_segments:
      self.resets = resets_ref[pl.ds(0, size)]
      resets_end = _scalar(resets_ref, size - 1)
      carried = (resets_end == 0).astype(jnp.float32)
      self.state_decay = carried if self.state_decay is None else self.state_decay * carried
    self.q_factor, self.k_factor = _edge_factors(config, g_rows, g_end, self.resets, resets_end)

  @staticmethod
  def scale(x, factor):
    return x if factor is None else x * factor


def _earlier_rows(x_ref, g_ref, g_all, start):
  """(g_r, the chunk's rows before `start` referenced to the row r just before it: x_j ⊙ exp(g_r − g_j) (≤ 1),
  zero from `start` on). g_all is the chunk's fp32 gate rows; g_r is 0 when the sub-chunk opens the chunk."""
  g_r = jnp.where(start > 0, _row(g_ref, jnp.maximum(start - 1, 0)), 0.0)
  rows = lax.broadcasted_iota(jnp.int32, (g_all.shape[0], 1), 0)
  return g_r, _rescaled_rows(x_ref[...].astype(jnp.float32), g_r - g_all, rows < start)


def _edge_factors(config, g, g_end, resets, resets_end):
  """Rows of a chunk against its edges: exp(g_i) (≤ 1) scales queries against the state entering the chunk,
  exp(g_end − g_j) keys into the state leaving it, zero across a document start. g is [rows, 1 or Dk], or None
  without decay; a None factor means "no scaling"."""
  q_factor = k_factor = None
  if g is not None:
    q_factor, k_factor = jnp.exp(g), jnp.exp(g_end - g)
  if config.has_segments:
    q_factor = _and_mask(q_factor, (resets == 0)[:, None])
    k_factor = _and_mask(k_factor, (resets == resets_end)[:, None])
  return q_factor, k_factor


def _for_each_sub_chunk(config, body):
  """Vector decay: body(start, out_start) for the sub-chunks this program owns, `start` the row in the chunk and
  `out_start` the row in the output block. All of the chunk's in a loop, or (config.parts > 1) the one the grid
  names, whose output block is that sub-chunk alone."""
  size = config.sub_chunk
  if config.parts > 1:
    start = pl.multiple_of((pl.program_id(1) % config.parts) * size, size)
    body(start, 0)
    return

  def step(index, carry):
    start = pl.multiple_of(index * size, size)
    body(start, start)
    return carry

  lax.fori_loop(0, config.chunk // size, step, 0)


def _rescaled_rows(x, exponent, rows):
  """x ⊙ exp(exponent) on `rows`, zero elsewhere. The exponent is ≤ 0 on `rows` (rows of the chunk referenced
  to a sub-chunk's edge) but may be large elsewhere, so it is masked before the exp."""
  return jnp.where(rows, x * jnp.exp(jnp.where(rows, exponent, 0.0)), 0.0)


def _and_mask(factor, mask):
  return mask.astype(jnp.float32) if factor is None else jnp.where(mask, factor, 0.0)


# ------------------------------------------------------------------------------------------------ kernels
def _split_refs(refs, config, num_leading):
  """Kernel refs in call order: `num_leading` operands, the optional gate and reset refs (present as
  `layout.extras` passed them), then the rest."""
  leading, rest = list(refs[:num_leading]), list(refs[num_leading:])
  g_ref = rest.pop(0) if config.mode != "none" else None
  resets_ref = rest.pop(0) if config.has_segments else None
  return leading, g_ref, resets_ref, rest


def _state_scan_kernel(*refs, config, num_chunks, reverse, per_chunk, unroll, has_init):
  """Forward (a=k, b=v): S ← decay·S + (k ⊙ k_factor)ᵀv, storing S entering each chunk.
  Reverse (a=q, b=do): dS ← decay·dS + (q ⊙ q_factor)ᵀdo, storing dS leaving each chunk; S is [Dv, Dk].
  One segment of `num_chunks` chunks from the state in init_ref (zero without one); per_chunk False stores only
  the last state."""
  (a_ref, b_ref), g_ref, resets_ref, (*init_ref, last_ref) = _split_refs(refs, config, 2)
  init_ref, states_ref = (init_ref[:1], init_ref[1:]) if has_init else ([], init_ref)
  chunk, operand_dtype = config.chunk, a_ref.dtype

  def chunk_update(n):
    """(decay, b̂ᵀâ) of chunk n: independent of the carried state, so loads and matmul can run ahead of it."""
    start = pl.multiple_of(n * chunk, chunk)
    offset = lambda ref: None if ref is None else _Offset(ref, start)
    sub = _ChunkFactors(config, offset(g_ref), offset(resets_ref), chunk)
    factor = sub.q_factor if reverse else sub.k_factor
    a = _ChunkFactors.scale(a_ref[pl.ds(start, chunk), :].astype(jnp.float32), factor).astype(operand_dtype)
    b = b_ref[pl.ds(start, chunk), :].astype(operand_dtype)
    return sub.state_decay, _dot_tn(b, a)

  def steps(unroll):
    """A loop body over `unroll` consecutive chunks: all their loads and matmuls first, then the short chain of
    state updates (the scan is latency-bound: one chunk per iteration leaves the loads' latency exposed)."""
    def body(step, state):
      chunks = [num_chunks - 1 - (step * unroll + u) if reverse else step * unroll + u for u in range(unroll)]
      updates = [chunk_update(n) for n in chunks]
      for n, (decay, update) in zip(chunks, updates):
        if per_chunk:
          states_ref[0][n] = state.astype(states_ref[0].dtype)
        state = _ChunkFactors.scale(state, decay) + update
      return state
    return body

  # 32-bit operands stay rolled: twice the shared memory, and measured slower (fp32 scans of an earlier backward).
  unroll = min(unroll if operand_dtype.itemsize < 4 else 1, num_chunks)
  whole = num_chunks // unroll
  state = lax.fori_loop(0, whole, steps(unroll), _initial(init_ref, last_ref.shape))
  if num_chunks % unroll:  # the remainder, one chunk at a time
    state = lax.fori_loop(whole * unroll, num_chunks, steps(1), state)
  last_ref[...] = state


class _Offset:
  """A 1-D/2-D ref viewed from a dynamic row offset (the state scans index chunks inside a full-T block)."""

  def __init__(self, ref, offset):
    self.ref, self.offset = ref, offset

  def __getitem__(self, index):
    rows, *rest = index if isinstance(index, tuple) else (index,)
    return self.ref[(pl.ds(self.offset + rows.start, rows.size), *rest)]


def _intra_scores_kernel(*refs, config):
  """Vector decay: the rows of one sub-chunk of queries of the chunk's masked, decayed attention matrix
  A_ij = Σ_d q_id k_jd exp(g_id − g_jd) (j ≤ i, one document), [C, C] per chunk, which the output and dv kernels
  then use as plain matmul operands. The chunk's earlier keys go through one matmul whose factors are referenced
  to the row just before the sub-chunk (q ⊙ exp(g_i − g_r) and k ⊙ exp(g_r − g_j), both ≤ 1), the diagonal block
  by _diag_block (SCORE_LEVELS matmul halvings, then elementwise) at SCORES_WARPS warps (H200, 8×2048×16×128:
  column by column 581 µs; 658 µs as [16, 16, 32] broadcasts at 4 warps; 1.32 ms as all four of _nested_levels'
  matmuls, kernel_profile_h200_session6.md; 447 µs with one halving, kernel_profile_h200_session7.md). Kept
  apart from the matmul-heavy output kernel: fused, the two took 1.19 ms of a 1.58 ms forward
  (kernel_profile_h200_session3.md)."""
  (q_ref, k_ref), g_ref, resets_ref, (a_ref,) = _split_refs(refs, config, 2)
  dtype = q_ref.dtype
  size, chunk = config.sub_chunk, config.chunk
  block_rows = lax.broadcasted_iota(jnp.int32, (size, chunk), 0)
  block_cols = lax.broadcasted_iota(jnp.int32, (size, chunk), 1)

  def sub_chunk(start, out_start):
    q = q_ref[pl.ds(start, size), :].astype(jnp.float32)
    g_q = g_ref[pl.ds(start, size), :].astype(jnp.float32)
    g_r, k_tilde = _earlier_rows(k_ref, g_ref, g_ref[...].astype(jnp.float32), start)
    scores = _dot_nt((q * jnp.exp(g_q - g_r)).astype(dtype), k_tilde.astype(dtype))  # zero from column `start` on
    block = _diag_block(q, k_ref, g_q, g_ref, start, size, config.score_levels, dtype)
    # The [c, c] diagonal block into columns [start, start + c): a one-hot matmul (no dynamic column slicing).
    scores = scores + _dot(block, (block_cols == start + block_rows).astype(jnp.float32))
    if config.has_segments:
      resets_q = resets_ref[pl.ds(start, size)]
      scores = jnp.where(resets_q[:, None] == resets_ref[...][None, :], scores, 0.0)
    a_ref[pl.ds(out_start, size), :] = scores.astype(a_ref.dtype)

  _for_each_sub_chunk(config, sub_chunk)


def _chunk_scores(config, sub, q, k, scores=None):
  """The chunk's masked, decayed q·kᵀ [C, C] in fp32: the intra-score kernel's A (`scores`) for vector decay,
  else computed here."""
  if config.mode == "vector":
    return scores.astype(jnp.float32)
  return _dot_nt(q, k) * _intra_mask(config, sub.g, sub.resets)


def _output_kernel(*refs, config):
  """o = q̄·h + A·v for one chunk and Dv tile."""
  (q_ref, k_ref, v_ref), g_ref, resets_ref, (h_ref, *scores_ref, o_ref) = _split_refs(refs, config, 3)
  sub = _ChunkFactors(config, g_ref, resets_ref, config.chunk)
  o_ref[...] = _chunk_output(config, sub, q_ref[...], k_ref[...], v_ref[...], h_ref[...],
                             *[ref[...] for ref in scores_ref]).astype(o_ref.dtype)


def _chunk_output(config, sub, q, k, v, state, scores=None):
  """o = q̄·hᵀ + A·v of one chunk (fp32) from its rows and the state entering it [Dv tile, Dk]."""
  dtype = q.dtype
  scores = _chunk_scores(config, sub, q, k, scores)
  q_bar = _ChunkFactors.scale(q.astype(jnp.float32), sub.q_factor).astype(dtype)
  return _dot_nt(q_bar, state.astype(dtype)) + _dot(scores.astype(dtype), v)


def _fused_forward_kernel(*refs, config, num_chunks, has_init, segments):
  """The forward without materialised states: one program per (Dv tile, segment, batch·head) walks the
  segment's chunks from the state entering it, o = q̄·hᵀ + A·v then h ← decay·h + v̂ᵀk̂, the fp32 state
  [Dv tile, Dk] in registers (rounded to the inputs' dtype for the q̄·hᵀ matmul, as the stored per-chunk states of
  the unfused path are); the last segment's program stores the state leaving it."""
  (q_ref, k_ref, v_ref), g_ref, resets_ref, rest = _split_refs(refs, config, 3)
  init_ref = [rest.pop(0)] if has_init else []
  scores_ref = rest.pop(0) if config.mode == "vector" else None
  o_ref, last_ref = rest
  chunk, dtype = config.chunk, q_ref.dtype

  def step(n, state):
    start = pl.multiple_of(n * chunk, chunk)
    rows = pl.ds(start, chunk)
    offset = lambda ref: None if ref is None else _Offset(ref, start)
    sub = _ChunkFactors(config, offset(g_ref), offset(resets_ref), chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    scores = None if scores_ref is None else scores_ref[rows, :]
    o_ref[rows, :] = _chunk_output(config, sub, q, k, v, state, scores).astype(o_ref.dtype)
    k_hat = _ChunkFactors.scale(k.astype(jnp.float32), sub.k_factor).astype(dtype)
    return _ChunkFactors.scale(state, sub.state_decay) + _dot_tn(v, k_hat)

  state = lax.fori_loop(0, num_chunks, step, _initial(init_ref, last_ref.shape))

  @pl.when(pl.program_id(1) == segments - 1)
  def _():
    last_ref[...] = state


def _initial(init_ref, shape):
  """The fp32 state a sequential kernel starts from: init_ref's ([] when there is none: zero, so that no zero
  array is written and read for it)."""
  return init_ref[0][...].astype(jnp.float32) if init_ref else jnp.zeros(shape, jnp.float32)


def _dv_kernel(*refs, config, decay_grad):
  """dv = Aᵀ·do + (k ⊙ k_factor)·dS for one chunk and Dv tile; with decay_grad also this tile's part of the
  decay gradient's Σ_v S_e·dS_e (S_e, the state leaving the chunk, is the per-chunk state of the next one)."""
  (q_ref, k_ref, do_ref), g_ref, resets_ref, (dh_ref, *rest) = _split_refs(refs, config, 3)
  scores_ref = rest.pop(0) if config.mode == "vector" else None
  if decay_grad:
    leaving_ref, dv_ref, state_term_ref = rest
    state_term_ref[...] = jnp.sum(leaving_ref[...].astype(jnp.float32) * dh_ref[...].astype(jnp.float32), axis=0)
  else:
    (dv_ref,) = rest
  dtype = q_ref.dtype
  sub = _ChunkFactors(config, g_ref, resets_ref, config.chunk)
  k = k_ref[...]
  scores = _chunk_scores(config, sub, q_ref[...], k, None if scores_ref is None else scores_ref[...])
  k_hat = _ChunkFactors.scale(k.astype(jnp.float32), sub.k_factor).astype(dtype)
  dv = _dot_tn(scores.astype(dtype), do_ref[...]) + _dot_nt(k_hat, dh_ref[...].astype(dtype))
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqdk_kernel(*refs, config, operand_dtype):
  """dq = (do·h) ⊙ q_factor + (dA ⊙ D)·k and dk = (v·dS) ⊙ k_factor + (dA ⊙ D)ᵀ·q for one chunk and Dk tile.

  operand_dtype is float32 when the decay gradient is wanted: it sums q·dq − k·dk, which cancels, so the
  intra-chunk terms (scaled by fp32 decay factors) need more than bf16-operand accuracy. The state terms do·h and
  v·dS, like dA = do·vᵀ, multiply values already in the input/state dtype: 16-bit products are exact in the fp32
  accumulator, so they take one tensor-core pass, not three."""
  (q_ref, k_ref, v_ref, do_ref), g_ref, resets_ref, (h_ref, dh_ref, dq_ref, dk_ref, *x_ref) = _split_refs(
      refs, config, 4)
  dtype = operand_dtype
  dot = functools.partial(_dot, one_pass=config.one_pass_tf32)

  def store(rows, out_rows, dq, dk):
    """dq, dk of `rows`, and (decay gradient wanted) their q·dq − k·dk in fp32."""
    dq_ref[out_rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[out_rows, :] = dk.astype(dk_ref.dtype)
    if x_ref:
      x_ref[0][out_rows, :] = (q_ref[rows, :].astype(jnp.float32) * dq - k_ref[rows, :].astype(jnp.float32) * dk)

  if config.mode != "vector":
    sub = _ChunkFactors(config, g_ref, resets_ref, config.chunk)
    q, k, do, v = (ref[...] for ref in (q_ref, k_ref, do_ref, v_ref))
    d_scores = (_dot_nt(do, v) * _intra_mask(config, sub.g, sub.resets)).astype(dtype)
    dq_state, dk_state = _state_terms(do, v, h_ref, dh_ref)
    dq = _ChunkFactors.scale(dq_state, sub.q_factor) + _dot(d_scores, k.astype(dtype))
    dk = _ChunkFactors.scale(dk_state, sub.k_factor) + _dot_tn(d_scores, q.astype(dtype))
    store(slice(None), slice(None), dq, dk)
    return
  size, chunk = config.sub_chunk, config.chunk
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  chunk_rows = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  chunk_cols = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
  g_last = _row(g_ref, chunk - 1)
  resets_all = resets_ref[...] if config.has_segments else None
  resets_last = _scalar(resets_ref, chunk - 1) if config.has_segments else None

  def sub_chunk(start, out_start):
    end = start + size - 1
    g_sub = g_ref[pl.ds(start, size), :].astype(jnp.float32)
    do, v = do_ref[pl.ds(start, size), :], v_ref[pl.ds(start, size), :]
    resets_sub = resets_ref[pl.ds(start, size)] if config.has_segments else None
    q_factor, k_factor = _edge_factors(config, g_sub, g_last, resets_sub, resets_last)
    keep = rows >= cols
    same_document = True
    if config.has_segments:
      keep = keep & (resets_sub[:, None] == resets_sub[None, :])
      same_document = resets_sub[:, None] == resets_all[None, :]
    d_scores = jnp.where(keep, _dot_nt(do, v), 0.0)  # the diagonal block of dA = do·vᵀ

    # dq of this sub-chunk's queries: the incoming state, the chunk's earlier keys (factors referenced to the
    # row before the sub-chunk, both ≤ 1), the diagonal block below. Whole-chunk operands are loaded
    # where they are used (short live ranges; they sit in L2).
    g_all = g_ref[...].astype(jnp.float32)
    g_before, k_tilde = _earlier_rows(k_ref, g_ref, g_all, start)
    d_earlier = jnp.where((chunk_cols < start) & same_document, _dot_nt(do, v_ref[...]), 0.0)
    dq_state, dk_state = _state_terms(do, v, h_ref, dh_ref)
    dq = dq_state * q_factor + jnp.exp(g_sub - g_before) * dot(d_earlier.astype(dtype), k_tilde.astype(dtype))

    # The diagonal block level by level (_nested_levels), for dq and dk at once.
    k, q = (ref[pl.ds(start, size), :].astype(jnp.float32) for ref in (k_ref, q_ref))
    d_diagonal = jnp.sum(jnp.where(rows == cols, d_scores, 0.0), axis=1)[:, None]
    dq, dk_diagonal = dq + d_diagonal * k, d_diagonal * q
    for a, b, same in _nested_levels(g_sub):
      d_level = jnp.where(same, d_scores, 0.0)
      dq = dq + a * dot(d_level, k * b)
      dk_diagonal = dk_diagonal + b * _dot_tn(d_level, q * a, config.one_pass_tf32)

    # dk of this sub-chunk's keys: the outgoing state gradient, the chunk's later queries (referenced to the
    # sub-chunk's last row), the diagonal block's part from above.
    g_end = _row(g_ref, end)
    q_tilde = _rescaled_rows(q_ref[...].astype(jnp.float32), g_all - g_end, chunk_rows > end)
    d_later = jnp.where((chunk_cols > end) & same_document, _dot_nt(v, do_ref[...]), 0.0)  # dA_ij at [key j, query i]
    dk = dk_state * k_factor + jnp.exp(g_end - g_sub) * dot(d_later.astype(dtype), q_tilde.astype(dtype))
    dk = dk + dk_diagonal
    store(pl.ds(start, size), pl.ds(out_start, size), dq, dk)

  _for_each_sub_chunk(config, sub_chunk)


def _state_terms(do, v, h_ref, dh_ref):
  """(do·h, v·dS) of a chunk's rows in the states' dtype (bf16 states for bf16 inputs: one exact pass)."""
  return _dot(do.astype(h_ref.dtype), h_ref[...]), _dot(v.astype(dh_ref.dtype), dh_ref[...])


# ---------------------------------------------------------------------------------------------- launchers
class _Layout:
  """Shapes and BlockSpecs shared by the launches of one call."""

  def __init__(self, config, batch, padded_time, heads, dim_k, dim_v, dtype):
    self.config, self.batch, self.time, self.heads = config, batch, padded_time, heads
    self.dim_k, self.dim_v = dim_k, dim_v
    self.wide_operands = jnp.dtype(dtype).itemsize >= 4
    self.num_chunks = padded_time // config.chunk
    self.parts = config.parts

  def whole_chunks(self):
    """This layout with one program per chunk (kernels that do not split sub-chunks)."""
    layout = copy.copy(self)
    layout.parts = 1
    return layout

  # Chunk-parallel grid (tile, chunk·parts, batch·head): `parts` programs per chunk each write 1/parts of its rows.
  # The first axis varies fastest in launch order, so the programs sharing a chunk's operands run together and
  # find them in L2 (tiles last: the dq/dk kernel re-read v and do from HBM once per Dk tile).
  def chunk_grid(self, tiles):
    return (tiles, self.num_chunks * self.parts, self.batch * self.heads)

  def chunk_spec(self, width, tiled=False):
    heads, parts = self.heads, self.parts
    return pl.BlockSpec((None, self.config.chunk, None, width),
                        lambda t, n, bh: (bh // heads, n // parts, bh % heads, t if tiled else 0))

  def result_spec(self, width, tiled=False):
    heads = self.heads
    return pl.BlockSpec((None, self.config.chunk // self.parts, None, width),
                        lambda t, n, bh: (bh // heads, n, bh % heads, t if tiled else 0))

  def chunk_g_spec(self, width=None, tiled=False):
    heads, parts = self.heads, self.parts
    if self.config.mode == "scalar":
      return pl.BlockSpec((self.config.chunk, None), lambda t, n, bh: (n // parts, bh % heads))
    return self.chunk_spec(width or self.dim_k, tiled)

  def chunk_resets_spec(self):
    heads, parts = self.heads, self.parts
    return pl.BlockSpec((None, self.config.chunk), lambda t, n, bh: (bh // heads, n // parts))

  def chunk_state_spec(self, rows, columns, tile_rows, next_chunk=False):
    """The state [rows, columns] of each chunk; next_chunk: of the chunk after it, the state leaving it (the last
    chunk reads its own, a placeholder for the final state, which the per-chunk states lack)."""
    heads, parts, last = self.heads, self.parts, self.num_chunks - 1
    chunk = (lambda n: jnp.minimum(n // parts + 1, last)) if next_chunk else (lambda n: n // parts)
    return pl.BlockSpec((None, None, None, rows, columns),
                        lambda t, n, bh: (bh // heads, chunk(n), bh % heads, t if tile_rows else 0,
                                          0 if tile_rows else t))

  def chunk_row_spec(self, width):
    """One [width] row per chunk and value tile: [B, N, H, tiles, width] (the decay gradient's state term)."""
    heads = self.heads
    return pl.BlockSpec((None, None, None, None, width), lambda t, n, bh: (bh // heads, n, bh % heads, t, 0))

  # Grid of the sequential kernels (segment·batch·head, Dk tile, Dv tile): each program walks one of `segments`
  # equal stretches of time (all of it when segments is 1).
  def _segment_index(self):
    rows, heads = self.batch * self.heads, self.heads
    return lambda i: (i % rows // heads, i // rows, i % heads)  # (batch, segment, head)

  def scan_spec(self, width, tile_axis, segments):
    index = self._segment_index()
    return pl.BlockSpec((None, self.time // segments, None, width),
                        lambda i, ik, iv: (*index(i), (ik, iv)[tile_axis]))

  def scan_g_spec(self, width, segments):
    if self.config.mode == "scalar":
      index = self._segment_index()
      return pl.BlockSpec((self.time // segments, None), lambda i, ik, iv: index(i)[1:])
    return self.scan_spec(width, 0, segments)

  def scan_resets_spec(self, segments):
    index = self._segment_index()
    return pl.BlockSpec((None, self.time // segments), lambda i, ik, iv: index(i)[:2])

  def scan_state_spec(self, tile_k, tile_v, segments, per_chunk):
    """Per chunk: [B,N,H,Dv,Dk], a segment's chunks per program; else one state per segment [B,S,H,Dv,Dk]."""
    index = self._segment_index()
    rows = self.num_chunks // segments if per_chunk else None
    return pl.BlockSpec((None, rows, None, tile_v, tile_k), lambda i, ik, iv: (*index(i), iv, ik))

  def extras(self, g, resets):
    return [x for x in (g, resets) if x is not None]


def _state_tiles(layout, segmented):
  """(Dk tile, Dv tile) of the state scans; segmented 16-bit scans take segment_scan_tile-wide tiles."""
  config = layout.config
  width = config.scan_tile
  if segmented and not layout.wide_operands:
    width = max(width, config.segment_scan_tile)
  return min(width, layout.dim_k), min(width, layout.dim_v)


def _scan_plan(layout):
  """(segments, Dk tile, Dv tile) of the state scans (see SEGMENT_SCANS_BELOW)."""
  programs = lambda tile_k, tile_v: layout.batch * layout.heads * (layout.dim_k // tile_k) * (layout.dim_v // tile_v)
  tiles = _state_tiles(layout, segmented=False)
  if programs(*tiles) >= SEGMENT_SCANS_BELOW:
    return 1, *tiles
  wide = _state_tiles(layout, segmented=True)
  segments = _segments(layout.num_chunks, programs(*wide), layout.config.segment_programs)
  return (1, *tiles) if segments == 1 else (segments, *wide)


def _segments(num_chunks, programs, target):
  """Segments for a sequential kernel of `programs` programs over num_chunks chunks: doubled while the programs
  stay under `target` and each segment keeps MIN_SEGMENT_CHUNKS chunks (equal segments: a power of two dividing
  num_chunks). target 0: one segment."""
  segments = 1
  while (programs * segments < target and num_chunks % (2 * segments) == 0
         and num_chunks // (2 * segments) >= MIN_SEGMENT_CHUNKS):
    segments *= 2
  return segments


def _state_scan_call(layout, a, b, g, resets, init, state_dtype, reverse, segments, tiles, per_chunk):
  """The state scan over each of `segments` segments from init [B,S,H,Dv,Dk] f32 (the state entering each segment
  in the scan's direction; None: zero) with (Dk, Dv) state `tiles`; returns ([per-chunk states [B,N,H,Dv,Dk]
  state_dtype] if per_chunk, the state leaving each segment [B,S,H,Dv,Dk] f32)."""
  config = layout.config
  tile_k, tile_v = tiles
  grid = (segments * layout.batch * layout.heads, layout.dim_k // tile_k, layout.dim_v // tile_v)
  in_specs = [layout.scan_spec(tile_k, 0, segments), layout.scan_spec(tile_v, 1, segments)]
  if g is not None:
    in_specs.append(layout.scan_g_spec(tile_k, segments))
  if resets is not None:
    in_specs.append(layout.scan_resets_spec(segments))
  segment_state = layout.scan_state_spec(tile_k, tile_v, segments, per_chunk=False)
  in_specs += [segment_state] * (init is not None)
  per_segment = (layout.batch, segments, layout.heads, layout.dim_v, layout.dim_k)
  out_specs, out_shape = [segment_state], [jax.ShapeDtypeStruct(per_segment, jnp.float32)]
  if per_chunk:
    out_specs.insert(0, layout.scan_state_spec(tile_k, tile_v, segments, per_chunk=True))
    out_shape.insert(0, jax.ShapeDtypeStruct(
        (layout.batch, layout.num_chunks, layout.heads, layout.dim_v, layout.dim_k), state_dtype))
  programs = grid[0] * grid[1] * grid[2]
  if config.scan_unroll is not None:
    unroll = config.scan_unroll
  else:  # 128-wide unrolled tiles asked for 257 KB of shared memory (227 KB on the H200)
    unroll = SCAN_UNROLL if programs < LATENCY_BOUND_PROGRAMS and tile_k * tile_v <= 64 * 64 else 1
  kernel = functools.partial(_state_scan_kernel, config=config, num_chunks=layout.num_chunks // segments,
                             reverse=reverse, per_chunk=per_chunk, unroll=unroll, has_init=init is not None)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(config, num_warps=4), interpret=_interpret(),
      name="linear_attention_state_scan" + ("_reverse" if reverse else "") + ("" if per_chunk else "_segments"),
  )(a, b, *layout.extras(g, resets), *_present(init))


def _present(*arrays):
  return [x for x in arrays if x is not None]


def _segment_decays(layout, g, resets, segments):
  """The factor each segment applies to the state crossing it, broadcastable to [B,S,H,Dk]: the product of its
  chunks' state decays, exp(Σ of the chunks' last g) and zero where a document starts inside."""
  config, chunk = layout.config, layout.config.chunk
  per_segment = layout.num_chunks // segments
  decay = jnp.ones((1, segments, 1, 1), jnp.float32)
  if config.mode == "scalar":  # g [T, H]
    ends = g[chunk - 1::chunk].reshape(segments, per_segment, layout.heads)
    decay = jnp.exp(ends.sum(axis=1))[None, :, :, None]
  elif config.mode == "vector":  # g [B, T, H, Dk]
    ends = g[:, chunk - 1::chunk].reshape(layout.batch, segments, per_segment, layout.heads, layout.dim_k)
    decay = jnp.exp(ends.sum(axis=2))
  if resets is not None:
    carried = (resets[:, chunk - 1::chunk] == 0).reshape(layout.batch, segments, per_segment).all(axis=-1)
    decay = decay * carried[:, :, None, None]
  return decay


def _combine_kernel(local_ref, decay_ref, *refs, segments, reverse):
  """Level 2 of the two-level scan for one state tile: walks the segments in order, S_in(s) ← the state entering
  segment s, S ← decay_s ⊙ S + local_s (the segment's own contribution, from zero); from init_ref's state, or zero
  without one."""
  *init_ref, starts_ref, last_ref = refs

  def step(index, state):
    s = segments - 1 - index if reverse else index
    starts_ref[s] = state
    return state * decay_ref[pl.ds(s, 1), :] + local_ref[s]

  last_ref[...] = lax.fori_loop(0, segments, step, _initial(init_ref, last_ref.shape))


def _segment_starts(layout, a, b, g, resets, init, reverse, segments, tiles):
  """Two-level scan, levels 1 and 2: every segment's local final state from zero (in parallel, state `tiles`),
  then the sequential combine over the few segments (a small kernel: as one XLA fusion of the chain it took
  8–110 µs). Returns (the state entering each segment [B,S,H,Dv,Dk], the last state [B,H,Dv,Dk]), both f32; init
  [B,H,Dv,Dk] (None: zero) enters the first segment (the last one when reverse)."""
  batch, heads, dim_k, dim_v = layout.batch, layout.heads, layout.dim_k, layout.dim_v
  (local,) = _state_scan_call(layout, a, b, g, resets, None, None, reverse, segments, tiles, per_chunk=False)
  decay = jnp.broadcast_to(_segment_decays(layout, g, resets, segments), (batch, segments, heads, dim_k))
  tile_k, tile_v = min(COMBINE_TILE, dim_k), min(COMBINE_TILE, dim_v)
  segment_tiles = pl.BlockSpec((None, segments, None, tile_v, tile_k),
                               lambda bh, ik, iv: (bh // heads, 0, bh % heads, iv, ik))
  state_tile = pl.BlockSpec((None, None, tile_v, tile_k), lambda bh, ik, iv: (bh // heads, bh % heads, iv, ik))
  starts, last = pl.pallas_call(
      functools.partial(_combine_kernel, segments=segments, reverse=reverse),
      grid=(batch * heads, dim_k // tile_k, dim_v // tile_v),
      in_specs=[segment_tiles,
                pl.BlockSpec((None, segments, None, tile_k), lambda bh, ik, iv: (bh // heads, 0, bh % heads, ik)),
                *[state_tile] * (init is not None)],
      out_specs=[segment_tiles, state_tile],
      out_shape=[jax.ShapeDtypeStruct(local.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, dim_v, dim_k), jnp.float32)],
      compiler_params=_compiler_params(layout.config, num_warps=4), interpret=_interpret(),
      name="linear_attention_segment_combine",
  )(local, decay, *_present(init))
  return starts, last


def _state_scan(layout, a, b, g, resets, init, state_dtype, reverse):
  """Runs the state scan; returns (per-chunk states [B,N,H,Dv,Dk] state_dtype, last state [B,H,Dv,Dk] f32).
  Latency-bound shapes (few programs, many chunks) run it as a two-level scan over segments."""
  segments, *tiles = _scan_plan(layout)
  if segments == 1:
    states, last = _state_scan_call(layout, a, b, g, resets, None if init is None else init[:, None], state_dtype,
                                    reverse, 1, tiles, True)
    return states, last[:, 0]
  starts, last = _segment_starts(layout, a, b, g, resets, init, reverse, segments, tiles)
  states, _ = _state_scan_call(layout, a, b, g, resets, starts, state_dtype, reverse, segments, tiles, True)
  return states, last


# 32-bit operands take twice the shared memory: 128-wide tiles with Dk = 256 asked for 320 KB on the H200
# (227 KB available), so they use 64-wide tiles.
def _value_tile(layout):
  return min(64 if layout.wide_operands else 128, layout.dim_v)


def _key_tile(layout):
  """Dk tile of the dq/dk kernel: config.key_tile when given (more programs, fewer registers each), else
  VECTOR_KEY_TILE with per-key-channel decay and the whole Dk (64 with 32-bit operands) without."""
  config = layout.config
  default = VECTOR_KEY_TILE if config.mode == "vector" else (64 if layout.wide_operands else 128)
  return min(config.key_tile or default, layout.dim_k)


def _intra_scores(layout, q, k, g, resets):
  """Vector decay: A [B,T,H,C], row t holding A_tj for the keys j of t's chunk (in q's dtype, as the output and
  dv kernels use it)."""
  config = layout.config
  in_specs = [layout.chunk_spec(layout.dim_k), layout.chunk_spec(layout.dim_k), layout.chunk_g_spec()]
  if resets is not None:
    in_specs.append(layout.chunk_resets_spec())
  return pl.pallas_call(
      functools.partial(_intra_scores_kernel, config=config),
      grid=layout.chunk_grid(1), in_specs=in_specs, out_specs=layout.result_spec(config.chunk),
      out_shape=jax.ShapeDtypeStruct((layout.batch, layout.time, layout.heads, config.chunk), q.dtype),
      compiler_params=_compiler_params(config, num_warps=SCORES_WARPS), interpret=_interpret(),
      name="linear_attention_intra_scores",
  )(q, k, *layout.extras(g, resets))


def _value_tiled_call(kernel, name, layout, q, k, value_like, g, resets, states, scores, out_dtype, leaving=None):
  """A chunk-parallel kernel over (value tile, chunk, batch·head) reading q, k, a [B,T,H,Dv] operand, the
  per-chunk states and (vector decay) the intra-chunk scores, writing a [B,T,H,Dv] result: the forward output
  (v → o) and the dv gradient (do → dv; given the states `leaving` each chunk, also the decay gradient's state
  term). One program per chunk: only matmuls and per-row factors."""
  layout = layout.whole_chunks()
  config = layout.config
  tile_v = _value_tile(layout)
  tiles = layout.dim_v // tile_v
  in_specs = [layout.chunk_spec(layout.dim_k), layout.chunk_spec(layout.dim_k), layout.chunk_spec(tile_v, True)]
  if g is not None:
    in_specs.append(layout.chunk_g_spec())
  if resets is not None:
    in_specs.append(layout.chunk_resets_spec())
  in_specs.append(layout.chunk_state_spec(tile_v, layout.dim_k, tile_rows=True))
  operands = [q, k, value_like, *layout.extras(g, resets), states]
  if scores is not None:
    in_specs.append(layout.chunk_spec(config.chunk))
    operands.append(scores)
  out_specs = [layout.result_spec(tile_v, True)]
  out_shape = [jax.ShapeDtypeStruct((layout.batch, layout.time, layout.heads, layout.dim_v), out_dtype)]
  if leaving is not None:
    in_specs.append(layout.chunk_state_spec(tile_v, layout.dim_k, tile_rows=True, next_chunk=True))
    operands.append(leaving)
    out_specs.append(layout.chunk_row_spec(layout.dim_k))
    out_shape.append(jax.ShapeDtypeStruct((layout.batch, layout.num_chunks, layout.heads, tiles, layout.dim_k),
                                          jnp.float32))
  return pl.pallas_call(
      kernel, grid=layout.chunk_grid(tiles), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(config), interpret=_interpret(), name=name,
  )(*operands)


def _output(layout, q, k, v, g, resets, states, scores, out_dtype):
  (out,) = _value_tiled_call(functools.partial(_output_kernel, config=layout.config), "linear_attention_output",
                             layout, q, k, v, g, resets, states, scores, out_dtype)
  return out


def _fused_forward(layout, q, k, v, g, resets, init, scores, out_dtype):
  """(o [B,T,H,Dv], last state [B,H,Dv,Dk] f32) by the fused kernel; with few programs the segments' starting
  states come from the first two levels of the two-level scan."""
  config, heads = layout.config, layout.heads
  tile_v = min(config.fused_value_tile, layout.dim_v)
  tiles = layout.dim_v // tile_v
  segments = _segments(layout.num_chunks, tiles * layout.batch * layout.heads, config.segment_programs)
  starts = None if init is None else init[:, None]
  if segments > 1:
    starts, _ = _segment_starts(layout, k, v, g, resets, init, False, segments, _state_tiles(layout, True))
  rows = layout.time // segments
  time_spec = lambda width, tiled=False: pl.BlockSpec(
      (None, rows, None, width), lambda t, s, bh: (bh // heads, s, bh % heads, t if tiled else 0))
  state_spec = pl.BlockSpec((None, None, None, tile_v, layout.dim_k),
                            lambda t, s, bh: (bh // heads, s, bh % heads, t, 0))
  in_specs = [time_spec(layout.dim_k), time_spec(layout.dim_k), time_spec(tile_v, True)]
  if config.mode == "scalar":
    in_specs.append(pl.BlockSpec((rows, None), lambda t, s, bh: (s, bh % heads)))
  elif config.mode == "vector":
    in_specs.append(time_spec(layout.dim_k))
  if resets is not None:
    in_specs.append(pl.BlockSpec((None, rows), lambda t, s, bh: (bh // heads, s)))
  in_specs += [state_spec] * (starts is not None)
  operands = [q, k, v, *layout.extras(g, resets), *_present(starts)]
  if scores is not None:
    in_specs.append(time_spec(config.chunk))
    operands.append(scores)
  # Only the last segment's program stores the state leaving it: the final state [B,H,Dv,Dk].
  last_spec = pl.BlockSpec((None, None, tile_v, layout.dim_k), lambda t, s, bh: (bh // heads, bh % heads, t, 0))
  return pl.pallas_call(
      functools.partial(_fused_forward_kernel, config=config, num_chunks=layout.num_chunks // segments,
                        has_init=starts is not None, segments=segments),
      grid=(tiles, segments, layout.batch * heads), in_specs=in_specs,
      out_specs=[time_spec(tile_v, True), last_spec],
      out_shape=[jax.ShapeDtypeStruct((layout.batch, layout.time, heads, layout.dim_v), out_dtype),
                 jax.ShapeDtypeStruct((layout.batch, heads, layout.dim_v, layout.dim_k), jnp.float32)],
      compiler_params=_compiler_params(config), interpret=_interpret(), name="linear_attention_fused_forward",
  )(*operands)


def _grad_dv(layout, q, k, do, g, resets, d_states, scores, out_dtype, states=None):
  """dv, and given the per-chunk `states`, the decay gradient's state term per chunk and Dv tile (the last
  chunk's a placeholder: its leaving state is the final one, which the caller has)."""
  kernel = functools.partial(_dv_kernel, config=layout.config, decay_grad=states is not None)
  return _value_tiled_call(kernel, "linear_attention_grad_v", layout, q, k, do, g, resets, d_states, scores,
                           out_dtype, leaving=states)


def _grad_dqdk(layout, q, k, v, do, g, resets, states, d_states, out_dtype, decay_grad):
  """dq, dk, and with decay_grad the decay gradient's per-row q·dq − k·dk [B,T,H,Dk] f32."""
  config = layout.config
  tile_k = _key_tile(layout)
  in_specs = [layout.chunk_spec(tile_k, True), layout.chunk_spec(tile_k, True),
              layout.chunk_spec(layout.dim_v), layout.chunk_spec(layout.dim_v)]
  if g is not None:
    in_specs.append(layout.chunk_g_spec(tile_k, True))
  if resets is not None:
    in_specs.append(layout.chunk_resets_spec())
  in_specs += [layout.chunk_state_spec(layout.dim_v, tile_k, tile_rows=False)] * 2
  shape = (layout.batch, layout.time, layout.heads, layout.dim_k)
  out_shape = [jax.ShapeDtypeStruct(shape, out_dtype)] * 2 + [jax.ShapeDtypeStruct(shape, jnp.float32)] * decay_grad
  operand_dtype = jnp.float32 if decay_grad else q.dtype
  return pl.pallas_call(
      functools.partial(_dqdk_kernel, config=config, operand_dtype=operand_dtype),
      grid=layout.chunk_grid(layout.dim_k // tile_k), in_specs=in_specs,
      out_specs=[layout.result_spec(tile_k, True)] * len(out_shape), out_shape=out_shape,
      compiler_params=_compiler_params(config, num_warps=config.key_warps), interpret=_interpret(),
      name="linear_attention_grad_qk",
  )(q, k, v, do, *layout.extras(g, resets), states, d_states)


# ------------------------------------------------------------------------------------------- the custom op
def _pad_time(x, padded_time):
  if x is None or x.shape[1] == padded_time:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, padded_time - x.shape[1])
  return jnp.pad(x, widths)


def _chunk_cumsum(x, chunk):
  """Inclusive cumulative sum along axis 1 (time), restarting at every chunk (small arrays: XLA)."""
  shape = x.shape
  return jnp.cumsum(x.reshape(shape[0], shape[1] // chunk, chunk, *shape[2:]), axis=2).reshape(shape)


def _chunk_sums_kernel(*refs, reverse):
  """One chunk's fp32 cumulative sums over its rows; reverse: suffix sums plus the chunk's row `offset_ref`."""
  x_ref, *offset_ref, out_ref = refs
  x = x_ref[...].astype(jnp.float32)
  prefix = jnp.cumsum(x, axis=0)  # Triton scans run forward only
  out = (jnp.sum(x, axis=0)[None, :] - prefix + x) if reverse else prefix
  if offset_ref:
    out = out + offset_ref[0][...][None, :]
  out_ref[...] = out


def _chunk_sums(layout, x, reverse=False, offsets=None):
  """Per-chunk cumulative sums over time of x [B,T,H,W] (prefix sums, or suffix sums + offsets [B,N,H,W]), fp32,
  one program per chunk: the gates' chunk-local g and the decay gradient's suffix sums. XLA took 161 µs for the
  first at 8×2048×16×128 on the H200 (1.7 TB/s; as a triangular matmul 192 µs)."""
  layout = layout.whole_chunks()
  width = x.shape[-1]
  heads = layout.heads
  in_specs = [layout.chunk_spec(width)]
  operands = [x]
  if offsets is not None:
    in_specs.append(pl.BlockSpec((None, None, None, width), lambda t, n, bh: (bh // heads, n, bh % heads, 0)))
    operands.append(offsets)
  return pl.pallas_call(
      functools.partial(_chunk_sums_kernel, reverse=reverse),
      grid=layout.chunk_grid(1), in_specs=in_specs, out_specs=layout.result_spec(width),
      out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
      compiler_params=_compiler_params(layout.config, num_warps=4), interpret=_interpret(),
      name="linear_attention_chunk_sums",
  )(*operands)


def _prepare(config, q, k, v, log_decay, segment_ids, gates=None):
  """Pads time to whole chunks (zero q/k/v, zero log-decay) and builds the chunk-local g and reset counts
  (unless `gates`, the forward's (g, resets), are given); returns them with the calls' _Layout."""
  batch, time, heads, dim_k = q.shape
  chunk = config.chunk
  padded_time = -(-time // chunk) * chunk
  layout = _Layout(config, batch, padded_time, heads, dim_k, v.shape[-1], q.dtype)
  q, k, v = (_pad_time(x, padded_time) for x in (q, k, v))
  if gates is not None:
    return q, k, v, *gates, layout
  g = None
  if config.mode == "scalar":
    per_step = jnp.where(jnp.arange(padded_time)[:, None] < time, log_decay.astype(jnp.float32)[None, :], 0.0)
    g = _chunk_cumsum(per_step[None], chunk)[0]  # [T, H]: the same for every batch row
  elif config.mode == "vector":
    g = _chunk_sums(layout, _pad_time(log_decay, padded_time))
  resets = None
  if config.has_segments:
    starts = _pad_time(reference.segment_starts(segment_ids, batch, time).astype(jnp.int32), padded_time)
    resets = _chunk_cumsum(starts, chunk)
  return q, k, v, g, resets, layout


def _state_dtype(dtype):
  # bf16 states halve the traffic of the materialised per-chunk states (fla does the same); fp16 would overflow.
  return jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32


def _forward(config, q, k, v, log_decay, initial_state, segment_ids):
  """((o, final state), what the backward reuses: (chunk-local g, resets), the intra-chunk scores A (vector
  decay, else None) and the per-chunk states (None from the fused forward, which never stores them))."""
  time = q.shape[1]
  qp, kp, vp, g, resets, layout = _prepare(config, q, k, v, log_decay, segment_ids)
  init = _value_major(initial_state)
  scores = _intra_scores(layout, qp, kp, g, resets) if config.mode == "vector" else None
  states = None
  if config.fused_forward:
    out, last = _fused_forward(layout, qp, kp, vp, g, resets, init, scores, v.dtype)
  else:
    states, last = _state_scan(layout, kp, vp, g, resets, init, _state_dtype(q.dtype), reverse=False)
    out = _output(layout, qp, kp, vp, g, resets, states, scores, v.dtype)
  return (out[:, :time], jnp.swapaxes(last, -1, -2)), ((g, resets), scores, states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _linear_attention(q, k, v, log_decay, initial_state, segment_ids, config):
  return _forward(config, q, k, v, log_decay, initial_state, segment_ids)[0]


def _linear_attention_fwd(q, k, v, log_decay, initial_state, segment_ids, config):
  # symbolic_zeros: the primals arrive wrapped, telling whether a decay gradient is wanted at all (TNL's decay
  # is a fixed buffer); only then does the backward pay for fp32 dq/dk.
  wants_decay_grad = log_decay is not None and log_decay.perturbed
  # The backward takes the forward's chunk-local gates (fla saves its g_cumsum too) and, from the unfused forward,
  # its per-chunk states: O((T/C)·Dk·Dv) more memory than fla keeps, one state scan less than it runs (HGRN2,
  # H200 8×2048×16×128: 295 µs, kernel_profile_h200_session6.md). log_decay's value is not needed: a
  # zero-size marker of its dtype says that its gradient is wanted.
  q, k, v, log_decay, initial_state, segment_ids = (
      None if x is None else x.value for x in (q, k, v, log_decay, initial_state, segment_ids))
  (out, final_state), saved = _forward(config, q, k, v, log_decay, initial_state, segment_ids)
  marker = jnp.zeros((0,), log_decay.dtype) if wants_decay_grad else None
  return (out, final_state), (q, k, v, initial_state, segment_ids, final_state, saved, marker)


def _dense(cotangent, like):
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, like.dtype)
  return cotangent


def _value_major(state):
  """A [B,H,Dk,Dv] state (or its gradient) as the kernels take it, [B,H,Dv,Dk] f32; None (a zero state, or a
  symbolic-zero gradient) stays None: the kernels start from zero without writing and reading a zero array."""
  if state is None or isinstance(state, jax.custom_derivatives.SymbolicZero):
    return None
  return jnp.swapaxes(state.astype(jnp.float32), -1, -2)


def _linear_attention_bwd(config, residuals, cotangents):
  q, k, v, initial_state, segment_ids, final_state, (gates, scores, states), marker = residuals
  wants_decay_grad = marker is not None
  d_out = _dense(cotangents[0], v)
  time = q.shape[1]
  qp, kp, vp, g, resets, layout = _prepare(config, q, k, v, None, segment_ids, gates)
  dop = _pad_time(d_out.astype(v.dtype), layout.time)
  # One decay per head sums the per-row decay gradients over the whole sequence, which cancels again: bf16
  # states gave it 1.0e-2 of relative error with strong decay (a trainable TNL decay; HGRN2 keeps bf16 states).
  state_dtype = jnp.float32 if (wants_decay_grad and config.mode == "scalar") else _state_dtype(q.dtype)
  last = jnp.swapaxes(final_state, -1, -2)
  if states is None or states.dtype != state_dtype:  # the fused forward's, or bf16 where fp32 is needed
    states, last = _state_scan(layout, kp, vp, g, resets, _value_major(initial_state), state_dtype, reverse=False)
  d_states, d_init = _state_scan(layout, qp, dop, g, resets, _value_major(cotangents[1]), state_dtype, reverse=True)
  dv, *state_term = _grad_dv(layout, qp, kp, dop, g, resets, d_states, scores, v.dtype,
                             states if wants_decay_grad else None)
  dq, dk, *per_step = _grad_dqdk(layout, qp, kp, vp, dop, g, resets, states, d_states, q.dtype, wants_decay_grad)
  d_log_decay = None
  if wants_decay_grad:
    # The last chunk's S_e·dS_e (the kernel read a placeholder): the exact fp32 final state, and dS_T as the
    # kernels saw it (bf16 d_states), so that it cancels against their q·dq − k·dk. A bf16 S_T cost 1.6e-2 of
    # relative error (scalar decay), the unrounded dS_T 1.1e-2 (vector), this 2.9e-3 (benchmarks/kernels.py --check).
    final_term = jnp.sum(last * d_states[:, -1].astype(jnp.float32), axis=-2)  # [B,H,Dk]
    state_term = state_term[0].sum(axis=3).at[:, -1].set(final_term)
    d_log_decay = _decay_grad(layout, *per_step, state_term, time).astype(marker.dtype)
  d_initial = None if initial_state is None else jnp.swapaxes(d_init, -1, -2).astype(initial_state.dtype)
  return (dq[:, :time], dk[:, :time], dv[:, :time], d_log_decay, d_initial, None)


def _decay_grad(layout, per_step, state_term, time):
  """d log α: per row r, Σ_{r≤t≤e} (q·dq − k·dk)_t + Σ_v S_e·dS_e (module docstring) from the per-row
  q·dq − k·dk [B,T,H,Dk] (chunk-padded) and Σ_v S_e·dS_e per chunk [B,N,H,Dk]; [B,T,H,Dk] for vector decay, [H]
  for a scalar decay per head (which acts on every row and channel)."""
  per_row = _chunk_sums(layout, per_step, reverse=True, offsets=state_term)[:, :time]
  return per_row if layout.config.mode == "vector" else per_row.sum(axis=(0, 1, 3))


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd, symbolic_zeros=True)


def default_chunk_size(vector_decay: bool) -> int:
  return VECTOR_CHUNK_SIZE if vector_decay else DEFAULT_CHUNK_SIZE


def linear_attention_gpu(q, k, v, log_decay, initial_state, segment_ids, chunk_size, *, num_warps=None, num_stages=2,
                         scan_tile=SCAN_TILE, split_sub_chunks=None, key_tile=None, key_warps=None,
                         scan_unroll=None, fused_forward=None, segment_programs=SEGMENT_PROGRAMS,
                         fused_value_tile=FUSED_VALUE_TILE, segment_scan_tile=SEGMENT_SCAN_TILE, one_pass_tf32=None,
                         score_levels=SCORE_LEVELS):
  """"pallas_gpu" backend: (o [B,T,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] f32). See the module docstring.

  The keyword options tune the kernels (benchmarks/kernels.py --variants); None picks the measured default:
  num_warps VECTOR_NUM_WARPS or DEFAULT_NUM_WARPS, split_sub_chunks on for per-key-channel decay, whose dq/dk
  kernel takes key_tile VECTOR_KEY_TILE and key_warps VECTOR_KEY_WARPS (else the whole Dk at num_warps),
  scan_unroll SCAN_UNROLL for latency-bound scans with 16-bit operands (fewer than LATENCY_BOUND_PROGRAMS
  programs after splitting time into segments). fused_forward (default: without per-key-channel decay): the forward
  walks the chunks in one kernel instead of storing every chunk's state (else state scan + output kernel), with
  fused_value_tile-wide Dv tiles; segment_programs: the program count under which sequential kernels split time
  into segments (0: never), whose 16-bit state scans then use segment_scan_tile-wide state tiles. one_pass_tf32:
  the per-key-channel dq/dk kernel's fp32 matmuls (the decay gradient's intra-chunk terms) in one TF32 pass
  instead of three (default: for 16-bit inputs, ONE_PASS_TF32_BELOW_32_BIT). score_levels: the forward score
  kernel's diagonal blocks take that many halvings as matmuls before the elementwise loop (_diag_block)."""
  batch, time, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in _SUPPORTED_DTYPES:
      raise TypeError(f"pallas_gpu: {name} has dtype {x.dtype}; valid: float32, bfloat16, float16.")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"pallas_gpu: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  for name, dim in (("dim_k", dim_k), ("dim_v", dim_v)):
    if not _is_power_of_two(dim) or dim < 16:
      raise ValueError(f"pallas_gpu: {name}={dim}; valid: a power of two >= 16 (Triton block rule).")
  if not fits_shared_memory(q.dtype, dim_k, dim_v):
    raise ValueError(f"pallas_gpu: {jnp.dtype(q.dtype).name} inputs with dim_k={dim_k}, dim_v={dim_v} need more "
                     f"shared memory than an H100/H200 block has (227 KB); valid: dims <= {MAX_WIDE_DIM} for "
                     "32-bit inputs, or bfloat16/float16 inputs (backend='xla' takes any).")
  mode = "none" if log_decay is None else ("scalar" if log_decay.ndim == 1 else "vector")
  vector_decay = mode == "vector"
  requested = default_chunk_size(vector_decay) if chunk_size is None else chunk_size
  if not _is_power_of_two(requested) or requested < 16:
    raise ValueError(f"pallas_gpu: chunk_size={chunk_size}; valid: None or a power of two >= 16.")
  # Short sequences use a smaller chunk (as fla does), never below the 16-row Triton matmul minimum.
  chunk = min(requested, max(16, 1 << max(time - 1, 0).bit_length()))
  if num_warps is None:
    num_warps = VECTOR_NUM_WARPS if vector_decay else DEFAULT_NUM_WARPS
  if fused_forward is None:
    fused_forward = not vector_decay
  if one_pass_tf32 is None:
    one_pass_tf32 = ONE_PASS_TF32_BELOW_32_BIT and jnp.dtype(q.dtype).itemsize < 4
  config = _Config(mode, segment_ids is not None, chunk, num_warps, num_stages, scan_tile,
                   vector_decay if split_sub_chunks is None else split_sub_chunks, key_tile,
                   key_warps or (VECTOR_KEY_WARPS if vector_decay else num_warps), scan_unroll, fused_forward,
                   segment_programs, fused_value_tile, segment_scan_tile, one_pass_tf32, score_levels)
  return _linear_attention(q, k, v, log_decay, initial_state, segment_ids, config)
