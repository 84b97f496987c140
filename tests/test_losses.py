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


def _float64_bf16_logits_reference(weights, hidden, targets, mask):
  """(loss sum, d hidden, d W) in float64 numpy from the bf16-rounded inputs and bf16-rounded logits: the exact
  result of a loss whose head writes bf16 logits and takes the softmax in high precision."""
  w = np.asarray(jnp.asarray(weights, jnp.bfloat16), np.float64)
  h = np.asarray(jnp.asarray(hidden, jnp.bfloat16), np.float64)
  logits = np.asarray(jnp.asarray(h @ w, jnp.bfloat16), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_softmax, np.asarray(targets)[..., None], -1)[..., 0]
  m = np.asarray(mask, np.float64)
  d_logits = (np.exp(log_softmax) - np.eye(w.shape[1])[np.asarray(targets)]) * m[..., None]
  return -(picked * m).sum(), d_logits @ w.T, np.einsum("btd,btv->dv", h, d_logits)


def test_bf16_logits_match_a_float64_loss_of_the_rounded_logits():
  """loss_logits_dtype='bfloat16': the value is the float64 cross-entropy of the bf16-rounded logits (not of the
  fp32 ones, which differ measurably at these logit sizes), and the gradients follow it to bf16 rounding."""
  keys = jax.random.split(jax.random.key(2), 4)
  hidden = jax.random.normal(keys[0], (2, 32, 16))
  weights = jax.random.normal(keys[1], (16, 97)) * 2.0  # logits of ~8: bf16 rounding steps of ~0.03
  targets = jax.random.randint(keys[2], (2, 32), 0, 97)
  mask = (jax.random.uniform(keys[3], (2, 32)) > 0.2).astype(jnp.float32)

  def ours(w, h, logits_dtype):
    return losses.masked_cross_entropy_sums(_Bf16Head(w), h, targets, mask, 8, logits_dtype)[0]

  loss, d_hidden, d_weight = _float64_bf16_logits_reference(weights, hidden, targets, mask)
  np.testing.assert_allclose(float(jax.jit(ours, static_argnums=2)(weights, hidden, "bfloat16")), loss, rtol=2e-6)
  fp32_logits_loss = float(jax.jit(ours, static_argnums=2)(weights, hidden, "float32"))
  assert abs(fp32_logits_loss - loss) > 20 * 2e-6 * abs(loss)
  grads = jax.jit(jax.grad(ours, argnums=(0, 1)), static_argnums=2)(weights, hidden, "bfloat16")
  for grad, reference in zip(grads, (d_weight, d_hidden)):
    relative_rms = np.sqrt(np.mean((np.asarray(grad, np.float64) - reference) ** 2) / np.mean(reference**2))
    assert relative_rms < 5e-3


def test_an_unknown_logits_dtype_is_refused():
  with pytest.raises(ValueError, match="logits_dtype 'float16' is not one of \\('float32', 'bfloat16'\\)"):
    losses.masked_cross_entropy_sums(
      _LinearHead(jnp.ones((2, 3))), jnp.ones((1, 4, 2)), jnp.zeros((1, 4), int), jnp.ones((1, 4)), None, "float16"
    )
