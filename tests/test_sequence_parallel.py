"""Sequence-parallel linear attention equals the unsharded op (values, final state, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.linear_attention.sequence_parallel import sequence_parallel_linear_attention

B, T, H, DK, DV = 2, 32, 2, 8, 4


def make_inputs(mode, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(keys[0], (B, T, H, DK))
  k = jax.random.normal(keys[1], (B, T, H, DK)) * 0.5
  v = jax.random.normal(keys[2], (B, T, H, DV))
  log_decay = {
    "none": None,
    "scalar": -jnp.array([0.05, 0.7]),
    "token": jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H)) + 1.0),
    "vector": jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, DK)) + 1.0),
  }[mode]
  initial_state = jax.random.normal(keys[4], (B, H, DK, DV))
  # Documents start inside shards and exactly at a shard boundary (t = 16 with 4 shards of 8).
  segment_ids = jnp.array([[0] * 5 + [1] * 11 + [2] * 16, [3] * 8 + [4] * 24], jnp.int32)
  return q, k, v, log_decay, initial_state, segment_ids


def relative_error(x, y):
  return float(jnp.linalg.norm((x - y).ravel()) / jnp.linalg.norm(y.ravel()))


@pytest.mark.parametrize("mode", ["none", "scalar", "token", "vector"])
def test_matches_unsharded_values_state_and_gradients(mode):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sequence"))
  q, k, v, log_decay, initial_state, segment_ids = make_inputs(mode)

  def loss(fn, q, k, v, log_decay, initial_state):
    out, state = fn(q, k, v, log_decay, initial_state=initial_state, segment_ids=segment_ids, return_final_state=True)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(state**2), (out, state)

  unsharded = lambda *a, **kw: linear_attention(*a, backend="reference", **kw)
  sharded = lambda *a, **kw: sequence_parallel_linear_attention(
    *a, mesh=mesh, batch_axis="data", backend="reference", **kw
  )
  argnums = (0, 1, 2, 4) if mode in ("none", "scalar") else (0, 1, 2, 3, 4)
  (_, (out_ref, state_ref)), grads_ref = jax.value_and_grad(
    lambda *a: loss(unsharded, *a), argnums=argnums, has_aux=True
  )(q, k, v, log_decay, initial_state)
  (_, (out, state)), grads = jax.jit(jax.value_and_grad(lambda *a: loss(sharded, *a), argnums=argnums, has_aux=True))(
    q, k, v, log_decay, initial_state
  )
  assert relative_error(out, out_ref) < 1e-5
  assert relative_error(state, state_ref) < 1e-5
  for grad, grad_ref in zip(grads, grads_ref):
    assert relative_error(grad, grad_ref) < 1e-5


def test_without_segments_or_initial_state():
  mesh = Mesh(np.array(jax.devices()[:4]), ("sequence",))
  q, k, v, log_decay, _, _ = make_inputs("scalar", seed=1)
  ref = linear_attention(q, k, v, log_decay, backend="reference")
  out = sequence_parallel_linear_attention(q, k, v, log_decay, mesh=mesh, backend="reference")
  assert relative_error(out, ref) < 1e-5


def test_indivisible_length_is_refused():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ("data", "sequence"))
  q, k, v, *_ = make_inputs("none")
  with pytest.raises(ValueError, match="not divisible by the 8 shards"):
    sequence_parallel_linear_attention(q[:, :30], k[:, :30], v[:, :30], mesh=mesh)
