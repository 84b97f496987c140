"""Pallas Mosaic TPU kernels for decay-scan linear attention: the "pallas_tpu" backend (see README.md).

One `jax.custom_vjp` op over three `pallas_call`s, each on the grid (batch, heads, time blocks) with the time
axis "arbitrary" (sequential) and a float32 state in a VMEM scratch that persists across time blocks:
  forward        walks the blocks in order: outputs and the final state;
  backward dq    walks in order again, recomputing the state entering every chunk;
  backward dk,dv walks in reverse (index_map t -> n-1-t) carrying dS; its last step writes d initial_state.
A grid step covers a block of 128·m tokens, cut into chunks of the two-level algorithm, each with its own
local cumulative log-decay b (every exponent <= 0, masked before exp):
  * no decay / per-head decay / per-head-and-token decay: chunks of 128 tokens; scores are (Q Kᵀ) ⊙ D on the
    MXU, with D the causal, same-document mask times e^{b_i − b_j} (b a column and a row, so no in-kernel
    transpose or cumsum; shared by the heads for a per-head decay, per batch row and head for a per-token one);
  * per-key-channel decay (HGRN2): chunks of 16 tokens whose 16×16 scores are exact elementwise float32
    products Σ_d q_id k_jd e^{b_id − b_jd}; the state crosses chunks through [16, D] × [D, D] matmuls.
The state is kept transposed, [Dv, Dk], so a per-key decay scales lanes. Segment resets: a token reads the
carried state only if no reset happened since its chunk began, and only keys of a chunk's last document feed
the outgoing state; these per-token flags and the document index are precomputed in XLA. The decay gradient
comes from the identity (it holds with resets too: the masks do not depend on α)
  d log α_r = Σ_{t >= r} (q_t ⊙ dq_t − k_t ⊙ dk_t) + Σ_v (S_T ⊙ dS_T),
reverse-cumsummed in float32 outside the kernels (summed over channels for the per-token decay, over channels
and time for the per-head decay).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_attention import common

VECTOR_CHUNK = 16
SCALAR_CHUNK = 128  # the MXU width: (Q Kᵀ) ⊙ D is one 128×128 tile
DEFAULT_BLOCK = 128
_NN = ((1,), (0,))  # [m,k] x [k,n]
_NT = ((1,), (1,))  # [m,k] x [n,k]
_TN = ((0,), (0,))  # [k,m] x [k,n]


def _dot(a, b, contracting):
  # HIGHEST: float32 operands would otherwise be rounded to bfloat16 on the MXU.
  return lax.dot_general(
    a, b, (contracting, ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  )


def resolve_block(chunk_size, time):
  """Tokens per grid step: a multiple of 128 (lane tiling of the per-token rows), shrunk for short T."""
  if chunk_size is None:
    chunk_size = DEFAULT_BLOCK
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 128:
    raise ValueError(
      f"chunk_size for the pallas_tpu backend must be a positive multiple of 128 (tokens per grid "
      f"step) or None (default {DEFAULT_BLOCK}); got {chunk_size!r}."
    )
  return min(chunk_size, common.round_up(time, 128))


def _causal_same_document(doc_col, doc_row, size):
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  return (rows >= cols) & (doc_col == doc_row)


class _Chunk:
  """Shared by both chunk kinds: q, k, v, flags and the factored decays of one chunk, in float32.

  Subclasses set `mask`, `query_decay` (e^{b}), `key_decay` (e^{Γ−b}), `state_decay` (e^{Γ}) and the intra
  terms. `rows` is the chunk's slice of the block."""

  def __init__(self, rows, q_ref, k_ref, v_ref, sees_ref, last_ref):
    self.rows = rows
    self.q = q_ref[rows, :].astype(jnp.float32)
    self.k = k_ref[rows, :].astype(jnp.float32)
    self.v = v_ref[rows, :].astype(jnp.float32)
    self.sees_state = sees_ref[rows, :]  # [C,1] 1.0 where no reset since the chunk began
    self.in_last_doc = last_ref[rows, :]  # [C,1] 1.0 where the key feeds the outgoing state
    self.keeps_state = self.sees_state[-1:, :]  # [1,1]

  def finish(self):
    self.q_inter = self.q * self.query_decay * self.sees_state
    self.k_inter = self.k * self.key_decay * self.in_last_doc

  def next_state(self, state_t):
    """State [Dv,Dk] entering -> leaving this chunk."""
    return self.decay_state(state_t) + _dot(self.v, self.k_inter, _TN)

  def decay_state(self, state_t):
    return jnp.where(self.keeps_state > 0, state_t * self.state_decay, 0.0)


class _ScalarChunk(_Chunk):
  """128 tokens with no decay (b refs None) or a per-head or per-token decay, whose b comes as a column and a row."""

  def __init__(
    self, index, q_ref, k_ref, v_ref, sees_ref, last_ref, doc_col_ref, doc_row_ref, b_col_ref=None, b_row_ref=None
  ):
    rows = slice(index * SCALAR_CHUNK, (index + 1) * SCALAR_CHUNK)
    super().__init__(rows, q_ref, k_ref, v_ref, sees_ref, last_ref)
    self.mask = _causal_same_document(doc_col_ref[rows, :], doc_row_ref[:, rows], SCALAR_CHUNK)
    if b_col_ref is None:
      self.decay_matrix = self.mask.astype(jnp.float32)
      self.query_decay = self.key_decay = self.state_decay = 1.0
    else:
      b_col, b_row = b_col_ref[rows, :], b_row_ref[:, rows]
      exponent = jnp.where(self.mask, b_col - b_row, 0.0)
      self.decay_matrix = jnp.where(self.mask, jnp.exp(exponent), 0.0)
      total = b_col[-1:, :]
      self.query_decay = jnp.exp(b_col)
      self.key_decay = jnp.exp(total - b_col)
      self.state_decay = jnp.exp(total)
    self.finish()

  def scores(self):
    return _dot(self.q, self.k, _NT) * self.decay_matrix

  def dq_intra(self, dscores):
    return _dot(dscores * self.decay_matrix, self.k, _NN)

  def dk_intra(self, dscores):
    return _dot(dscores * self.decay_matrix, self.q, _TN)


class _VectorChunk(_Chunk):
  """16 tokens with a per-key-channel decay: exact elementwise float32 scores."""

  def __init__(self, index, q_ref, k_ref, v_ref, sees_ref, last_ref, doc_col_ref, doc_rows_ref, b_ref):
    rows = slice(index * VECTOR_CHUNK, (index + 1) * VECTOR_CHUNK)
    super().__init__(rows, q_ref, k_ref, v_ref, sees_ref, last_ref)
    self.mask = _causal_same_document(doc_col_ref[rows, :], doc_rows_ref[index : index + 1, :], VECTOR_CHUNK)
    b = b_ref[rows, :]
    # The mask enters as float32 multiples: Mosaic cannot reshape a boolean [16,16] vector to [16,16,1].
    # Zeroing the exponent first keeps exp finite where b_i − b_j > 0 (masked pairs).
    mask = self.mask.astype(jnp.float32)[:, :, None]
    self.pair_decay = jnp.exp((b[:, None, :] - b[None, :, :]) * mask) * mask  # [16,16,Dk] e^{b_i−b_j}
    total = b[-1:, :]
    self.query_decay = jnp.exp(b)
    self.key_decay = jnp.exp(total - b)
    self.state_decay = jnp.exp(total)
    self.finish()

  def scores(self):
    return jnp.sum(self.q[:, None, :] * self.k[None, :, :] * self.pair_decay, axis=-1)

  def dq_intra(self, dscores):
    return jnp.sum(dscores[:, :, None] * self.k[None, :, :] * self.pair_decay, axis=1)

  def dk_intra(self, dscores):
    return jnp.sum(dscores[:, :, None] * self.q[:, None, :] * self.pair_decay, axis=0)


def _make_chunks(decay_mode, q_ref, k_ref, v_ref, mode_refs):
  if decay_mode == "vector":
    sees_ref, last_ref, doc_col_ref, doc_rows_ref, b_ref = mode_refs
    return [
      _VectorChunk(index, q_ref, k_ref, v_ref, sees_ref, last_ref, doc_col_ref, doc_rows_ref, b_ref)
      for index in range(q_ref.shape[0] // VECTOR_CHUNK)
    ]
  return [_ScalarChunk(index, q_ref, k_ref, v_ref, *mode_refs) for index in range(q_ref.shape[0] // SCALAR_CHUNK)]


def _forward_kernel(*refs, decay_mode, num_mode_refs):
  q_ref, k_ref, v_ref = refs[:3]
  mode_refs = refs[3 : 3 + num_mode_refs]
  state0_ref, out_ref, final_ref, state_scratch = refs[3 + num_mode_refs :]

  @pl.when(pl.program_id(2) == 0)
  def _():
    state_scratch[...] = state0_ref[...]

  state_t = state_scratch[...]
  for chunk in _make_chunks(decay_mode, q_ref, k_ref, v_ref, mode_refs):
    out = _dot(chunk.scores(), chunk.v, _NN) + _dot(chunk.q_inter, state_t, _NT)
    out_ref[chunk.rows, :] = out.astype(out_ref.dtype)
    state_t = chunk.next_state(state_t)
  state_scratch[...] = state_t

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = state_t


def _backward_dq_kernel(*refs, decay_mode, num_mode_refs):
  q_ref, k_ref, v_ref = refs[:3]
  mode_refs = refs[3 : 3 + num_mode_refs]
  state0_ref, dout_ref, dq_ref, state_scratch = refs[3 + num_mode_refs :]

  @pl.when(pl.program_id(2) == 0)
  def _():
    state_scratch[...] = state0_ref[...]

  state_t = state_scratch[...]
  for chunk in _make_chunks(decay_mode, q_ref, k_ref, v_ref, mode_refs):
    dout = dout_ref[chunk.rows, :].astype(jnp.float32)
    dscores = jnp.where(chunk.mask, _dot(dout, chunk.v, _NT), 0.0)
    dq_inter = _dot(dout, state_t, _NN) * chunk.query_decay * chunk.sees_state
    dq_ref[chunk.rows, :] = (chunk.dq_intra(dscores) + dq_inter).astype(dq_ref.dtype)
    state_t = chunk.next_state(state_t)
  state_scratch[...] = state_t


def _backward_dkv_kernel(*refs, decay_mode, num_mode_refs):
  q_ref, k_ref, v_ref = refs[:3]
  mode_refs = refs[3 : 3 + num_mode_refs]
  dfinal_ref, dout_ref, dk_ref, dv_ref, dstate0_ref, dstate_scratch = refs[3 + num_mode_refs :]

  @pl.when(pl.program_id(2) == 0)
  def _():
    dstate_scratch[...] = dfinal_ref[...]

  dstate_t = dstate_scratch[...]  # gradient of the state leaving the current chunk, [Dv,Dk]
  for chunk in reversed(_make_chunks(decay_mode, q_ref, k_ref, v_ref, mode_refs)):
    dout = dout_ref[chunk.rows, :].astype(jnp.float32)
    dscores = jnp.where(chunk.mask, _dot(dout, chunk.v, _NT), 0.0)
    dv = _dot(chunk.scores(), dout, _TN) + _dot(chunk.k_inter, dstate_t, _NT)
    dk_inter = _dot(chunk.v, dstate_t, _NN) * chunk.key_decay * chunk.in_last_doc
    dk_ref[chunk.rows, :] = (chunk.dk_intra(dscores) + dk_inter).astype(dk_ref.dtype)
    dv_ref[chunk.rows, :] = dv.astype(dv_ref.dtype)
    dstate_t = chunk.decay_state(dstate_t) + _dot(dout, chunk.q_inter, _TN)
  dstate_scratch[...] = dstate_t

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    dstate0_ref[...] = dstate_t


def _mode_specs(decay_mode, block, dim_k, time_index):
  """BlockSpecs of the per-mode inputs built by `_segment_inputs` and `_decay_inputs`, in that order."""
  per_token_col = pl.BlockSpec((None, block, 1), lambda b, h, t: (b, time_index(t), 0))
  specs = [per_token_col, per_token_col, per_token_col]  # sees_state, in_last_doc, doc_col
  if decay_mode == "vector":
    specs.append(pl.BlockSpec((None, block // VECTOR_CHUNK, VECTOR_CHUNK), lambda b, h, t: (b, time_index(t), 0)))
    specs.append(pl.BlockSpec((None, None, block, dim_k), lambda b, h, t: (b, h, time_index(t), 0)))
  else:
    specs.append(pl.BlockSpec((None, 1, block), lambda b, h, t: (b, 0, time_index(t))))  # doc_row
    if decay_mode == "scalar":
      specs.append(pl.BlockSpec((None, block, 1), lambda b, h, t: (h, time_index(t), 0)))  # b_col
      specs.append(pl.BlockSpec((None, 1, block), lambda b, h, t: (h, 0, time_index(t))))  # b_row
    elif decay_mode == "token":
      specs.append(pl.BlockSpec((None, None, block, 1), lambda b, h, t: (b, h, time_index(t), 0)))  # b_col
      specs.append(pl.BlockSpec((None, None, 1, block), lambda b, h, t: (b, h, 0, time_index(t))))  # b_row
  return specs


def _segment_inputs(segment_ids, batch, time, padded_time, chunk, decay_mode):
  """Per-token float32 columns [B,Tp,1] (reads the carried state, feeds the outgoing state, document index)
  and the document index as rows, [B,Tp/16,16] (vector) or [B,1,Tp], for the same-document mask."""
  starts = common.segment_starts(segment_ids, batch, time).astype(jnp.int32)
  docs = jnp.pad(jnp.cumsum(starts, axis=1), ((0, 0), (0, padded_time - time)), mode="edge")
  chunked = docs.reshape(batch, padded_time // chunk, chunk)
  before = jnp.concatenate([jnp.zeros((batch, 1), docs.dtype), chunked[:, :-1, -1]], axis=1)[:, :, None]
  sees_state = (chunked == before).reshape(batch, padded_time, 1)
  in_last_doc = (chunked == chunked[:, :, -1:]).reshape(batch, padded_time, 1)
  docs = docs.astype(jnp.float32)
  doc_rows = (
    docs.reshape(batch, padded_time // VECTOR_CHUNK, VECTOR_CHUNK) if decay_mode == "vector" else docs[:, None, :]
  )
  return (sees_state.astype(jnp.float32), in_last_doc.astype(jnp.float32), docs[:, :, None], doc_rows)


def _decay_inputs(log_decay, decay_mode, time, padded_time):
  """Chunk-local cumulative log-decays: [B,H,Tp,Dk] per 16 tokens (vector), or per 128 tokens a column and a
  row, [B,H,Tp,1] and [B,H,1,Tp] (token) or [H,Tp,1] and [H,1,Tp] (scalar). Padded steps decay by 1 so they
  leave the final state untouched (token and vector log-decays arrive zero-padded)."""
  if decay_mode == "none":
    return ()
  if decay_mode == "vector":
    batch, heads, _, dim_k = log_decay.shape
    chunks = log_decay.reshape(batch, heads, padded_time // VECTOR_CHUNK, VECTOR_CHUNK, dim_k)
    return (jnp.cumsum(chunks, axis=3).reshape(batch, heads, padded_time, dim_k),)
  if decay_mode == "token":
    batch, heads, _ = log_decay.shape
    chunks = log_decay.reshape(batch, heads, padded_time // SCALAR_CHUNK, SCALAR_CHUNK)
    cumulative = jnp.cumsum(chunks, axis=3).reshape(batch, heads, padded_time)
    return cumulative[:, :, :, None], cumulative[:, :, None, :]
  valid = (jnp.arange(padded_time) < time).astype(jnp.float32)
  steps = log_decay.astype(jnp.float32)[:, None] * valid[None, :]
  chunks = steps.reshape(-1, padded_time // SCALAR_CHUNK, SCALAR_CHUNK)
  cumulative = jnp.cumsum(chunks, axis=2).reshape(-1, padded_time)
  return cumulative[:, :, None], cumulative[:, None, :]


def _call(kernel_fn, decay_mode, block, num_mode_refs, in_specs, out_specs, out_shape, scratch_shape, *args):
  batch, heads, padded_time, _ = args[0].shape
  kernel = functools.partial(kernel_fn, decay_mode=decay_mode, num_mode_refs=num_mode_refs)
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, padded_time // block),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=[pltpu.VMEM(scratch_shape, jnp.float32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
  )(*args)


def _specs(decay_mode, block, num_blocks, dim_k, dim_v, reverse):
  """(inputs q, k, v, mode inputs, a state-like [B,H,Dv,Dk]; a per-head spec maker; the state spec)."""
  time_index = (lambda t: num_blocks - 1 - t) if reverse else (lambda t: t)
  per_head = lambda dim: pl.BlockSpec((None, None, block, dim), lambda b, h, t: (b, h, time_index(t), 0))
  state = pl.BlockSpec((None, None, dim_v, dim_k), lambda b, h, t: (b, h, 0, 0))
  mode = _mode_specs(decay_mode, block, dim_k, time_index)
  return [per_head(dim_k), per_head(dim_k), per_head(dim_v), *mode, state], per_head, state, len(mode)


def _forward(q, k, v, log_decay, state0_t, segment_inputs, block, decay_mode, time):
  batch, heads, padded_time, dim_k = q.shape
  dim_v = v.shape[-1]
  mode_inputs = (*segment_inputs, *_decay_inputs(log_decay, decay_mode, time, padded_time))
  in_specs, per_head, state, num_mode_refs = _specs(decay_mode, block, padded_time // block, dim_k, dim_v, False)
  return _call(
    _forward_kernel,
    decay_mode,
    block,
    num_mode_refs,
    in_specs,
    [per_head(dim_v), state],
    [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((batch, heads, dim_v, dim_k), jnp.float32)],
    (dim_v, dim_k),
    q,
    k,
    v,
    *mode_inputs,
    state0_t,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _linear_attention_blocks(q, k, v, log_decay, state0_t, segment_inputs, block, decay_mode, time):
  """q, k [B,H,Tp,Dk], v [B,H,Tp,Dv] (Tp a multiple of block), log_decay None / [H] / [B,H,Tp] / [B,H,Tp,Dk],
  state0_t [B,H,Dv,Dk] -> (o [B,H,Tp,Dv], final state [B,H,Dv,Dk]); `time` = the unpadded length."""
  return _forward(q, k, v, log_decay, state0_t, segment_inputs, block, decay_mode, time)


def _forward_rule(q, k, v, log_decay, state0_t, segment_inputs, block, decay_mode, time):
  out, final_t = _forward(q, k, v, log_decay, state0_t, segment_inputs, block, decay_mode, time)
  return (out, final_t), (q, k, v, log_decay, state0_t, segment_inputs, final_t)


def _backward_rule(block, decay_mode, time, residuals, cotangents):
  q, k, v, log_decay, state0_t, segment_inputs, final_t = residuals
  dout, dfinal_t = cotangents
  padded_time, dim_k, dim_v = q.shape[2], q.shape[3], v.shape[3]
  num_blocks = padded_time // block
  mode_inputs = (*segment_inputs, *_decay_inputs(log_decay, decay_mode, time, padded_time))
  dfinal_t = dfinal_t.astype(jnp.float32)

  in_specs, per_head, _, num_mode_refs = _specs(decay_mode, block, num_blocks, dim_k, dim_v, False)
  dq = _call(
    _backward_dq_kernel,
    decay_mode,
    block,
    num_mode_refs,
    in_specs + [per_head(dim_v)],
    per_head(dim_k),
    jax.ShapeDtypeStruct(q.shape, jnp.float32),
    (dim_v, dim_k),
    q,
    k,
    v,
    *mode_inputs,
    state0_t,
    dout,
  )
  in_specs, per_head, state, _ = _specs(decay_mode, block, num_blocks, dim_k, dim_v, True)
  dk, dv, dstate0_t = _call(
    _backward_dkv_kernel,
    decay_mode,
    block,
    num_mode_refs,
    in_specs + [per_head(dim_v)],
    [per_head(dim_k), per_head(dim_v), state],
    [
      jax.ShapeDtypeStruct(k.shape, jnp.float32),
      jax.ShapeDtypeStruct(v.shape, jnp.float32),
      jax.ShapeDtypeStruct(state0_t.shape, jnp.float32),
    ],
    (dim_v, dim_k),
    q,
    k,
    v,
    *mode_inputs,
    dfinal_t,
    dout,
  )

  dlog_decay = None
  if decay_mode != "none":
    # d log α_r = Σ_{t >= r} (q⊙dq − k⊙dk)_t + Σ_v (S_T ⊙ dS_T): the final state carries e^{B_T}.
    per_token = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk  # [B,H,Tp,Dk]
    final_term = jnp.sum(final_t * dfinal_t, axis=2)  # [B,H,Dk]
    if decay_mode in ("scalar", "token"):
      per_token, final_term = jnp.sum(per_token, axis=-1), jnp.sum(final_term, axis=-1)
    per_step = jnp.flip(jnp.cumsum(jnp.flip(per_token, axis=2), axis=2), axis=2)
    per_step = per_step + final_term[:, :, None]
    if decay_mode == "scalar":  # only the `time` real steps carry the per-head decay
      per_step = jnp.sum(per_step[:, :, :time], axis=(0, 2))
    dlog_decay = per_step.astype(log_decay.dtype)
  segment_cotangents = jax.tree.map(jnp.zeros_like, segment_inputs)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dlog_decay, dstate0_t, segment_cotangents)


_linear_attention_blocks.defvjp(_forward_rule, _backward_rule)


def linear_attention_tpu(q, k, v, log_decay, initial_state, segment_ids, chunk_size):
  """Backend "pallas_tpu". Shapes as in api.py. Returns (o [B,T,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] f32)."""
  batch, time, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  decay_mode = "none" if log_decay is None else {1: "scalar", 3: "token", 4: "vector"}.get(log_decay.ndim)
  if decay_mode is None:
    raise ValueError(
      f"log_decay has shape {tuple(log_decay.shape)}; valid: None, [heads], [batch, time, heads] or "
      "[batch, time, heads, dim_k]."
    )
  block = resolve_block(chunk_size, time)
  padded_time = common.round_up(time, block)
  # Head-major [B,H,Tp,D] so that a block is a (tokens, D) tile; padding is zeros (and decay 1).
  head_major = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, padded_time - time), (0, 0)))
  if decay_mode == "vector":
    log_decay = head_major(log_decay.astype(jnp.float32))
  elif decay_mode == "token":
    log_decay = head_major(log_decay.astype(jnp.float32)[..., None])[..., 0]
  elif decay_mode == "scalar":
    log_decay = log_decay.astype(jnp.float32)
  chunk = VECTOR_CHUNK if decay_mode == "vector" else SCALAR_CHUNK
  segment_inputs = _segment_inputs(segment_ids, batch, time, padded_time, chunk, decay_mode)
  state0 = (
    jnp.zeros((batch, heads, dim_k, dim_v), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  )
  out, final_t = _linear_attention_blocks(
    head_major(q),
    head_major(k),
    head_major(v),
    log_decay,
    jnp.swapaxes(state0, 2, 3),
    segment_inputs,
    block,
    decay_mode,
    time,
  )
  return jnp.swapaxes(out[:, :, :time], 1, 2), jnp.swapaxes(final_t, 2, 3)
