"""Two-level chunked linear attention in plain JAX: the portable "xla" backend (see README.md).

The sequence is cut into chunks of C tokens. Inside a chunk the output is masked attention; across chunks
a [Dk, Dv] state is carried by `lax.scan`. Every decay is a chunk-local cumulative log-decay b (b_0 is the
first token's log-decay, b_{C-1} = Γ the chunk total), factored so that every exponent is <= 0:
    o_i = [no reset since chunk start] (q_i ⊙ e^{b_i}) S  +  Σ_{j<=i, same doc} (q_i ⊙ k_j ⊙ e^{b_i-b_j}) v_j
    S'  = [no reset in chunk] Diag(e^{Γ}) S  +  Σ_{j in last doc} (k_j ⊙ e^{Γ-b_j})ᵀ v_j
For the per-key-channel decay the intra-chunk scores cannot come from one matmul; they are built from
sub-chunks of 16: off-diagonal sub-blocks rescale against the first row of the query sub-chunk (both
factors <= 1), diagonal sub-blocks are exact elementwise products. All arithmetic is float32 (float64 for
float64 inputs); the chunk body is rematerialised so training keeps O(T·D + (T/C)·Dk·Dv) memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.linear_attention import common, reference

DEFAULT_CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16

_einsum = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def resolve_chunk_size(chunk_size, time, per_channel_decay):
  """Validates `chunk_size` and shrinks it for short sequences (no point padding T=20 to 64)."""
  if chunk_size is None:
    chunk_size = DEFAULT_CHUNK_SIZE
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int or None (default {DEFAULT_CHUNK_SIZE}); got {chunk_size!r}.")
  if per_channel_decay and chunk_size > SUB_CHUNK_SIZE and chunk_size % SUB_CHUNK_SIZE:
    raise ValueError(
      f"chunk_size {chunk_size} with a per-key-channel log_decay must be <= {SUB_CHUNK_SIZE} or a "
      f"multiple of {SUB_CHUNK_SIZE} (the sub-chunk size)."
    )
  granule = SUB_CHUNK_SIZE if per_channel_decay and chunk_size > SUB_CHUNK_SIZE else 1
  return min(chunk_size, common.round_up(time, granule))


def _document_index(segment_ids, batch, time):
  """[B,T] int32 counting resets so far: equal values <=> same contiguous document (ids may repeat)."""
  return jnp.cumsum(common.segment_starts(segment_ids, batch, time).astype(jnp.int32), axis=1)


def _vector_decay_scores(q, k, b):
  """Intra-chunk scores Σ_d q_id k_jd e^{b_id - b_jd} for i >= j. q, k, b [B,H,C,Dk] -> [B,H,C,C]."""
  batch, heads, chunk, dim_k = q.shape
  sub = min(SUB_CHUNK_SIZE, chunk)
  num_sub = chunk // sub
  split = lambda x: x.reshape(batch, heads, num_sub, sub, dim_k)
  q_sub, k_sub, b_sub = split(q), split(k), split(b)

  # Off-diagonal sub-blocks (query sub-chunk I > key sub-chunk J), against r = first row of I: b_i - b_r <= 0
  # and b_r - b_j <= 0. Masking the exponent before exp keeps J >= I pairs finite (and their gradients).
  b_row = b_sub[:, :, :, :1, :]
  q_rel = q_sub * jnp.exp(b_sub - b_row)
  earlier = jnp.arange(num_sub)[None, :] < jnp.arange(num_sub)[:, None]  # [I, J]: J < I
  key_exponent = jnp.where(earlier[:, :, None, None], b_row[:, :, :, None] - b_sub[:, :, None], 0.0)
  k_rel = k_sub[:, :, None] * jnp.exp(key_exponent)  # [B,H,I,J,c,Dk]
  off_diagonal = _einsum("bhIid,bhIJjd->bhIiJj", q_rel, k_rel) * earlier[:, None, :, None]

  # Diagonal sub-blocks exactly, elementwise in float32.
  lower = jnp.tril(jnp.ones((sub, sub), bool))
  diag_exponent = jnp.where(lower[:, :, None], b_sub[:, :, :, :, None, :] - b_sub[:, :, :, None, :, :], 0.0)
  diagonal = jnp.sum(q_sub[:, :, :, :, None, :] * k_sub[:, :, :, None, :, :] * jnp.exp(diag_exponent), axis=-1)
  diagonal = jnp.where(lower, diagonal, 0.0)
  scores = off_diagonal + _einsum("bhIij,IJ->bhIiJj", diagonal, jnp.eye(num_sub, dtype=diagonal.dtype))
  return scores.reshape(batch, heads, chunk, chunk)


def _chunk_step(state, chunk_inputs, *, decay_mode):
  """One chunk. state [B,H,Dk,Dv]; q,k [B,H,C,Dk]; v [B,H,C,Dv]; b chunk-local cumsum ([1,H,C] scalar,
  [B,H,C] token, [B,H,C,Dk] vector, unused for none); docs [B,C]; previous_doc [B] (document of the token
  before)."""
  q, k, v, b, docs, previous_doc = chunk_inputs
  chunk = q.shape[2]
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  same_doc = (docs[:, :, None] == docs[:, None, :]) & causal  # [B,C,C]
  sees_state = (docs == previous_doc[:, None])[:, None, :, None]  # [B,1,C,1]: no reset since chunk start
  in_last_doc = (docs == docs[:, -1:])[:, None, :, None]  # [B,1,C,1]: key feeds the outgoing state
  keeps_state = (docs[:, -1] == previous_doc)[:, None, None, None]  # [B,1,1,1]

  if decay_mode == "none":
    scores = jnp.where(same_doc[:, None], _einsum("bhid,bhjd->bhij", q, k), 0.0)
    q_inter, k_inter, state_decay = q, k, 1.0
  elif decay_mode in ("scalar", "token"):
    mask = same_doc[:, None]
    exponent = jnp.where(mask, b[..., :, None] - b[..., None, :], 0.0)
    scores = jnp.where(mask, _einsum("bhid,bhjd->bhij", q, k) * jnp.exp(exponent), 0.0)
    total = b[..., -1:]
    q_inter = q * jnp.exp(b)[..., None]
    k_inter = k * jnp.exp(total - b)[..., None]
    state_decay = jnp.exp(total)[..., None]  # [B|1,H,1,1]
  else:
    scores = jnp.where(same_doc[:, None], _vector_decay_scores(q, k, b), 0.0)
    total = b[:, :, -1:, :]
    q_inter = q * jnp.exp(b)
    k_inter = k * jnp.exp(total - b)
    state_decay = jnp.exp(total)[:, :, 0, :, None]  # [B,H,Dk,1]

  out = _einsum("bhij,bhjv->bhiv", scores, v)
  out = out + jnp.where(sees_state, _einsum("bhid,bhdv->bhiv", q_inter, state), 0.0)
  new_state = jnp.where(keeps_state, state_decay * state, 0.0)
  new_state = new_state + _einsum("bhjd,bhjv->bhdv", jnp.where(in_last_doc, k_inter, 0.0), v)
  return new_state, out


def linear_attention_chunked(q, k, v, log_decay, initial_state, segment_ids, chunk_size):
  """Backend "xla". Shapes as in api.py. Returns (o [B,T,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] f32)."""
  batch, time, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  decay_mode = "none" if log_decay is None else {1: "scalar", 3: "token", 4: "vector"}[log_decay.ndim]
  chunk = resolve_chunk_size(chunk_size, time, decay_mode == "vector")
  padded_time = common.round_up(time, chunk)
  num_chunks = padded_time // chunk
  dtype = reference.compute_dtype(q, k, v, log_decay, initial_state)

  def to_chunks(x):  # [B,T,H,D] -> [N,B,H,C,D]; padding (zeros) contributes nothing to outputs or state
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, padded_time - time), (0, 0), (0, 0)))
    return x.reshape(batch, num_chunks, chunk, heads, x.shape[-1]).transpose(1, 0, 3, 2, 4)

  if decay_mode == "none":
    b = jnp.zeros((num_chunks,), dtype)  # placeholder scanned alongside; unused by the body
  elif decay_mode == "scalar":
    # Per-position log-decay with padded positions at 0 (decay 1), so padding never decays the final state.
    per_step = jnp.where(jnp.arange(padded_time) < time, 1.0, 0.0).astype(dtype)
    steps = per_step.reshape(num_chunks, 1, 1, chunk) * log_decay.astype(dtype)[None, None, :, None]
    b = jnp.cumsum(steps, axis=-1)  # [N,1,H,C]
  elif decay_mode == "token":
    b = jnp.cumsum(to_chunks(log_decay[..., None])[..., 0], axis=-1)  # [N,B,H,C]; padding decays by 1
  else:
    b = jnp.cumsum(to_chunks(log_decay), axis=-2)  # [N,B,H,C,Dk]

  docs = _document_index(segment_ids, batch, time)
  docs = jnp.pad(docs, ((0, 0), (0, padded_time - time)), mode="edge").reshape(batch, num_chunks, chunk)
  previous_doc = jnp.concatenate([jnp.zeros((batch, 1), docs.dtype), docs[:, :-1, -1]], axis=1)
  docs, previous_doc = jnp.moveaxis(docs, 1, 0), jnp.moveaxis(previous_doc, 1, 0)

  state = jnp.zeros((batch, heads, dim_k, dim_v), dtype) if initial_state is None else initial_state.astype(dtype)
  body = jax.checkpoint(functools.partial(_chunk_step, decay_mode=decay_mode))
  state, outs = lax.scan(body, state, (to_chunks(q), to_chunks(k), to_chunks(v), b, docs, previous_doc))
  outs = outs.transpose(1, 0, 3, 2, 4).reshape(batch, padded_time, heads, dim_v)[:, :time]
  return outs.astype(v.dtype), state
