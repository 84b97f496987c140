"""Intra-chunk scores with per-key-channel decay (HGRN2): A_ij = Σ_d q_id k_jd exp(g_id − g_jd) is no plain matmul.
Chunks split into 16-token sub-chunks with no state carried through them: a sub-chunk's queries read the chunk's
earlier keys through one matmul whose factors are referenced to the row at the sub-chunk's edge (both <= 1), and
the diagonal 16x16 blocks are exact for any gate strength (as fla's chunk_gla). Where a chunk's gates decay slowly
enough that factors referenced to its middle row stay far inside fp32's range (config.diagonal_span_limit), its
scores are one matmul instead."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention.gpu.blocks import (
  causal_mask,
  compiler_params,
  earlier_rows,
  exp,
  interpret_mode,
  intra_mask,
  load_row,
  matmul,
  matmul_nt,
  span_within_limit,
  split_refs,
)


def nested_levels(g):
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
    g_reference = matmul((pair_cols == reference).astype(jnp.float32), g)
    # One exponential per element: each row is in exactly one half, so a and b share it.
    factor = exp(jnp.where(second, g - g_reference, g_reference - g))
    a = jnp.where(second, factor, 0.0)
    b = jnp.where(second, 0.0, factor)
    yield a, b, (pair_rows >> shift) == (pair_cols >> shift)
    half //= 2


def _block_rows(ref, start, sub, width, offset):
  """[sub, W] fp32: for each row i of the sub-chunk at `start`, ref's row i − (i mod width) + offset (one row load
  per width-row block, merged by selects: Triton has no gathers)."""
  rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
  merged = load_row(ref, start + offset)
  for first in range(width, sub, width):
    merged = jnp.where(rows >= first, load_row(ref, start + first + offset), merged)
  return merged


def _diag_block(q_sub, k_ref, g_sub, g_ref, start, sub, levels, dtype):
  """Vector decay: the [c,c] block A_ij = Σ_d q_id k_jd exp(g_id − g_jd) (i ≥ j; document masks are the
  caller's) with no exponent ever positive. The first `levels` halvings of nested_levels are one matmul each
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
    factor = exp(jnp.where(second, g_sub - g_reference, g_reference - g_sub))
    a = jnp.where(second, q_sub * factor, 0.0).astype(dtype)
    b = jnp.where(second, 0.0, k_sub * factor).astype(dtype)
    shift = width.bit_length() - 1
    block = block + jnp.where((pair_rows >> shift) == (cols >> shift), matmul_nt(a, b), 0.0)
    width = half
  offsets = rows & (width - 1)

  def add_offset(j, block):
    exponent = jnp.where(offsets >= j, g_sub - _block_rows(g_ref, start, sub, width, j), -jnp.inf)
    column = jnp.sum(q_sub * _block_rows(k_ref, start, sub, width, j) * exp(exponent), axis=1)
    return jnp.where(cols == rows - offsets + j, column[:, None], block)

  # A loop, not unrolled: keeps the Triton program (and its compile time) small.
  return lax.fori_loop(0, width, add_offset, block)


def _intra_scores_kernel(*refs, plan):
  """Vector decay: one chunk's masked, decayed attention matrix A_ij = Σ_d q_id k_jd exp(g_id − g_jd) (j ≤ i, one
  document), [C, C], which the output and dv kernels then use as plain matmul operands.

  A chunk whose gates stay within config.diagonal_span_limit of its middle row (span_within_limit) is one matmul
  of rows referenced to that row (fp32 factors; one TF32 pass for 16-bit inputs, config.one_pass_tf32, as A is
  stored in q's dtype). Any other chunk goes one 16-row sub-chunk of queries at a time: the chunk's earlier keys
  through matmuls whose factors are referenced to the row r just before the sub-chunk (q ⊙ exp(g_i − g_r) and
  k ⊙ exp(g_r − g_j), both ≤ 1; the chunk's first sub-chunk has none), the diagonal block by _diag_block
  (config.score_levels matmul halvings, then elementwise), exact for any gate strength. Kept apart from the
  matmul-heavy output kernel, which runs faster without it."""
  (q_ref, k_ref), g_ref, resets_ref, (a_ref,) = split_refs(refs, plan, 2)
  dtype = q_ref.dtype
  size, chunk = plan.sub_chunk, plan.chunk
  block_rows = lax.broadcasted_iota(jnp.int32, (size, chunk), 0)
  block_cols = lax.broadcasted_iota(jnp.int32, (size, chunk), 1)
  resets = resets_ref[...] if plan.has_segments else None

  def sub_chunk(index, carry):
    start = pl.multiple_of(index * size, size)
    q = q_ref[pl.ds(start, size), :].astype(jnp.float32)
    g_q = g_ref[pl.ds(start, size), :].astype(jnp.float32)
    block = _diag_block(q, k_ref, g_q, g_ref, start, size, plan.config.score_levels, dtype)

    def earlier_keys():  # zero from column `start` on
      g_r, k_tilde = earlier_rows(k_ref, g_ref, g_ref[...].astype(jnp.float32), start)
      return matmul_nt((q * exp(g_q - g_r)).astype(dtype), k_tilde.astype(dtype))

    scores = lax.cond(start > 0, earlier_keys, lambda: jnp.zeros((size, chunk), jnp.float32))
    # The [c, c] diagonal block into columns [start, start + c): a one-hot matmul (no dynamic column slicing).
    scores = scores + matmul(block, (block_cols == start + block_rows).astype(jnp.float32))
    if plan.has_segments:
      scores = jnp.where(resets_ref[pl.ds(start, size)][:, None] == resets[None, :], scores, 0.0)
    a_ref[pl.ds(start, size), :] = scores.astype(a_ref.dtype)
    return carry

  def exact():
    lax.fori_loop(0, chunk // size, sub_chunk, 0)

  limit = plan.config.diagonal_span_limit
  if not limit:
    exact()
    return
  g_middle = load_row(g_ref, chunk // 2 - 1)

  def within_span():
    g = g_ref[...].astype(jnp.float32)
    q_tilde = q_ref[...].astype(jnp.float32) * exp(g - g_middle)
    k_tilde = k_ref[...].astype(jnp.float32) * exp(g_middle - g)
    scores = matmul(q_tilde, k_tilde, ((1,), (1,)), one_pass=plan.config.one_pass_tf32)
    a_ref[...] = jnp.where(causal_mask(chunk, resets), scores, 0.0).astype(a_ref.dtype)

  lax.cond(span_within_limit(g_ref, chunk, g_middle, limit), within_span, exact)


def intra_scores(layout, q, k, g, resets):
  """Vector decay: A [B,T,H,C], row t holding A_tj for the keys j of t's chunk (in q's dtype, as the output and
  dv kernels use it). One program per chunk."""
  layout = layout.whole_chunks()
  plan = layout.plan
  in_specs = [layout.chunk_spec(layout.dim_k), layout.chunk_spec(layout.dim_k), layout.chunk_g_spec()]
  if resets is not None:
    in_specs.append(layout.chunk_resets_spec())
  return pl.pallas_call(
    functools.partial(_intra_scores_kernel, plan=plan),
    grid=layout.chunk_grid(1),
    in_specs=in_specs,
    out_specs=layout.result_spec(plan.chunk),
    out_shape=jax.ShapeDtypeStruct((layout.batch, layout.time, layout.heads, plan.chunk), q.dtype),
    compiler_params=compiler_params(plan, plan.config.scores_warps),
    interpret=interpret_mode(),
    name="linear_attention_intra_scores",
  )(q, k, *layout.extras(g, resets))


def chunk_scores(plan, sub, q, k, scores=None):
  """The chunk's masked, decayed q·kᵀ [C, C] in fp32: the intra-score kernel's A (`scores`) for vector decay,
  else computed here."""
  if plan.mode == "vector":
    return scores.astype(jnp.float32)
  return matmul_nt(q, k) * intra_mask(plan, sub.g, sub.resets)
