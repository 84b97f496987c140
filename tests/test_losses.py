"""The chunked, fused-gradient cross-entropy checked against optax and plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxpr_tools import equations

from lsm_jax import losses


class _LinearHead:
  """Stands in for LanguageModel.head: a plain fp32 projection to the vocabulary (weights [d, V])."""

  def __init__(self, weights):
    self.weights = weights

  def head(self):
    return self.weights.T, jnp.float32


def _reference_sums(weights, hidden, targets, mask):
  losses = optax.softmax_cross_entropy_with_integer_labels(hidden @ weights, targets)
  return jnp.sum(losses * mask), jnp.sum(mask)


@pytest.mark.parametrize("chunk", [None, 4, 16, 64])
def test_chunked_cross_entropy_matches_optax_in_value_and_gradient(chunk):
  keys = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(keys[0], (3, 16, 8))
  weights = jax.random.normal(keys[1], (8, 50))
  targets = jax.random.randint(keys[2], (3, 16), 0, 50)
  mask = (jax.random.uniform(keys[3], (3, 16)) > 0.3).astype(jnp.float32)

  @jax.jit
  def ours(weights, hidden):
    return losses.masked_cross_entropy_sums(_LinearHead(weights), hidden, targets, mask, chunk)

  loss_sum, mask_sum = ours(weights, hidden)
  reference_loss, reference_mask = _reference_sums(weights, hidden, targets, mask)
  np.testing.assert_allclose(loss_sum, reference_loss, rtol=1e-5)
  assert float(mask_sum) == float(reference_mask)
  grads = jax.jit(jax.grad(lambda w, h: ours(w, h)[0], argnums=(0, 1)))(weights, hidden)
  reference_grads = jax.jit(jax.grad(lambda w, h: _reference_sums(w, h, targets, mask)[0], argnums=(0, 1)))(
    weights, hidden
  )
  for grad, reference_grad in zip(grads, reference_grads):
    np.testing.assert_allclose(grad, reference_grad, rtol=1e-4, atol=1e-5)


class _Bf16Head(_LinearHead):
  def head(self):
    return self.weights.T, jnp.bfloat16


def test_bf16_head_loss_gradient_matches_autodiff_and_is_formed_once():
  """bf16 compute: the fused loss's gradient equals plain autodiff through the same bf16 head (to bf16
  rounding), and its gradient program multiplies by the vocabulary three times per chunk (logits, d hidden,
  d W), not four (remat recomputes the logits)."""
  keys = jax.random.split(jax.random.key(1), 4)
  hidden = jax.random.normal(keys[0], (2, 32, 16))
  weights = jax.random.normal(keys[1], (16, 97)) * 0.3
  targets = jax.random.randint(keys[2], (2, 32), 0, 97)
  mask = (jax.random.uniform(keys[3], (2, 32)) > 0.2).astype(jnp.float32)

  def reference(w, h):
    logits = jnp.einsum(
      "btd,dv->btv", h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)

  ours = lambda w, h: losses.masked_cross_entropy_sums(_Bf16Head(w), h, targets, mask, 8)[0]
  np.testing.assert_allclose(jax.jit(ours)(weights, hidden), reference(weights, hidden), rtol=1e-5)
  grads = jax.jit(jax.grad(ours, argnums=(0, 1)))(weights, hidden)
  for grad, reference_grad in zip(grads, jax.grad(reference, argnums=(0, 1))(weights, hidden)):
    relative_rms = jnp.sqrt(jnp.mean(jnp.square(grad - reference_grad)) / jnp.mean(jnp.square(reference_grad)))
    assert float(relative_rms) < 5e-3
  jaxpr = jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(weights, hidden).jaxpr
  vocab_matmuls = [
    eqn
    for eqn in equations(jaxpr)
    if eqn.primitive.name == "dot_general" and any(97 in v.aval.shape for v in (*eqn.invars, *eqn.outvars))
  ]
  assert len(vocab_matmuls) == 3


def test_masked_positions_do_not_contribute():
  hidden = jnp.ones((1, 4, 2))
  weights = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  targets = jnp.array([[0, 1, 0, 1]])
  mask = jnp.array([[1.0, 0.0, 0.0, 0.0]])
  loss_sum, mask_sum = losses.masked_cross_entropy_sums(_LinearHead(weights), hidden, targets, mask, 2)
  # logits (1, 1): each token costs ln 2, and only the first counts.
  np.testing.assert_allclose(loss_sum, np.log(2.0), rtol=1e-6)
  assert float(mask_sum) == 1.0
