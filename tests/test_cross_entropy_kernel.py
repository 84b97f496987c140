"""The loss's kernels (pallas_kernels.cross_entropy): the one-pass row statistics and the softmax gradient, Pallas GPU
(interpret mode) and XLA's forms against float64, through the fused loss in values and gradients, and per shard under
a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm_jax import losses
from pallas_kernels.cross_entropy import (
  RowStatsConfig,
  SoftmaxGradConfig,
  resolve_backend,
  row_log_normalizer_and_pick,
  softmax_gradient,
)


def float64_statistics(logits, targets):
  x = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  top = x.max(-1, keepdims=True)
  log_normalizer = np.log(np.exp(x - top).sum(-1)) + top[..., 0]
  return log_normalizer, np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]


@pytest.mark.parametrize("backend", ["pallas_gpu", "xla"])
@pytest.mark.parametrize(
  "shape,dtype,config",
  [
    # 1,000 columns: three full blocks of 256 and a masked fourth; 12 rows in blocks of 4
    ((3, 4, 1000), jnp.bfloat16, RowStatsConfig(block_rows=4, block_columns=256)),
    # one block wider than the row; 7 rows: blocks of 1
    ((7, 50), jnp.float32, RowStatsConfig(block_rows=2, block_columns=64)),
    ((2, 5, 300), jnp.float16, None),
    # four blocks of 256 over four programs per row, combined; 3 rows of 2,000: eight blocks, two per program
    ((3, 1000), jnp.bfloat16, RowStatsConfig(block_columns=256, row_splits=4)),
    ((3, 2000), jnp.bfloat16, RowStatsConfig(block_rows=2, block_columns=256, row_splits=4)),
    # five blocks over four programs of two blocks each: the last program's span is empty
    ((2, 1200), jnp.bfloat16, RowStatsConfig(block_columns=256, row_splits=4)),
    # more programs than blocks: the splits are capped at the blocks
    ((2, 300), jnp.float32, RowStatsConfig(block_columns=128, row_splits=16)),
  ],
)
def test_row_statistics_match_float64(backend, shape, dtype, config):
  keys = jax.random.split(jax.random.key(0), 2)
  # spread so that the running max moves between blocks and exp underflows far below it
  logits = (jax.random.normal(keys[0], shape, jnp.float32) * 6 + jnp.linspace(-30, 30, shape[-1])).astype(dtype)
  targets = jax.random.randint(keys[1], shape[:-1], 0, shape[-1])
  log_normalizer, picked = jax.jit(
    lambda x, t: row_log_normalizer_and_pick(x, t, backend=backend, config=config if backend != "xla" else None)
  )(logits, targets)
  want_log_normalizer, want_picked = float64_statistics(logits, targets)
  assert log_normalizer.dtype == picked.dtype == jnp.float32 and log_normalizer.shape == shape[:-1]
  np.testing.assert_allclose(np.asarray(log_normalizer), want_log_normalizer, rtol=2e-7, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(picked), want_picked)


def test_a_row_of_minus_infinity_but_one_is_its_one_logit():
  """Masked-out vocabulary entries (-inf) in every block but one: no nan from the rescaling of an empty block."""
  logits = jnp.full((2, 600), -jnp.inf, jnp.float32).at[0, 599].set(3.0).at[1, 0].set(-2.0)
  log_normalizer, picked = row_log_normalizer_and_pick(
    logits, jnp.array([599, 0]), backend="pallas_gpu", config=RowStatsConfig(block_columns=128)
  )
  np.testing.assert_array_equal(np.asarray(log_normalizer), [3.0, -2.0])
  np.testing.assert_array_equal(np.asarray(picked), [3.0, -2.0])


@pytest.mark.parametrize("backend", ["pallas_gpu", "xla"])
@pytest.mark.parametrize(
  "shape,dtype,out_dtype,config",
  [
    # 1,000 columns in blocks of 256, the last masked; blocks of 4 rows
    ((3, 4, 1000), jnp.bfloat16, jnp.bfloat16, SoftmaxGradConfig(block_rows=4, block_columns=256)),
    ((7, 50), jnp.float32, jnp.float32, SoftmaxGradConfig(block_rows=2, block_columns=64)),
    ((2, 5, 300), jnp.float16, jnp.bfloat16, None),
  ],
)
def test_softmax_gradient_matches_float64(backend, shape, dtype, out_dtype, config):
  """(softmax − one-hot(target)) · weight against float64 from the same logits, with the weights of a loss mask (zero
  rows give zero gradients) and fractional ones."""
  keys = jax.random.split(jax.random.key(3), 3)
  logits = (jax.random.normal(keys[0], shape, jnp.float32) * 4 + jnp.linspace(-8, 8, shape[-1])).astype(dtype)
  targets = jax.random.randint(keys[1], shape[:-1], 0, shape[-1])
  weights = jnp.where(jax.random.uniform(keys[2], shape[:-1]) > 0.3, jax.random.uniform(keys[2], shape[:-1]), 0.0)
  log_normalizer, _ = float64_statistics(logits, targets)
  gradient = jax.jit(
    lambda x, n, t, w: softmax_gradient(
      x, n, t, w, out_dtype, backend=backend, config=config if backend != "xla" else None
    )
  )(logits, jnp.asarray(log_normalizer, jnp.float32), targets, weights)
  x = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  one_hot = np.arange(shape[-1]) == np.asarray(targets)[..., None]
  want = (np.exp(x - log_normalizer[..., None]) - one_hot) * np.asarray(weights, np.float64)[..., None]
  assert gradient.dtype == out_dtype and gradient.shape == shape
  # one rounding to the output dtype (the fp32 log-normaliser's rounding is far below it)
  tolerance = 1e-6 if out_dtype == jnp.float32 else 4e-3
  np.testing.assert_allclose(np.asarray(gradient, np.float64), want, rtol=tolerance, atol=tolerance * 1e-3)
  assert not np.asarray(gradient)[np.asarray(weights) == 0].any()


class _Head:
  def __init__(self, weights, dtype):
    self.weights, self.dtype = weights, dtype

  def head(self):
    return self.weights.T, self.dtype


@pytest.mark.parametrize("logits_dtype", ["bfloat16", "float32"])
def test_the_loss_with_the_kernels_equals_the_loss_with_xla(logits_dtype):
  """The fused loss's value and both gradients are the same whichever backend takes the row statistics and the
  softmax gradient."""
  keys = jax.random.split(jax.random.key(1), 4)
  hidden = jax.random.normal(keys[0], (2, 32, 16))
  weights = jax.random.normal(keys[1], (16, 300)) * 2.0
  targets = jax.random.randint(keys[2], (2, 32), 0, 300)
  mask = (jax.random.uniform(keys[3], (2, 32)) > 0.2).astype(jnp.float32)

  def loss(w, h, backend):
    head = _Head(w, jnp.bfloat16)
    return losses.masked_cross_entropy_sums(head, h, targets, mask, 8, logits_dtype, backend)[0]

  results = {
    backend: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(weights, hidden, backend)
    for backend in ("pallas_gpu", "xla")
  }
  (value, grads), (want_value, want_grads) = results["pallas_gpu"], results["xla"]
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  for grad, want in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_the_kernel_runs_per_shard_of_batch():
  """Under a data × fsdp mesh the loss's row statistics run in a shard_map over the batch: the value and
  gradients of XLA's form; with the vocabulary split over the tensor axis XLA's form runs."""
  from lsm_jax import sharding

  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  keys = jax.random.split(jax.random.key(2), 4)
  hidden = jax.random.normal(keys[0], (8, 16, 16))
  weights = jax.random.normal(keys[1], (16, 200))
  targets = jax.random.randint(keys[2], (8, 16), 0, 200)
  mask = jnp.ones((8, 16), jnp.float32)

  def loss(w, h, backend):
    return losses.masked_cross_entropy_sums(_Head(w, jnp.float32), h, targets, mask, 8, "float32", backend)[0]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  want_value, want_grads = step(weights, hidden, "xla")
  for mesh_config, per_shard in (
    (sharding.MeshConfig(data=2, fsdp=4, tensor=1), True),
    (sharding.MeshConfig(data=2, fsdp=2, tensor=2), False),
  ):
    mesh = sharding.make_mesh(mesh_config)
    with sharding.activate(mesh):
      value, grads = step(weights, hidden, "pallas_gpu")
      text = step.lower(weights, hidden, "pallas_gpu").as_text()
    assert ("shard_map" in text or "sdy.manual_computation" in text) == per_shard, mesh_config
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
    for grad, want in zip(grads, want_grads):
      np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bad_inputs_and_backends_are_refused():
  with pytest.raises(ValueError, match="Unknown cross-entropy backend 'triton'; valid: auto, xla, pallas_gpu"):
    resolve_backend("triton")
  with pytest.raises(ValueError, match=r"targets must be integers of shape \(3,\)"):
    row_log_normalizer_and_pick(jnp.zeros((3, 8)), jnp.zeros((3,), jnp.float32), backend="pallas_gpu")
  with pytest.raises(TypeError, match="logits have dtype int32"):
    row_log_normalizer_and_pick(jnp.zeros((3, 8), jnp.int32), jnp.zeros((3,), jnp.int32), backend="pallas_gpu")
  with pytest.raises(ValueError, match="block_columns must be a power of two"):
    RowStatsConfig(block_columns=1000)
  with pytest.raises(ValueError, match=r"RowStatsConfig.row_splits must be a power of two <= 64; got 3"):
    RowStatsConfig(row_splits=3)
  with pytest.raises(ValueError, match=r"SoftmaxGradConfig.num_warps must be a power of two <= 16; got 32"):
    SoftmaxGradConfig(num_warps=32)
  with pytest.raises(ValueError, match=r"weights must have shape \(3,\); got \(4,\)"):
    softmax_gradient(
      jnp.zeros((3, 8)), jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.zeros(4), jnp.float32, backend="pallas_gpu"
    )
  assert (resolve_backend("auto", "tpu"), resolve_backend("auto", "cpu")) == ("xla", "xla")
