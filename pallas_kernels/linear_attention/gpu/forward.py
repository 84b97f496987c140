"""The forward: the output kernel o = q̄·h + A·v (chunk-parallel, matmuls only) after a state scan that stores every
chunk's state, or one fused kernel walking the chunks with the state in registers (fla's fused_chunk form)."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention.gpu.blocks import (
  ChunkFactors,
  compiler_params,
  from_row,
  interpret_mode,
  matmul,
  matmul_nt,
  split_refs,
  starting_state,
)
from pallas_kernels.linear_attention.gpu.planning import (
  in_slot,
  operand,
  prepare,
  present,
  segment_count,
  slot_of,
  state_dtype,
  state_tiles,
  value_major,
)
from pallas_kernels.linear_attention.gpu.scans import scaled_update, segment_start_states, state_scan
from pallas_kernels.linear_attention.gpu.scores import chunk_scores, intra_scores

# The fused forward that also stores every chunk's state: a state kernel to the remat policies, which recompute it
# rather than keep its states when they keep no states.
FUSED_FORWARD_STATES = "linear_attention_fused_forward_states"


def _output_kernel(*refs, plan):
  """o = q̄·h + A·v for one chunk and Dv tile."""
  (q_ref, k_ref, v_ref), g_ref, resets_ref, (h_ref, *scores_ref, o_ref) = split_refs(refs, plan, 3)
  sub = ChunkFactors(plan, g_ref, resets_ref, plan.chunk)
  scores = [ref[...] for ref in scores_ref]
  o_ref[...] = _chunk_output(plan, sub, q_ref[...], k_ref[...], v_ref[...], h_ref[...], *scores).astype(o_ref.dtype)


def _chunk_output(plan, sub, q, k, v, state, scores=None):
  """o = q̄·hᵀ + A·v of one chunk (fp32) from its rows and the state entering it [Dv tile, Dk]."""
  dtype = q.dtype
  scores = chunk_scores(plan, sub, q, k, scores)
  q_bar = ChunkFactors.scale(q.astype(jnp.float32), sub.q_factor).astype(dtype)
  return matmul_nt(q_bar, state.astype(dtype)) + matmul(scores.astype(dtype), v)


def _fused_forward_kernel(*refs, plan, num_chunks, has_init, segments):
  """The forward with the state in registers: one program per (Dv tile, segment, batch·head) walks the
  segment's chunks from the state entering it, o = q̄·hᵀ + A·v then h ← decay·h + v̂ᵀk̂, the fp32 state
  [Dv tile, Dk] in registers (rounded to the inputs' dtype for the q̄·hᵀ matmul, as the stored per-chunk states of
  the unfused path are); the last segment's program stores the state leaving it. With a states output
  (config.fused_forward_states) it also stores the state entering each chunk, rounded as the unfused path's."""
  (q_ref, k_ref, v_ref), g_ref, resets_ref, rest = split_refs(refs, plan, 3)
  init_ref = [rest.pop(0)] if has_init else []
  scores_ref = rest.pop(0) if plan.mode == "vector" else None
  o_ref, last_ref, *states_ref = rest
  chunk, dtype = plan.chunk, q_ref.dtype

  def step(n, state):
    start = pl.multiple_of(n * chunk, chunk)
    rows = pl.ds(start, chunk)
    sub = ChunkFactors(plan, from_row(g_ref, start), from_row(resets_ref, start), chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    scores = None if scores_ref is None else scores_ref[rows, :]
    if states_ref:
      states_ref[0][n] = state.astype(states_ref[0].dtype)
    o_ref[rows, :] = _chunk_output(plan, sub, q, k, v, state, scores).astype(o_ref.dtype)
    k_hat = ChunkFactors.scale(k.astype(jnp.float32), sub.k_factor)
    return ChunkFactors.scale(state, sub.state_decay) + scaled_update(plan, v, k_hat, dtype)

  state = lax.fori_loop(0, num_chunks, step, starting_state(init_ref, last_ref.shape))

  @pl.when(pl.program_id(1) == segments - 1)
  def _():
    last_ref[...] = state


def value_tiled_call(
  kernel, name, layout, q, k, value_like, g, resets, states, scores, out_dtype, paired=None, out_slot=None
):
  """A chunk-parallel kernel over (value tile, chunk, batch·head) reading q, k, a [B,T,H,Dv] operand, the
  per-chunk states and (vector decay) the intra-chunk scores, writing a [B,T,H,Dv] result (out_slot given: that
  slot of a packed [B,T,3,H,Dv] one): the forward output (v → o) and the dv gradient (do → dv; given per-chunk
  states `paired`, also the decay gradient's state term of the state entering each chunk). One program per chunk:
  only matmuls and per-row factors."""
  layout = layout.whole_chunks()
  plan = layout.plan
  tile_v = min(plan.config.value_tile, layout.dim_v)
  tiles = layout.dim_v // tile_v
  in_specs = [
    layout.chunk_spec(layout.dim_k, slot=slot_of(q)),
    layout.chunk_spec(layout.dim_k, slot=slot_of(k)),
    layout.chunk_spec(tile_v, True, slot_of(value_like)),
  ]
  if g is not None:
    in_specs.append(layout.chunk_g_spec())
  if resets is not None:
    in_specs.append(layout.chunk_resets_spec())
  in_specs.append(layout.chunk_state_spec(tile_v, layout.dim_k, tile_rows=True))
  operands = [operand(q), operand(k), operand(value_like), *layout.extras(g, resets), states]
  if scores is not None:
    in_specs.append(layout.chunk_spec(plan.chunk))
    operands.append(scores)
  out_specs = [layout.result_spec(tile_v, True, out_slot)]
  slots = () if out_slot is None else (3,)
  out_shape = [jax.ShapeDtypeStruct((layout.batch, layout.time, *slots, layout.heads, layout.dim_v), out_dtype)]
  if paired is not None:
    in_specs.append(layout.chunk_state_spec(tile_v, layout.dim_k, tile_rows=True))
    operands.append(paired)
    out_specs.append(layout.chunk_row_spec(layout.dim_k))
    out_shape.append(
      jax.ShapeDtypeStruct((layout.batch, layout.num_chunks, layout.heads, tiles, layout.dim_k), jnp.float32)
    )
  return pl.pallas_call(
    kernel,
    grid=layout.chunk_grid(tiles),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=compiler_params(plan, plan.config.num_warps),
    interpret=interpret_mode(),
    name=name,
  )(*operands)


def _output(layout, q, k, v, g, resets, states, scores, out_dtype):
  (out,) = value_tiled_call(
    functools.partial(_output_kernel, plan=layout.plan),
    "linear_attention_output",
    layout,
    q,
    k,
    v,
    g,
    resets,
    states,
    scores,
    out_dtype,
  )
  return out


def _fused_forward(layout, q, k, v, g, resets, init, scores, out_dtype, states_dtype=None):
  """(o [B,T,H,Dv], last state [B,H,Dv,Dk] f32, and given states_dtype the state entering each chunk
  [B,N,H,Dv,Dk]) by the fused kernel; with few programs the segments' starting states come from the first two
  levels of the two-level scan."""
  plan, heads = layout.plan, layout.heads
  tile_v = min(plan.config.fused_value_tile, layout.dim_v)
  tiles = layout.dim_v // tile_v
  segments = segment_count(plan, layout.num_chunks, tiles * layout.batch * layout.heads, plan.config.segment_programs)
  starts = None if init is None else init[:, None]
  if segments > 1:
    starts, _ = segment_start_states(layout, k, v, g, resets, init, False, segments, state_tiles(layout, True))
  rows = layout.time // segments

  def time_spec(width, tiled=False, slot=None):
    return in_slot((None, rows, None, width), lambda t, s, bh: (bh // heads, s, bh % heads, t if tiled else 0), slot)

  state_spec = pl.BlockSpec(
    (None, None, None, tile_v, layout.dim_k), lambda t, s, bh: (bh // heads, s, bh % heads, t, 0)
  )
  in_specs = [
    time_spec(layout.dim_k, slot=slot_of(q)),
    time_spec(layout.dim_k, slot=slot_of(k)),
    time_spec(tile_v, True, slot_of(v)),
  ]
  if plan.mode == "scalar":
    in_specs.append(pl.BlockSpec((rows, None), lambda t, s, bh: (s, bh % heads)))
  elif plan.mode == "token":
    in_specs.append(pl.BlockSpec((None, rows, None), lambda t, s, bh: (bh // heads, s, bh % heads)))
  elif plan.mode == "vector":
    in_specs.append(time_spec(layout.dim_k))
  if resets is not None:
    in_specs.append(pl.BlockSpec((None, rows), lambda t, s, bh: (bh // heads, s)))
  in_specs += [state_spec] * (starts is not None)
  operands = [operand(q), operand(k), operand(v), *layout.extras(g, resets), *present(starts)]
  if scores is not None:
    in_specs.append(time_spec(plan.chunk))
    operands.append(scores)
  # Only the last segment's program stores the state leaving it: the final state [B,H,Dv,Dk].
  last_spec = pl.BlockSpec((None, None, tile_v, layout.dim_k), lambda t, s, bh: (bh // heads, bh % heads, t, 0))
  out_specs = [time_spec(tile_v, True), last_spec]
  out_shape = [
    jax.ShapeDtypeStruct((layout.batch, layout.time, heads, layout.dim_v), out_dtype),
    jax.ShapeDtypeStruct((layout.batch, heads, layout.dim_v, layout.dim_k), jnp.float32),
  ]
  if states_dtype is not None:
    chunks = layout.num_chunks // segments
    out_specs.append(
      pl.BlockSpec((None, chunks, None, tile_v, layout.dim_k), lambda t, s, bh: (bh // heads, s, bh % heads, t, 0))
    )
    out_shape.append(
      jax.ShapeDtypeStruct((layout.batch, layout.num_chunks, heads, layout.dim_v, layout.dim_k), states_dtype)
    )
  return pl.pallas_call(
    functools.partial(
      _fused_forward_kernel,
      plan=plan,
      num_chunks=layout.num_chunks // segments,
      has_init=starts is not None,
      segments=segments,
    ),
    grid=(tiles, segments, layout.batch * heads),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=compiler_params(plan, plan.config.num_warps),
    interpret=interpret_mode(),
    name=FUSED_FORWARD_STATES if states_dtype is not None else "linear_attention_fused_forward",
  )(*operands)


def forward(plan, q, k, v, log_decay, initial_state, segment_ids):
  """((o, final state), what the backward reuses: (chunk-local g, resets), the intra-chunk scores A (vector
  decay, else None) and the per-chunk states (None from a fused forward without config.fused_forward_states))."""
  time = q.shape[1]
  qp, kp, vp, g, resets, layout = prepare(plan, q, k, v, log_decay, segment_ids)
  init = value_major(initial_state)
  scores = intra_scores(layout, qp, kp, g, resets) if plan.mode == "vector" else None
  states = None
  if plan.config.fused_forward:
    stored = state_dtype(plan, q.dtype) if plan.config.fused_forward_states else None
    out, last, *states = _fused_forward(layout, qp, kp, vp, g, resets, init, scores, v.dtype, stored)
    states = states[0] if states else None
  else:
    states, last = state_scan(layout, kp, vp, g, resets, init, state_dtype(plan, q.dtype), reverse=False)
    out = _output(layout, qp, kp, vp, g, resets, states, scores, v.dtype)
  return (out[:, :time], jnp.swapaxes(last, -1, -2)), ((g, resets), scores, states)
