"""Pieces of the trainer checked against independent references: the chunked loss and the MFU peak table."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpr_tools import equations
from lsm_jax import metrics
from lsm_jax import trainer


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
    return trainer.masked_cross_entropy_sums(_LinearHead(weights), hidden, targets, mask, chunk)

  loss_sum, mask_sum = ours(weights, hidden)
  reference_loss, reference_mask = _reference_sums(weights, hidden, targets, mask)
  np.testing.assert_allclose(loss_sum, reference_loss, rtol=1e-5)
  assert float(mask_sum) == float(reference_mask)
  grads = jax.jit(jax.grad(lambda w, h: ours(w, h)[0], argnums=(0, 1)))(weights, hidden)
  reference_grads = jax.jit(jax.grad(lambda w, h: _reference_sums(w, h, targets, mask)[0], argnums=(0, 1)))(
      weights, hidden)
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
    logits = jnp.einsum("btd,dv->btv", h.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                        preferred_element_type=jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)

  ours = lambda w, h: trainer.masked_cross_entropy_sums(_Bf16Head(w), h, targets, mask, 8)[0]
  np.testing.assert_allclose(jax.jit(ours)(weights, hidden), reference(weights, hidden), rtol=1e-5)
  grads = jax.jit(jax.grad(ours, argnums=(0, 1)))(weights, hidden)
  for grad, reference_grad in zip(grads, jax.grad(reference, argnums=(0, 1))(weights, hidden)):
    relative_rms = jnp.sqrt(jnp.mean(jnp.square(grad - reference_grad)) / jnp.mean(jnp.square(reference_grad)))
    assert float(relative_rms) < 5e-3
  jaxpr = jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(weights, hidden).jaxpr
  vocab_matmuls = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"
                   and any(97 in v.aval.shape for v in (*eqn.invars, *eqn.outvars))]
  assert len(vocab_matmuls) == 3


def test_masked_positions_do_not_contribute():
  hidden = jnp.ones((1, 4, 2))
  weights = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  targets = jnp.array([[0, 1, 0, 1]])
  mask = jnp.array([[1.0, 0.0, 0.0, 0.0]])
  loss_sum, mask_sum = trainer.masked_cross_entropy_sums(_LinearHead(weights), hidden, targets, mask, 2)
  # logits (1, 1): each token costs ln 2, and only the first counts.
  np.testing.assert_allclose(loss_sum, np.log(2.0), rtol=1e-6)
  assert float(mask_sum) == 1.0


@pytest.mark.parametrize("device_kind, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("cpu", 1e12),
])
def test_peak_flops_table(device_kind, peak):
  assert metrics.peak_flops_per_device(device_kind) == peak


def test_peak_flops_override_and_unknown_device():
  assert metrics.peak_flops_per_device("NVIDIA H200", 5e14) == 5e14
  with pytest.raises(ValueError, match="no peak FLOP/s known for device kind 'Quantum Abacus'.*h200"):
    metrics.peak_flops_per_device("Quantum Abacus")
  with pytest.raises(ValueError, match="must be positive"):
    metrics.peak_flops_per_device("cpu", 0.0)


def test_metrics_writer_appends_json_lines(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), enable_tensorboard=True)
  writer.write(1, {"loss": np.float32(2.5), "tokens_seen": 128})
  writer.write(2, {"loss": 2.0, "tokens_seen": 256, "val_loss": 2.25})
  writer.close()
  assert metrics.read_metrics(str(tmp_path)) == [
      {"step": 1, "loss": 2.5, "tokens_seen": 128},
      {"step": 2, "loss": 2.0, "tokens_seen": 256, "val_loss": 2.25}]
  assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())


def test_compiled_memory_bytes_counts_donated_buffers_once():
  """4 KiB in, 4 KiB out: donated, the output reuses the input's buffer, so the plan holds 4 KiB, not 8."""
  x = jnp.ones(1024, jnp.float32)
  donated = metrics.compiled_memory_bytes(jax.jit(lambda x: x * 2, donate_argnums=0).lower(x).compile())
  kept = metrics.compiled_memory_bytes(jax.jit(lambda x: x * 2).lower(x).compile())
  assert donated["argument"] == donated["output"] == 4096 and donated["alias"] == 4096
  assert donated["total"] == 4096 + donated["temp"] + donated["generated_code"]
  assert kept["alias"] == 0 and kept["total"] == 8192 + kept["temp"] + kept["generated_code"]


@pytest.mark.parametrize("text, expected", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 96.12GiB", True),
    ("CUDA out of memory. Tried to allocate 12.24 GiB", True),
    ("INVALID_ARGUMENT: shapes do not match", False),
])
def test_is_out_of_memory(text, expected):
  assert metrics.is_out_of_memory(RuntimeError(text)) is expected
