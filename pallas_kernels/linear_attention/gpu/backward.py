"""The backward: the reverse scan of the state gradient, then two chunk-parallel kernels, dv = Aᵀ·do + k̄·dh (Dv
tiles, A from the forward) and dq, dk (Dk tiles), or (config.fused_backward_dv, no decay gradient) the second alone
computing all three. It takes the forward's chunk-local gates and its per-chunk states, where the forward stored
them, as residuals; otherwise it rescans the states.

The decay gradient telescopes only to the end of each chunk (as fla's chunk_gla does):
d log α_r = Σ_{r≤t≤e} (q·dq − k·dk)_t + Σ_v S_e·dS_e, e the chunk's last row, S_e the state leaving the chunk and
dS_e its gradient from later rows. The suffix sum cancels: the pairs of a key in the chunk and a later chunk's query
enter through k·dk and again through S_e. S_e is not read: it is written as the forward builds it,
S_e = e^Γ·S + Σ_j k̂_j v_jᵀ (S the state entering the chunk, k̂_j = k_j·e^(g_e − g_j)), so its second part is
Σ_j k̂_j·(v_j·dS_e), the very terms of k·dk, summed from the same fp32 values, and they cancel exactly; a stored
S_e (bf16 states, bf16 k̂) would leave bf16 rounding in the difference. The dq/dk kernel emits q·dq − k·dk per row
and Σ_j k_j·dk_state,j per chunk, the dv kernel e^Γ·Σ_v S·dS_e, a small kernel the sums. Only the intra-chunk
pairs still cancel: the dq/dk matmuls keep fp32 operands, and only when a decay gradient is wanted (HGRN2, a
per-token decay).

A fixed decay per head (TNL's, when trainable) wants the sum of those per-row gradients over all rows, where the
cancelling terms are known in closed form: every pair of tokens j ≤ i (one document) enters with weight i − j, the
steps whose decay lies between them. Per chunk of L rows before T, r the row in the chunk:
d log α = Σ_r [(r + 1)·q·dq_state + (L − 1 − r)·k·dk_state + Σ_j (r − j)·(q_r·k_j)·dA_rj D_rj] + L·e^Γ·Σ_v S·dS_e,
S the state entering the chunk (its queries' pairs with earlier chunks, its keys' with later ones, pairs across
it, pairs inside it). No term cancels, so bf16 states and 16-bit dq/dk operands keep it accurate: the backward
of a trainable fixed decay is the fixed decay's plus a q·kᵀ matmul and elementwise sums in the dq/dk kernel and
one more state read in the dv kernel."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention.common import round_up
from pallas_kernels.linear_attention.gpu.blocks import (
  ChunkFactors,
  SlotRef,
  compiler_params,
  edge_factors,
  exp,
  feature_grad,
  for_each_sub_chunk,
  interpret_mode,
  intra_mask,
  load_row,
  load_scalar,
  matmul,
  matmul_nt,
  matmul_tn,
  span_within_limit,
  split_refs,
  tf32,
)
from pallas_kernels.linear_attention.gpu.forward import value_tiled_call
from pallas_kernels.linear_attention.gpu.planning import (
  Slot,
  chunk_sums,
  operand,
  packed_slots,
  pad_operands,
  pad_time,
  prepare,
  slot_of,
  state_dtype,
  value_major,
)
from pallas_kernels.linear_attention.gpu.scans import state_scan
from pallas_kernels.linear_attention.gpu.scores import chunk_scores, nested_levels


def _dv_kernel(*refs, plan, decay_grad):
  """dv = Aᵀ·do + (k ⊙ k_factor)·dS for one chunk and Dv tile; with decay_grad also this tile's part of the
  decay gradient's e^Γ·Σ_v S·dS_e, S the state entering the chunk carried to its end (zero across a document
  start)."""
  (q_ref, k_ref, do_ref), g_ref, resets_ref, (dh_ref, *rest) = split_refs(refs, plan, 3)
  scores_ref = rest.pop(0) if plan.mode == "vector" else None
  sub = ChunkFactors(plan, g_ref, resets_ref, plan.chunk)
  if decay_grad:
    entering_ref, dv_ref, state_term_ref = rest
    carried = entering_ref[...].astype(jnp.float32) * sub.state_decay
    state_term_ref[...] = jnp.sum(carried * dh_ref[...].astype(jnp.float32), axis=0)
  else:
    (dv_ref,) = rest
  dtype = q_ref.dtype
  k = k_ref[...]
  scores = chunk_scores(plan, sub, q_ref[...], k, None if scores_ref is None else scores_ref[...])
  k_hat = ChunkFactors.scale(k.astype(jnp.float32), sub.k_factor).astype(dtype)
  dv = matmul_tn(scores.astype(dtype), do_ref[...]) + matmul_nt(k_hat, dh_ref[...].astype(dtype))
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqdk_kernel(*refs, plan, operand_dtype, time, packed, with_dv):
  """dq = (do·h) ⊙ q_factor + (dA ⊙ D)·k and dk = (v·dS) ⊙ k_factor + (dA ⊙ D)ᵀ·q for one chunk and Dk tile.

  operand_dtype is float32 when a per-key-channel or per-token decay gradient is wanted: it sums q·dq − k·dk,
  which cancels, so the intra-chunk terms (scaled by fp32 decay factors) need more than bf16-operand accuracy (one
  TF32 pass for 16-bit inputs, config.one_pass_tf32; a fixed decay per head takes _head_decay_rows instead, whose
  terms do not cancel). The state terms do·h and v·dS, like dA = do·vᵀ, multiply values already in the
  input/state dtype: 16-bit products are exact in the fp32 accumulator, so they take one tensor-core pass, not
  three. With a decay per key channel or per token the chunk's Σ_j k_j·dk_state,j (module docstring) goes with
  the rows: per program into its own output (vector), onto the chunk's last row (token). packed: dq and dk go into
  slots 0 and 1 of the packed gradient (its dv already written), through the gradient of the plan's feature map,
  read from the raw q and k rows that follow the states. with_dv (no decay per key channel, no decay gradient, one
  Dk tile): the program also writes its chunk's dv = Aᵀ·do + k̂·dSᵀ (config.fused_backward_dv), into slot 2 when
  packed."""
  (q_ref, k_ref, v_ref, do_ref), g_ref, resets_ref, rest = split_refs(refs, plan, 4)
  h_ref, dh_ref, *rest = rest
  raw_q_ref, raw_k_ref = (rest.pop(0), rest.pop(0)) if plan.feature_map else (None, None)
  dv_ref = None
  if packed and with_dv:  # the packed gradient, all three slots
    (dqkv_ref,) = rest
    dq_ref, dk_ref, dv_ref = (SlotRef(dqkv_ref, index) for index in range(3))
    x_ref = []
  elif packed:  # the aliased packed gradient's input ref (never read), then its output ref
    _, dqk_ref, *x_ref = rest
    dq_ref, dk_ref = SlotRef(dqk_ref, 0), SlotRef(dqk_ref, 1)
  elif with_dv:
    dq_ref, dk_ref, dv_ref = rest
    x_ref = []
  else:
    dq_ref, dk_ref, *x_ref = rest
  dtype = operand_dtype
  dot = functools.partial(matmul, one_pass=plan.config.one_pass_tf32)

  def store(rows, out_rows, dq, dk, correction):
    """Vector decay: dq, dk of `rows`, and (decay gradient wanted) their q·dq − k·dk in fp32, plus `correction`
    (config.matched_rounding; None: none)."""
    dq_ref[out_rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[out_rows, :] = dk.astype(dk_ref.dtype)
    if x_ref:
      x = q_ref[rows, :].astype(jnp.float32) * dq - k_ref[rows, :].astype(jnp.float32) * dk
      x_ref[0][out_rows, :] = x if correction is None else x + correction

  if plan.mode != "vector":
    sub = ChunkFactors(plan, g_ref, resets_ref, plan.chunk)
    q, k, do, v = (ref[...] for ref in (q_ref, k_ref, do_ref, v_ref))
    mask = intra_mask(plan, sub.g, sub.resets)
    d_scores = matmul_nt(do, v) * mask
    if dv_ref is not None:  # as the dv kernel: Aᵀ·do + (k ⊙ k_factor)·dSᵀ, dS [Dv, Dk] this program's whole state
      k_hat = ChunkFactors.scale(k.astype(jnp.float32), sub.k_factor).astype(k.dtype)
      scores = (matmul_nt(q, k) * mask).astype(k.dtype)
      dv = matmul_tn(scores, do) + matmul_nt(k_hat, dh_ref[...].astype(k.dtype))
      dv_ref[...] = dv.astype(dv_ref.dtype)
    # A decay per head and token acts on every channel: its rows' q·dq − k·dk summed over this Dk tile.
    token_rows = plan.mode == "token" and bool(x_ref)
    if plan.mode == "scalar" and x_ref:  # before dq, dk: fewer fp32 tiles live at once
      dq_state, dk_state = _state_terms(plan, do, v, h_ref, dh_ref)
      dq_state, dk_state = ChunkFactors.scale(dq_state, sub.q_factor), ChunkFactors.scale(dk_state, sub.k_factor)
      x_ref[0][...] = _head_decay_rows(plan, q, k, dq_state, dk_state, d_scores, time)
    else:  # one state term at a time, each consumed by its gradient
      dq_state = ChunkFactors.scale(_state_product(plan, do, h_ref[...]), sub.q_factor)
      dk_state = None
    dq = dq_state + dot(d_scores.astype(dtype), k.astype(dtype))
    dq_ref[...] = feature_grad(plan, raw_q_ref, dq).astype(dq_ref.dtype)
    if token_rows:
      row_sums = jnp.sum(q.astype(jnp.float32) * dq, axis=1)
    if dk_state is None:
      dk_state = ChunkFactors.scale(_state_product(plan, v, dh_ref[...]), sub.k_factor)
    dk = dk_state + matmul_tn(d_scores.astype(dtype), q.astype(dtype), plan.config.one_pass_tf32)
    dk_ref[...] = feature_grad(plan, raw_k_ref, dk).astype(dk_ref.dtype)
    if token_rows:
      k_dk_state = jnp.sum(k.astype(jnp.float32) * dk_state)
      last_row = lax.broadcasted_iota(jnp.int32, (plan.chunk,), 0) == plan.chunk - 1
      x_ref[0][...] = row_sums - jnp.sum(k.astype(jnp.float32) * dk, axis=1) + jnp.where(last_row, k_dk_state, 0.0)
    return
  size, chunk = plan.sub_chunk, plan.chunk
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  g_last = load_row(g_ref, chunk - 1)
  resets_last = load_scalar(resets_ref, chunk - 1) if plan.has_segments else None
  matched = plan.config.matched_rounding and plan.config.one_pass_tf32 and bool(x_ref)
  diagonal_one_pass = plan.config.one_pass_tf32 and not plan.config.three_pass_diagonal
  dot_within = functools.partial(matmul, one_pass=diagonal_one_pass)

  limit = plan.config.diagonal_span_limit
  if limit:  # one decision per program: its sub-chunks share the chunk's reference row
    g_middle = load_row(g_ref, chunk // 2 - 1)
    within_limit = span_within_limit(g_ref, chunk, g_middle, limit)
  block_rows = lax.broadcasted_iota(jnp.int32, (size, chunk), 0)
  block_cols = lax.broadcasted_iota(jnp.int32, (size, chunk), 1)

  def exact_pairs(start, g_sub, q, k, do, v, resets_sub):
    """(dq, dk) of the sub-chunk's pairs within the chunk for any gate strength, with the matched_rounding
    correction (None without): the chunk's other sub-chunks one 16-row block at a time, the diagonal block level
    by level."""
    end = start + size - 1
    keep = rows >= cols
    if plan.has_segments:
      keep = keep & (resets_sub[:, None] == resets_sub[None, :])
    d_scores = jnp.where(keep, matmul_nt(do, v), 0.0)  # the diagonal block of dA = do·vᵀ

    def block_pairs(first, last, pair_scores, rescaled, adjacent_first):
      """(Σ over the 16-row blocks first..last − 1 of the chunk (the other sub-chunks this one pairs with, only
      those: their factors need those rows alone) of dot(dA block, rescaled rows), with `matched` the adjacent
      block's term alone (its rescaled rows rounded to TF32 first), else None). The adjacent block is `first`
      (adjacent_first) or last − 1: the one whose factors share this sub-chunk's reference row."""

      def term(index, rounded=False):
        block = pl.ds(pl.multiple_of(index * size, size), size)
        d_block = pair_scores(block)
        if plan.has_segments:
          d_block = jnp.where(resets_sub[:, None] == resets_ref[block][None, :], d_block, 0.0)
        operand = rescaled(block).astype(dtype)
        return dot(d_block.astype(dtype), tf32(operand) if rounded else operand)

      add_block = lambda index, total: total + term(index)
      zero = jnp.zeros((size, k_ref.shape[-1]), jnp.float32)
      if not matched:
        return lax.fori_loop(first, last, add_block, zero), None
      present = first < last
      adjacent = jnp.clip(first if adjacent_first else last - 1, 0, chunk // size - 1)
      others = (
        lax.fori_loop(first + 1, last, add_block, zero)
        if adjacent_first
        else lax.fori_loop(first, last - 1, add_block, zero)
      )
      near = jnp.where(present, term(adjacent, rounded=True), 0.0)
      return others + near, near

    # dq of this sub-chunk's queries: the chunk's earlier keys one 16-row block at a time (factors referenced to
    # the row before the sub-chunk, both ≤ 1), the diagonal block below.
    g_before = jnp.where(start > 0, load_row(g_ref, jnp.maximum(start - 1, 0)), 0.0)
    keys_hat = lambda block: k_ref[block, :].astype(jnp.float32) * exp(g_before - g_ref[block, :].astype(jnp.float32))
    dq_earlier, near_q = block_pairs(0, start // size, lambda block: matmul_nt(do, v_ref[block, :]), keys_hat, False)
    dq = exp(g_sub - g_before) * dq_earlier

    # The diagonal block level by level (nested_levels), for dq and dk at once. Its pairs are the nearest tokens',
    # the largest of the terms that cancel in q·dq − k·dk (config.three_pass_diagonal).
    d_diagonal = jnp.sum(jnp.where(rows == cols, d_scores, 0.0), axis=1)[:, None]
    dq, dk_diagonal = dq + d_diagonal * k, d_diagonal * q
    # config.matched_rounding: q·dq − k·dk takes the TF32-rounded factors the one-pass matmuls multiplied (each
    # pair inside the block then enters it twice with the same rounded values and cancels exactly).
    correction = None
    for a, b, same in nested_levels(g_sub):
      d_level = jnp.where(same, d_scores, 0.0)
      key_side, query_side = k * b, q * a
      if matched and diagonal_one_pass:
        key_exact, query_exact = key_side, query_side
        key_side, query_side = tf32(key_side), tf32(query_side)
      from_keys = matmul(d_level, key_side, one_pass=diagonal_one_pass)
      from_queries = matmul_tn(d_level, query_side, diagonal_one_pass)
      dq = dq + a * from_keys
      dk_diagonal = dk_diagonal + b * from_queries
      if matched and diagonal_one_pass:
        level = (query_side - query_exact) * from_keys - (key_side - key_exact) * from_queries
        correction = level if correction is None else correction + level

    # dk of this sub-chunk's keys: the chunk's later queries (referenced to the sub-chunk's last row), the diagonal
    # block's part from above.
    g_end = load_row(g_ref, end)
    queries_hat = lambda block: q_ref[block, :].astype(jnp.float32) * exp(g_ref[block, :].astype(jnp.float32) - g_end)
    # dA_ij at [key j, query i]
    dk_later, near_k = block_pairs(
      end // size + 1, chunk // size, lambda block: matmul_nt(v, do_ref[block, :]), queries_hat, True
    )
    if matched:  # the adjacent blocks' pairs: rows rescaled as the neighbouring sub-chunks' programs rescale them
      q_hat, k_hat = q * exp(g_sub - g_before), k * exp(g_end - g_sub)
      adjacent = (tf32(q_hat) - q_hat) * near_q - (tf32(k_hat) - k_hat) * near_k
      correction = adjacent if correction is None else correction + adjacent
    return dq, exp(g_end - g_sub) * dk_later + dk_diagonal, correction

  def pairs_within_span(start, g_sub, q, k, do, v, resets_sub):
    """(dq, dk) of the sub-chunk's pairs within the chunk when the chunk's gates stay within
    config.diagonal_span_limit of its middle row m (blocks.span_within_limit), with the matched_rounding correction
    (None without): each from one matmul over the chunk's rows referenced to m. Every program of the chunk takes
    the same factors q̃ = q ⊙ e^(g − g_m) and k̃ = k ⊙ e^(g_m − g), so a pair enters q·dq and k·dk as the same
    product (config.three_pass_diagonal: three TF32 passes, the diagonal block's pairs being in them)."""
    g_all = g_ref[...].astype(jnp.float32)
    earlier_keys = block_cols <= start + block_rows  # [query i, key j ≤ i]
    later_queries = block_cols >= start + block_rows  # [key j, query i ≥ j]
    if plan.has_segments:
      same = resets_sub[:, None] == resets_ref[...][None, :]
      earlier_keys, later_queries = earlier_keys & same, later_queries & same
    # dq_i = e^(g_i − g_m) Σ_{j ≤ i} dA_ij k̃_j and dk_j = e^(g_m − g_j) Σ_{i ≥ j} dA_ij q̃_i.
    d_rows = jnp.where(earlier_keys, matmul_nt(do, v_ref[...]), 0.0)
    d_cols = jnp.where(later_queries, matmul_nt(v, do_ref[...]), 0.0)
    k_tilde = (k_ref[...].astype(jnp.float32) * exp(g_middle - g_all)).astype(dtype)
    q_tilde = (q_ref[...].astype(jnp.float32) * exp(g_all - g_middle)).astype(dtype)
    from_keys = dot_within(d_rows.astype(dtype), k_tilde)
    from_queries = dot_within(d_cols.astype(dtype), q_tilde)
    q_factor, k_factor = exp(g_sub - g_middle), exp(g_middle - g_sub)
    correction = None
    if matched:
      correction = jnp.zeros_like(from_keys)
      if diagonal_one_pass:  # q·dq − k·dk from the TF32-rounded factors the matmuls of both sides multiplied
        q_hat, k_hat = q * q_factor, k * k_factor
        correction = (tf32(q_hat) - q_hat) * from_keys - (tf32(k_hat) - k_hat) * from_queries
    return q_factor * from_keys, k_factor * from_queries, correction

  def sub_chunk(start, out_start):
    g_sub = g_ref[pl.ds(start, size), :].astype(jnp.float32)
    do, v = do_ref[pl.ds(start, size), :], v_ref[pl.ds(start, size), :]
    resets_sub = resets_ref[pl.ds(start, size)] if plan.has_segments else None
    q_factor, k_factor = edge_factors(plan, g_sub, g_last, resets_sub, resets_last)
    k, q = (ref[pl.ds(start, size), :].astype(jnp.float32) for ref in (k_ref, q_ref))
    exact = lambda: exact_pairs(start, g_sub, q, k, do, v, resets_sub)
    if limit:
      within = lambda: pairs_within_span(start, g_sub, q, k, do, v, resets_sub)
      dq, dk, correction = lax.cond(within_limit, within, exact)
    else:
      dq, dk, correction = exact()
    dq_state, dk_state = _state_terms(plan, do, v, h_ref, dh_ref)
    dk_state = dk_state * k_factor
    store(pl.ds(start, size), pl.ds(out_start, size), dq_state * q_factor + dq, dk_state + dk, correction)
    return jnp.sum(k * dk_state, axis=0) if x_ref else None

  if x_ref:
    x_ref[1][...] = for_each_sub_chunk(plan, sub_chunk, jnp.zeros(k_ref.shape[-1:], jnp.float32))
  else:
    for_each_sub_chunk(plan, sub_chunk)


def _head_decay_rows(plan, q, k, dq_state, dk_state, d_scores, time):
  """A fixed decay per head: this chunk's rows' part of d log α [C] (this Dk tile's channels), each pair of tokens
  weighted by the steps between them, with no terms that cancel (module docstring): (r + 1)·q·dq_state +
  (L − 1 − r)·k·dk_state + Σ_j (r − j)·(q_r·k_j)·dA_rj D_rj, r the row in the chunk, L the chunk's rows before
  `time` (padding carries no decay)."""
  chunk = plan.chunk
  length = jnp.minimum(time - pl.program_id(1) * chunk, chunk).astype(jnp.float32)
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  position = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0).astype(jnp.float32)
  pairs = matmul_nt(q, k) * d_scores * (rows - cols).astype(jnp.float32)
  edges = (position + 1) * q.astype(jnp.float32) * dq_state + (length - 1 - position) * k.astype(jnp.float32) * dk_state
  return jnp.sum(edges, axis=1) + jnp.sum(pairs, axis=1)


def _state_terms(plan, do, v, h_ref, dh_ref):
  """(do·h, v·dS) of a chunk's rows: 16-bit rows times 16-bit states in one exact pass; fp32 states rounded to the
  rows' dtype, or (config.split_state_products) as that rounding plus its residual in a second pass."""
  return _state_product(plan, do, h_ref[...]), _state_product(plan, v, dh_ref[...])


def _state_product(plan, rows, state):
  if rows.dtype == jnp.float32 or state.dtype != jnp.float32:
    return matmul(rows.astype(state.dtype), state)
  high = state.astype(rows.dtype)
  product = matmul(rows, high)
  if plan.config.split_state_products:
    product = product + matmul(rows, (state - high.astype(jnp.float32)).astype(rows.dtype))
  return product


def _grad_dv(layout, q, k, do, g, resets, d_states, scores, out_dtype, states=None, out_slot=None):
  """dv (out_slot given: in that slot of a packed [B,T,3,H,Dv] gradient), and given the per-chunk `states`, the
  decay gradient's e^Γ·Σ_v S·dS_e per chunk and Dv tile [B,N,H,tiles,Dk]."""
  kernel = functools.partial(_dv_kernel, plan=layout.plan, decay_grad=states is not None)
  return value_tiled_call(
    kernel,
    "linear_attention_grad_v",
    layout,
    q,
    k,
    do,
    g,
    resets,
    d_states,
    scores,
    out_dtype,
    paired=states,
    out_slot=out_slot,
  )


def _grad_dqdk(
  layout,
  q,
  k,
  v,
  do,
  g,
  resets,
  states,
  d_states,
  out_dtype,
  decay_grad,
  time,
  packed_grad=None,
  with_dv=False,
  raw=None,
):
  """dq, dk (given packed_grad, the packed [B,T,3,H,D] gradient holding dv: it, with dq and dk written into its
  slots 0 and 1), and with decay_grad the decay gradient's per-row q·dq − k·dk [B,T,H,Dk] f32 with each program's
  Σ_j k_j·dk_state,j [B,N·parts,H,Dk] (a decay per head and token: summed over each Dk tile, the chunk's sum on its
  last row, [B,T,H,tiles]; a fixed decay per head: _head_decay_rows per Dk tile). with_dv (no decay gradient):
  dq, dk and dv, or for Slots of a packed projection the packed gradient, from this one kernel, whose programs
  then take the whole Dk. raw: the (q, k) Slots the feature map took q and k from (the plan's feature map)."""
  plan = layout.plan
  tile_k = (
    layout.dim_k if with_dv else min(plan.config.decay_key_tile if decay_grad else plan.config.key_tile, layout.dim_k)
  )
  in_specs = [
    layout.chunk_spec(tile_k, True, slot_of(q)),
    layout.chunk_spec(tile_k, True, slot_of(k)),
    layout.chunk_spec(layout.dim_v, slot=slot_of(v)),
    layout.chunk_spec(layout.dim_v),
  ]
  if g is not None:
    in_specs.append(layout.chunk_g_spec(tile_k, True))
  if resets is not None:
    in_specs.append(layout.chunk_resets_spec())
  in_specs += [layout.chunk_state_spec(layout.dim_v, tile_k, tile_rows=False)] * 2
  operands = [operand(q), operand(k), operand(v), do, *layout.extras(g, resets), states, d_states]
  if plan.feature_map:
    in_specs += [layout.chunk_spec(tile_k, True, slot_of(x)) for x in raw]
    operands += [operand(x) for x in raw]
  shape = (layout.batch, layout.time, layout.heads, layout.dim_k)
  aliases = {}
  packed = packed_grad is not None or (with_dv and isinstance(q, Slot))
  if with_dv and packed:
    heads = layout.heads
    out_shape = [jax.ShapeDtypeStruct((*shape[:2], 3, *shape[2:]), out_dtype)]
    out_specs = [pl.BlockSpec((None, plan.chunk, 3, None, tile_k), lambda t, n, bh: (bh // heads, n, 0, bh % heads, 0))]
  elif with_dv:
    values = jax.ShapeDtypeStruct((*shape[:3], layout.dim_v), out_dtype)
    out_shape = [jax.ShapeDtypeStruct(shape, out_dtype)] * 2 + [values]
    out_specs = [layout.result_spec(tile_k, True)] * 2 + [layout.result_spec(layout.dim_v)]
  elif packed_grad is None:
    out_shape = [jax.ShapeDtypeStruct(shape, out_dtype)] * 2
    out_specs = [layout.result_spec(tile_k, True)] * 2
  else:
    in_specs.append(layout.query_key_result_spec(tile_k))
    aliases = {len(operands): 0}
    operands.append(packed_grad)
    out_shape = [jax.ShapeDtypeStruct(packed_grad.shape, packed_grad.dtype)]
    out_specs = [layout.query_key_result_spec(tile_k)]
  if decay_grad and plan.row_gates:  # one row sum per Dk tile
    heads = layout.heads
    out_shape.append(jax.ShapeDtypeStruct((*shape[:3], layout.dim_k // tile_k), jnp.float32))
    out_specs.append(pl.BlockSpec((None, plan.chunk, None, None), lambda t, n, bh: (bh // heads, n, bh % heads, t)))
  elif decay_grad:
    out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
    out_specs.append(layout.result_spec(tile_k, True))
  if decay_grad and plan.mode == "vector":
    heads = layout.heads
    out_shape.append(jax.ShapeDtypeStruct((shape[0], layout.num_chunks * layout.parts, *shape[2:]), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, None, tile_k), lambda t, n, bh: (bh // heads, n, bh % heads, t)))
  operand_dtype = jnp.float32 if decay_grad and plan.mode != "scalar" else q.dtype
  kernel = functools.partial(
    _dqdk_kernel, plan=plan, operand_dtype=operand_dtype, time=time, packed=packed, with_dv=with_dv
  )
  return pl.pallas_call(
    kernel,
    grid=layout.chunk_grid(layout.dim_k // tile_k),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    input_output_aliases=aliases,
    compiler_params=compiler_params(plan, plan.config.key_warps),
    interpret=interpret_mode(),
    name="linear_attention_grad_qk",
  )(*operands)


def _dense(cotangent, like):
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, like.dtype)
  return cotangent


def backward(plan, residuals, cotangents):
  """The custom_vjp's backward rule: gradients of q, k, v, log_decay and initial_state."""
  q, k, v, initial_state, segment_ids, saved, marker = residuals
  (dq, dk, dv), d_log_decay, d_initial = _gradients(
    plan, q, k, v, initial_state, segment_ids, saved, marker, cotangents
  )
  return (dq, dk, dv, d_log_decay, d_initial, None)


def backward_packed(plan, residuals, cotangents):
  """The packed op's backward rule: gradients of the packed projection [B,T,3,H,D], log_decay and initial_state."""
  qkv, mapped, initial_state, segment_ids, saved, marker = residuals
  raw = (Slot(qkv, 0), Slot(qkv, 1)) if plan.feature_map else ()
  (d_qkv,), d_log_decay, d_initial = _gradients(
    plan, *packed_slots(qkv, mapped), initial_state, segment_ids, saved, marker, cotangents, raw
  )
  return (d_qkv, d_log_decay, d_initial, None)


def _gradients(plan, q, k, v, initial_state, segment_ids, saved, marker, cotangents, raw=()):
  """((dq, dk, dv), or (the packed gradient,) for Slots of the packed projection (q and k of its feature map's
  output, whose inputs are the `raw` Slots); d log_decay; d initial_state)."""
  gates, scores, states = saved
  wants_decay_grad = marker is not None
  packed = isinstance(q, Slot)
  d_out = _dense(cotangents[0], v)
  time = q.shape[1]
  q, k, v, *raw = pad_operands((q, k, v, *raw), round_up(time, plan.chunk))
  qp, kp, vp, g, resets, layout = prepare(plan, q, k, v, None, segment_ids, gates)
  dop = pad_time(d_out.astype(v.dtype), layout.time)
  if states is None:  # a fused forward that stored none
    states, _ = state_scan(layout, kp, vp, g, resets, value_major(initial_state), state_dtype(plan, q.dtype), False)
  grads_dtype = state_dtype(plan, q.dtype, gradients=True)
  d_states, d_init = state_scan(layout, qp, dop, g, resets, value_major(cotangents[1]), grads_dtype, reverse=True)
  d_initial = None if initial_state is None else jnp.swapaxes(d_init, -1, -2).astype(initial_state.dtype)
  if plan.config.fused_backward_dv and plan.mode != "vector" and not wants_decay_grad:
    grads = _grad_dqdk(
      layout, qp, kp, vp, dop, g, resets, states, d_states, q.dtype, False, time, with_dv=True, raw=raw
    )
    return tuple(x[:, :time] for x in grads), None, d_initial
  dv, *state_term = _grad_dv(
    layout,
    qp,
    kp,
    dop,
    g,
    resets,
    d_states,
    scores,
    v.dtype,
    states if wants_decay_grad else None,
    2 if packed else None,
  )
  if packed:  # dq and dk into the gradient that holds dv
    d_qkv, *per_step = _grad_dqdk(
      layout, qp, kp, vp, dop, g, resets, states, d_states, q.dtype, wants_decay_grad, time, packed_grad=dv, raw=raw
    )
    input_grads = (d_qkv[:, :time],)
  else:
    dq, dk, *per_step = _grad_dqdk(
      layout, qp, kp, vp, dop, g, resets, states, d_states, q.dtype, wants_decay_grad, time
    )
    input_grads = (dq[:, :time], dk[:, :time], dv[:, :time])
  d_log_decay = None
  if wants_decay_grad and plan.mode == "scalar":
    d_log_decay = _head_decay_grad(layout, *per_step, state_term[0], time).astype(marker.dtype)
  elif wants_decay_grad:
    carried = state_term[0].sum(axis=3)  # [B,N,H,Dk]
    if plan.mode == "vector":
      rows, k_dk_state = per_step
      batch, _, heads, dim_k = k_dk_state.shape
      carried = carried + k_dk_state.reshape(batch, layout.num_chunks, -1, heads, dim_k).sum(axis=2)
      per_step = [rows]
    d_log_decay = _decay_grad(layout, *per_step, carried, time).astype(marker.dtype)
  return input_grads, d_log_decay, d_initial


def _head_decay_grad(layout, rows, state_term, time):
  """d log α [H] of a fixed decay per head: the rows' part [B,T,H,tiles] (_head_decay_rows) plus, per chunk,
  L·e^Γ·Σ_v S·dS_e [B,N,H,tiles,Dk] (the dv kernel's), which every one of its L rows before `time` carries."""
  chunk = layout.plan.chunk
  length = jnp.clip(time - chunk * jnp.arange(layout.num_chunks), 0, chunk).astype(jnp.float32)
  return rows.sum(axis=(0, 1, 3)) + jnp.sum(length[:, None] * state_term.sum(axis=(3, 4)), axis=(0, 1))


def _decay_grad(layout, per_step, state_term, time):
  """d log α: per row r, Σ_{r≤t≤e} (q·dq − k·dk)_t + Σ_v S_e·dS_e (module docstring) from the per-row
  q·dq − k·dk [B,T,H,Dk] (chunk-padded; a decay per head and token: [B,T,H,Dk tiles]) and Σ_v S_e·dS_e per chunk
  [B,N,H,Dk]; [B,T,H,Dk] for vector decay, [B,T,H] for a decay per head and token (which acts on every channel of
  its row)."""
  if layout.plan.mode == "token":
    # Channels summed first: T·H suffix sums (XLA) instead of T·H·Dk.
    batch, padded_time, heads, _ = per_step.shape
    per_chunk = per_step.sum(axis=-1).reshape(batch, layout.num_chunks, layout.plan.chunk, heads)
    per_row = lax.cumsum(per_chunk, axis=2, reverse=True) + state_term.sum(axis=-1)[:, :, None]
    return per_row.reshape(batch, padded_time, heads)[:, :time]
  return chunk_sums(layout, per_step, reverse=True, offsets=state_term)[:, :time]
