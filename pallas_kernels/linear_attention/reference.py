"""Naive recurrent linear attention: one state update per token. The ground truth for every backend.

Computes, per batch row and head, with S_0 = initial_state (or 0):
    S_t = reset_t ? k_t^T v_t : diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t
    o_t = q_t S_t
where reset_t is true where a new packed document starts (segment_ids[t] != segment_ids[t-1]).
The state and all arithmetic are float32 (float64 when the inputs are float64 and x64 is on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention.common import segment_starts


def compute_dtype(*arrays):
  """float64 if any input is float64, else float32: the reference never computes in bf16."""
  return jnp.result_type(jnp.float32, *[a.dtype for a in arrays if a is not None])


def expand_log_decay(log_decay, batch, time, heads, dim_k, dtype):
  """Broadcasts None / [H] / [B,T,H] / [B,T,H,Dk] log-decays to [B,T,H,Dk] in `dtype`."""
  if log_decay is None:
    return jnp.zeros((batch, time, heads, dim_k), dtype)
  log_decay = log_decay.astype(dtype)
  if log_decay.ndim == 1:
    return jnp.broadcast_to(log_decay[None, None, :, None], (batch, time, heads, dim_k))
  if log_decay.ndim == 3:
    return jnp.broadcast_to(log_decay[..., None], (batch, time, heads, dim_k))
  return log_decay


def recurrent_step(q, k, v, log_decay, state, reset=None):
  """One token: q,k [B,H,Dk], v [B,H,Dv], log_decay [B,H,Dk], state [B,H,Dk,Dv] -> (o [B,H,Dv], state)."""
  decayed = jnp.exp(log_decay)[..., None] * state
  if reset is not None:
    decayed = jnp.where(reset[:, None, None, None], 0.0, decayed)
  state = decayed + k[..., :, None] * v[..., None, :]
  out = jnp.einsum("bhk,bhkv->bhv", q, state)
  return out, state


def linear_attention_recurrent(q, k, v, log_decay=None, initial_state=None, segment_ids=None):
  """Returns (o [B,T,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] in the compute dtype)."""
  batch, time, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  dtype = compute_dtype(q, k, v, log_decay, initial_state)
  decay = expand_log_decay(log_decay, batch, time, heads, dim_k, dtype)
  resets = segment_starts(segment_ids, batch, time)
  state = jnp.zeros((batch, heads, dim_k, dim_v), dtype) if initial_state is None else initial_state.astype(dtype)

  def body(state, inputs):
    q_t, k_t, v_t, a_t, r_t = inputs
    out, state = recurrent_step(q_t, k_t, v_t, a_t, state, r_t)
    return state, out

  time_major = lambda x: jnp.moveaxis(x.astype(dtype), 1, 0)
  with jax.default_matmul_precision("highest"):
    state, outs = jax.lax.scan(
      body, state, (time_major(q), time_major(k), time_major(v), time_major(decay), jnp.moveaxis(resets, 1, 0))
    )
  return jnp.moveaxis(outs, 0, 1).astype(v.dtype), state


def linear_attention_recurrent_with_chunk(q, k, v, log_decay, initial_state, segment_ids, chunk_size):
  """Backend entry point; the recurrent form has no chunks, so `chunk_size` is ignored."""
  del chunk_size
  return linear_attention_recurrent(q, k, v, log_decay, initial_state, segment_ids)
