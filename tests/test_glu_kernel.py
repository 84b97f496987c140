"""The fused GLU's product gradient (pallas_kernels.glu): the Pallas GPU kernel (interpret mode) and XLA's autodiff
against float64, through GatedMLP in values and gradients, and per shard under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm_jax.models import configs, layers
from pallas_kernels.glu import GluGradConfig, glu, resolve_backend
from pallas_kernels.glu.api import glu_gradient_xla
from pallas_kernels.glu.gpu import glu_gradient_gpu


def float64_gradient(d_hidden, both, swish):
  d = np.asarray(jnp.asarray(d_hidden, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(both, jnp.float32), np.float64)
  up, gate = b[..., 0, :], b[..., 1, :]
  if swish:
    sigmoid = 1 / (1 + np.exp(-gate))
    return np.stack([d * gate * sigmoid, d * up * (sigmoid + gate * sigmoid * (1 - sigmoid))], axis=-2)
  return np.stack([d * gate, d * up], axis=-2)


def _inputs(shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  both = (jax.random.normal(keys[0], (*shape[:-1], 2, shape[-1])) * 2).astype(dtype)
  return jax.random.normal(keys[1], shape).astype(dtype), both


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize(
  "shape,dtype,config",
  [
    # 96 columns: a block of 64 asked for, 32 (the largest power of two dividing 96) taken; 2 × 6 rows in blocks of 4
    ((2, 6, 96), jnp.bfloat16, GluGradConfig(block_rows=4, block_columns=64)),
    ((5, 256), jnp.float32, GluGradConfig(block_rows=2, block_columns=128, num_warps=8)),
    ((3, 2, 128), jnp.float16, None),
  ],
)
def test_gradient_matches_float64(swish, shape, dtype, config):
  d_hidden, both = _inputs(shape, dtype)
  want = float64_gradient(d_hidden, both, swish)
  # fp32 arithmetic rounded once to the output dtype: within one rounding of float64
  tolerance = {jnp.float32: 1e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}[dtype]
  for got in (
    glu_gradient_gpu(d_hidden, both, swish=swish, config=config),
    jax.grad(lambda b: jnp.sum(glu(b, swish=swish, backend="pallas_gpu").astype(jnp.float32) * d_hidden))(both),
  ):
    assert got.dtype == dtype and got.shape == both.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance, atol=tolerance)
  # XLA's autodiff of the same product, the "xla" backend's gradient, rounds its bf16 intermediates too
  np.testing.assert_allclose(
    np.asarray(glu_gradient_xla(d_hidden, both, swish=swish), np.float64), want, rtol=4 * tolerance, atol=4 * tolerance
  )


def _mlp(glu_backend, swish):
  return layers.GatedMLP(
    32,
    64,
    swish=swish,
    std=0.2,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(0),
    fused=True,
    glu_backend=glu_backend,
  )


def _mlp_value_and_grads(glu_backend, swish, x, mesh=None):
  graphdef, params = nnx.split(_mlp(glu_backend, swish), nnx.Param)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x, jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  if mesh is None:
    return step(params, x), None
  from lsm_jax import sharding

  with sharding.activate(mesh):
    return step(params, x), step.lower(params, x).as_text()


@pytest.mark.parametrize("swish", [False, True])
def test_gated_mlp_with_the_kernel_equals_xla(swish):
  """GatedMLP's output and the gradients of its weights and input are those of XLA's autodiff."""
  x = jax.random.normal(jax.random.key(4), (2, 8, 32))
  (value, grads), _ = _mlp_value_and_grads("pallas_gpu", swish, x)
  (want_value, want_grads), _ = _mlp_value_and_grads("xla", swish, x)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_the_kernel_runs_per_shard():
  """Under a mesh the kernel runs in a shard_map over batch and length, and over the mlp axis when tensor
  parallelism splits it; a width whose shards are not multiples of 16 runs XLA's autodiff."""
  from lsm_jax import sharding

  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  x = jax.random.normal(jax.random.key(5), (8, 8, 32))
  for mesh_config in (sharding.MeshConfig(data=2, fsdp=4, tensor=1), sharding.MeshConfig(data=2, fsdp=2, tensor=2)):
    mesh = sharding.make_mesh(mesh_config)
    (value, grads), text = _mlp_value_and_grads("pallas_gpu", False, x, mesh)
    (want_value, want_grads), _ = _mlp_value_and_grads("xla", False, x, mesh)
    assert "shard_map" in text or "sdy.manual_computation" in text, mesh_config
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  both = jnp.ones((8, 8, 2, 24))  # 12 columns per shard over tensor=2
  with sharding.activate(sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))):
    text = jax.jit(lambda b: layers.sharded_glu(b, swish=False, backend="pallas_gpu")).lower(both).as_text()
  assert "shard_map" not in text and "sdy.manual_computation" not in text


def test_bad_inputs_backends_and_configs_are_refused():
  with pytest.raises(ValueError, match="Unknown GLU backend 'triton'; valid: auto, xla, pallas_gpu"):
    resolve_backend("triton")
  assert (resolve_backend("auto", "tpu"), resolve_backend("auto", "cpu")) == ("xla", "xla")
  with pytest.raises(ValueError, match=r"both must be \[..., 2, F\] and d_hidden \[..., F\]"):
    glu_gradient_gpu(jnp.zeros((4, 64)), jnp.zeros((4, 3, 64)), swish=False)
  with pytest.raises(TypeError, match="dtypes int32 .* valid: float32, bfloat16, float16"):
    glu_gradient_gpu(jnp.zeros((4, 64), jnp.int32), jnp.zeros((4, 2, 64)), swish=False)
  with pytest.raises(ValueError, match="width 24 has no power-of-two block of at least 16 columns"):
    glu_gradient_gpu(jnp.zeros((4, 24)), jnp.zeros((4, 2, 24)), swish=False)
  with pytest.raises(ValueError, match=r"GluGradConfig.block_columns must be a power of two <= 8192; got 100"):
    GluGradConfig(block_columns=100)
  with pytest.raises(ValueError, match="glu_backend"):
    configs.get_config("tnl", "70m", glu_backend="cuda")
