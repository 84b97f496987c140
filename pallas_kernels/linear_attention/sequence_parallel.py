"""Sequence parallelism for linear attention: the time axis split over a mesh axis.

Each shard runs the ordinary (chunked or Pallas) op on its slice from a zero state. The shards then exchange
three small things — their local final state [B,H,Dk,Dv], their total log-decay [B,H,Dk] and whether a
document starts inside them — with one all-gather over the sequence axis, and every shard rebuilds the state
entering it with a scan over the (few) shards before it. The missing contribution of that incoming state is
    o_t += (q_t ⊙ exp(b_t)) · S_in      for t before the shard's first document start,
with b_t the inclusive cumulative log-decay from the shard's start. The result equals the unsharded op
(recurrentgemma's multi-shard correction, generalised to matrix states and per-channel decays); the traffic
is O(shards · B·H·Dk·Dv), independent of the sequence length, so contexts beyond one device's memory work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels.linear_attention import api, common


def _local_correction(q, log_decay, segment_ids, prev_last_segment, is_first_shard):
  """Per-token factors of the incoming state: exp(b_t) masked after the shard's first document start,
  the shard's total log-decay, and whether the incoming state survives the whole shard."""
  batch, time, heads, dim_k = q.shape
  if log_decay is None:
    cumulative = jnp.zeros((1, time, 1, 1), jnp.float32)
  elif log_decay.ndim == 1:
    steps = jnp.arange(1, time + 1, dtype=jnp.float32)
    cumulative = steps[None, :, None, None] * log_decay.astype(jnp.float32)[None, None, :, None]
  elif log_decay.ndim == 3:  # one decay per head and token: the same for every key channel
    cumulative = jnp.cumsum(log_decay.astype(jnp.float32), axis=1)[..., None]
  else:
    cumulative = jnp.cumsum(log_decay.astype(jnp.float32), axis=1)
  starts = common.segment_starts(segment_ids, batch, time)
  if segment_ids is not None:
    # A document may start exactly at the shard boundary: compare with the previous shard's last token.
    boundary = jnp.logical_and(segment_ids[:, 0] != prev_last_segment, jnp.logical_not(is_first_shard))
    starts = starts.at[:, 0].set(jnp.logical_or(starts[:, 0], boundary))
  before_first_start = jnp.cumsum(starts.astype(jnp.int32), axis=1) == 0  # [B, T]
  factors = jnp.exp(cumulative) * before_first_start[:, :, None, None]
  total_log_decay = jnp.broadcast_to(cumulative[:, -1], (batch, heads, dim_k))
  survives = before_first_start[:, -1]  # [B]
  return factors, total_log_decay, survives


def sequence_parallel_linear_attention(
  q,
  k,
  v,
  log_decay=None,
  *,
  mesh,
  sequence_axis="sequence",
  batch_axis=None,
  head_axis=None,
  initial_state=None,
  segment_ids=None,
  return_final_state=False,
  backend="auto",
  chunk_size=None,
  gpu_overrides=None,
):
  """`api.linear_attention` with [B,T,H,D] inputs sharded over `sequence_axis` on dim 1 (batch and heads may
  be sharded over `batch_axis` / `head_axis`). Same arguments and results as `api.linear_attention`."""
  if sequence_axis not in mesh.axis_names:
    raise ValueError(f"sequence_axis {sequence_axis!r} is not an axis of the mesh; mesh axes: {mesh.axis_names}.")
  num_shards = mesh.shape[sequence_axis]
  if q.shape[1] % num_shards:
    raise ValueError(
      f"time length {q.shape[1]} is not divisible by the {num_shards} shards of mesh axis "
      f"{sequence_axis!r}; pad the sequence to a multiple of {num_shards}."
    )
  api.check_inputs(q, k, v, log_decay, initial_state, segment_ids)
  activation = PartitionSpec(batch_axis, sequence_axis, head_axis, None)
  decay_spec = {
    None: None,
    1: PartitionSpec(head_axis),  # fixed per head
    3: PartitionSpec(batch_axis, sequence_axis, head_axis),  # per head and token
    4: activation,  # per key channel
  }[None if log_decay is None else log_decay.ndim]
  state_spec = PartitionSpec(batch_axis, head_axis, None, None)
  segment_spec = PartitionSpec(batch_axis, sequence_axis)

  def shard_fn(q, k, v, log_decay, initial_state, segment_ids):
    shard_index = jax.lax.axis_index(sequence_axis)
    out, local_state = api.linear_attention(
      q,
      k,
      v,
      log_decay,
      segment_ids=segment_ids,
      return_final_state=True,
      backend=backend,
      chunk_size=chunk_size,
      gpu_overrides=gpu_overrides,
    )
    prev_last_segment = None
    if segment_ids is not None:
      last_segments = jax.lax.all_gather(segment_ids[:, -1], sequence_axis)  # [shards, B]
      prev_last_segment = last_segments[jnp.maximum(shard_index - 1, 0)]
    factors, total_log_decay, survives = _local_correction(
      q, log_decay, segment_ids, prev_last_segment, shard_index == 0
    )
    states, totals, survivals = (jax.lax.all_gather(x, sequence_axis) for x in (local_state, total_log_decay, survives))
    incoming = jnp.zeros_like(local_state) if initial_state is None else initial_state.astype(local_state.dtype)
    incoming_per_shard = []
    for shard in range(num_shards):
      incoming_per_shard.append(incoming)
      carried = jnp.exp(totals[shard])[..., None] * incoming * survivals[shard][:, None, None, None]
      incoming = states[shard] + carried
    final_state = incoming
    state_in = jnp.stack(incoming_per_shard)[shard_index]
    with jax.default_matmul_precision("highest"):
      correction = jnp.einsum("bthk,bhkv->bthv", q.astype(jnp.float32) * factors, state_in)
    out = (out.astype(jnp.float32) + correction).astype(v.dtype)
    return out, final_state

  sharded = jax.shard_map(
    shard_fn,
    mesh=mesh,
    in_specs=(activation, activation, activation, decay_spec, state_spec, segment_spec),
    out_specs=(activation, state_spec),
    check_vma=False,
  )
  out, final_state = sharded(q, k, v, log_decay, initial_state, segment_ids)
  return (out, final_state) if return_final_state else out
