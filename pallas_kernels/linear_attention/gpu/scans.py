"""State scans: the sequential walk over chunks that writes the state entering each chunk (forward) or the state
gradient leaving it (reverse), and the two-level form for latency-bound shapes: each time segment's state from
zero in parallel, a small kernel combining the segments in order, then every segment from its true start."""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention.gpu.blocks import (
  ChunkFactors,
  compiler_params,
  from_row,
  interpret_mode,
  matmul_tn,
  split_refs,
  starting_state,
)
from pallas_kernels.linear_attention.gpu.planning import operand, present, segment_count, slot_of, state_tiles

# Unrolled 128-wide state tiles exceed the H100/H200's 227 KB of shared memory per block.
_MAX_UNROLLED_TILE = 64 * 64


def _state_scan_kernel(*refs, plan, num_chunks, reverse, per_chunk, unroll, has_init):
  """Forward (a=k, b=v): S ← decay·S + (k ⊙ k_factor)ᵀv, storing S entering each chunk.
  Reverse (a=q, b=do): dS ← decay·dS + (q ⊙ q_factor)ᵀdo, storing dS leaving each chunk; S is [Dv, Dk].
  One segment of `num_chunks` chunks from the state in init_ref (zero without one); per_chunk False stores only
  the last state."""
  (a_ref, b_ref), g_ref, resets_ref, (*init_ref, last_ref) = split_refs(refs, plan, 2)
  init_ref, states_ref = (init_ref[:1], init_ref[1:]) if has_init else ([], init_ref)
  chunk, operand_dtype = plan.chunk, a_ref.dtype

  def chunk_update(n):
    """(decay, b̂ᵀâ) of chunk n: independent of the carried state, so loads and matmul can run ahead of it."""
    start = pl.multiple_of(n * chunk, chunk)
    sub = ChunkFactors(plan, from_row(g_ref, start), from_row(resets_ref, start), chunk)
    factor = sub.q_factor if reverse else sub.k_factor
    a = ChunkFactors.scale(a_ref[pl.ds(start, chunk), :].astype(jnp.float32), factor)
    b = b_ref[pl.ds(start, chunk), :].astype(operand_dtype)
    return sub.state_decay, scaled_update(plan, b, a, operand_dtype)

  def steps(unroll):
    """A loop body over `unroll` consecutive chunks: all their loads and matmuls first, then the short chain of
    state updates (the scan is latency-bound: one chunk per iteration leaves the loads' latency exposed)."""

    def body(step, state):
      chunks = [num_chunks - 1 - (step * unroll + u) if reverse else step * unroll + u for u in range(unroll)]
      updates = [chunk_update(n) for n in chunks]
      for n, (decay, update) in zip(chunks, updates):
        if per_chunk:
          states_ref[0][n] = state.astype(states_ref[0].dtype)
        state = ChunkFactors.scale(state, decay) + update
      return state

    return body

  # 32-bit operands stay rolled: twice the shared memory, and slower.
  unroll = min(unroll if operand_dtype.itemsize < 4 else 1, num_chunks)
  whole = num_chunks // unroll
  state = lax.fori_loop(0, whole, steps(unroll), starting_state(init_ref, last_ref.shape))
  if num_chunks % unroll:  # the remainder, one chunk at a time
    state = lax.fori_loop(whole * unroll, num_chunks, steps(1), state)
  last_ref[...] = state


def scaled_update(plan, b, a_scaled, operand_dtype):
  """bᵀ·â of a chunk, â [C, Dk] fp32 (rows times their decay factors): â rounded to `operand_dtype` for one
  pass, or (config.split_scan_updates, 16-bit operands) that rounding plus its residual in a second pass."""
  high = a_scaled.astype(operand_dtype)
  update = matmul_tn(b, high)
  if plan.config.split_scan_updates and operand_dtype.itemsize < 4:
    update = update + matmul_tn(b, (a_scaled - high.astype(jnp.float32)).astype(operand_dtype))
  return update


def _state_scan_call(layout, a, b, g, resets, init, state_dtype, reverse, segments, tiles, per_chunk):
  """The state scan over each of `segments` segments from init [B,S,H,Dv,Dk] f32 (the state entering each segment
  in the scan's direction; None: zero) with (Dk, Dv) state `tiles`; returns ([per-chunk states [B,N,H,Dv,Dk]
  state_dtype] if per_chunk, the state leaving each segment [B,S,H,Dv,Dk] f32)."""
  plan = layout.plan
  tile_k, tile_v = tiles
  grid = layout.scan_grid(tile_k, tile_v, segments)
  in_specs = [layout.scan_spec(tile_k, 0, segments, slot_of(a)), layout.scan_spec(tile_v, 1, segments, slot_of(b))]
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
    out_shape.insert(
      0, jax.ShapeDtypeStruct((layout.batch, layout.num_chunks, layout.heads, layout.dim_v, layout.dim_k), state_dtype)
    )
  programs = math.prod(grid)
  latency_bound = programs < plan.config.latency_bound_programs and tile_k * tile_v <= _MAX_UNROLLED_TILE
  unroll = plan.config.scan_unroll if latency_bound else 1
  # Deeper pipelining pays where many programs walk 64-wide tiles one chunk at a time; unrolled chunks would
  # exceed the shared memory, and the segments' wide tiles ran slower with it.
  stages = plan.config.scan_stages if segments == 1 and unroll == 1 else None
  kernel = functools.partial(
    _state_scan_kernel,
    plan=plan,
    num_chunks=layout.num_chunks // segments,
    reverse=reverse,
    per_chunk=per_chunk,
    unroll=unroll,
    has_init=init is not None,
  )
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=compiler_params(plan, plan.config.scan_warps, stages),
    interpret=interpret_mode(),
    name="linear_attention_state_scan" + ("_reverse" if reverse else "") + ("" if per_chunk else "_segments"),
  )(operand(a), operand(b), *layout.extras(g, resets), *present(init))


def _scan_plan(layout):
  """(segments, Dk tile, Dv tile) of the state scans: segments only below config.segment_scans_below programs."""

  def programs(tile_k, tile_v):
    return layout.batch * layout.heads * (layout.dim_k // tile_k) * (layout.dim_v // tile_v)

  tiles = state_tiles(layout, segmented=False)
  if programs(*tiles) >= layout.plan.config.segment_scans_below:
    return 1, *tiles
  wide = state_tiles(layout, segmented=True)
  segments = segment_count(layout.plan, layout.num_chunks, programs(*wide), layout.plan.config.segment_programs)
  return (1, *tiles) if segments == 1 else (segments, *wide)


def _segment_decays(layout, g, resets, segments):
  """The factor each segment applies to the state crossing it, broadcastable to [B,S,H,Dk]: the product of its
  chunks' state decays, exp(Σ of the chunks' last g) and zero where a document starts inside."""
  plan, chunk = layout.plan, layout.plan.chunk
  per_segment = layout.num_chunks // segments
  decay = jnp.ones((1, segments, 1, 1), jnp.float32)
  if plan.mode == "scalar":  # g [T, H]
    ends = g[chunk - 1 :: chunk].reshape(segments, per_segment, layout.heads)
    decay = jnp.exp(ends.sum(axis=1))[None, :, :, None]
  elif plan.mode == "token":  # g [B, T, H]
    ends = g[:, chunk - 1 :: chunk].reshape(layout.batch, segments, per_segment, layout.heads)
    decay = jnp.exp(ends.sum(axis=2))[..., None]
  elif plan.mode == "vector":  # g [B, T, H, Dk]
    ends = g[:, chunk - 1 :: chunk].reshape(layout.batch, segments, per_segment, layout.heads, layout.dim_k)
    decay = jnp.exp(ends.sum(axis=2))
  if resets is not None:
    carried = (resets[:, chunk - 1 :: chunk] == 0).reshape(layout.batch, segments, per_segment).all(axis=-1)
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

  last_ref[...] = lax.fori_loop(0, segments, step, starting_state(init_ref, last_ref.shape))


def segment_start_states(layout, a, b, g, resets, init, reverse, segments, tiles):
  """Two-level scan, levels 1 and 2: every segment's local final state from zero (in parallel, state `tiles`),
  then the sequential combine over the few segments (a small kernel: faster than the chain as one XLA fusion).
  Returns (the state entering each segment [B,S,H,Dv,Dk], the last state [B,H,Dv,Dk]), both f32; init [B,H,Dv,Dk]
  (None: zero) enters the first segment (the last one when reverse)."""
  batch, heads, dim_k, dim_v = layout.batch, layout.heads, layout.dim_k, layout.dim_v
  (local,) = _state_scan_call(layout, a, b, g, resets, None, None, reverse, segments, tiles, per_chunk=False)
  decay = jnp.broadcast_to(_segment_decays(layout, g, resets, segments), (batch, segments, heads, dim_k))
  tile = layout.plan.config.combine_tile
  tile_k, tile_v = min(tile, dim_k), min(tile, dim_v)
  segment_tiles = pl.BlockSpec(
    (None, segments, None, tile_v, tile_k), lambda bh, ik, iv: (bh // heads, 0, bh % heads, iv, ik)
  )
  state_tile = pl.BlockSpec((None, None, tile_v, tile_k), lambda bh, ik, iv: (bh // heads, bh % heads, iv, ik))
  starts, last = pl.pallas_call(
    functools.partial(_combine_kernel, segments=segments, reverse=reverse),
    grid=(batch * heads, dim_k // tile_k, dim_v // tile_v),
    in_specs=[
      segment_tiles,
      pl.BlockSpec((None, segments, None, tile_k), lambda bh, ik, iv: (bh // heads, 0, bh % heads, ik)),
      *[state_tile] * (init is not None),
    ],
    out_specs=[segment_tiles, state_tile],
    out_shape=[
      jax.ShapeDtypeStruct(local.shape, jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, dim_v, dim_k), jnp.float32),
    ],
    compiler_params=compiler_params(layout.plan, layout.plan.config.scan_warps),
    interpret=interpret_mode(),
    name="linear_attention_segment_combine",
  )(local, decay, *present(init))
  return starts, last


def state_scan(layout, a, b, g, resets, init, state_dtype, reverse):
  """Runs the state scan; returns (per-chunk states [B,N,H,Dv,Dk] state_dtype, last state [B,H,Dv,Dk] f32).
  Latency-bound shapes (few programs, many chunks) run it as a two-level scan over segments."""
  segments, *tiles = _scan_plan(layout)
  if segments == 1:
    states, last = _state_scan_call(
      layout, a, b, g, resets, None if init is None else init[:, None], state_dtype, reverse, 1, tiles, True
    )
    return states, last[:, 0]
  starts, last = segment_start_states(layout, a, b, g, resets, init, reverse, segments, tiles)
  states, _ = _state_scan_call(layout, a, b, g, resets, starts, state_dtype, reverse, segments, tiles, True)
  return states, last
