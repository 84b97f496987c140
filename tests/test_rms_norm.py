"""The residual RMS norm (pallas_kernels.rms_norm): the Pallas GPU kernels (interpret mode) and XLA's form against
a float64 reference in values and gradients, per shard under a mesh, and in a model against the XLA norms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm_jax.models import build_model, get_config, layers
from pallas_kernels.rms_norm import NormConfig, gated_rms_norm, residual_rms_norm, resolve_backend

EPS = 1e-6


def reference(x, delta, ds, dy):
  """(s, y, dL/dx) in float64 for L = Σ s·ds + Σ y·dy, s = x + delta, y = s / sqrt(mean(s²) + eps)."""
  x, ds, dy = (np.asarray(a, np.float64) for a in (x, ds, dy))
  s = x if delta is None else x + np.asarray(delta, np.float64)
  r = 1 / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + EPS)
  y = s * r
  # dy·dy/ds: r·(dy − y·mean(dy·y)), the chain rule through the row's mean square
  grad = ds + r * (dy - y * np.mean(dy * y, axis=-1, keepdims=True))
  return s, y, grad


def inputs(shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [(jax.random.normal(k, shape, jnp.float32) * (1 + i)).astype(dtype) for i, k in enumerate(keys)]


def values_and_gradients(backend, x, delta, ds, dy, config=None):
  def outputs(x, delta):
    return residual_rms_norm(x, delta, eps=EPS, backend=backend, config=config)

  (s, y), vjp = jax.vjp(outputs, x, delta)
  return s, y, vjp((ds, dy))


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))


@pytest.mark.parametrize("backend", ["pallas_gpu", "xla"])
@pytest.mark.parametrize(
  "shape,dtype,block_rows,bound",
  [
    ((2, 9, 96), jnp.bfloat16, 4, 6e-3),  # 96 channels: loaded as 128, masked; 18 rows: blocks of 2
    ((3, 4, 128), jnp.float32, 4, 1e-6),
    ((5, 40), jnp.float32, 1, 1e-6),
  ],
)
@pytest.mark.parametrize("with_delta", [True, False])
def test_values_and_gradients_match_a_float64_reference(backend, shape, dtype, block_rows, bound, with_delta):
  x, delta, ds, dy = inputs(shape, dtype)
  delta = delta if with_delta else None
  config = NormConfig(block_rows=block_rows, block_rows_backward=block_rows) if backend == "pallas_gpu" else None
  s, y, (dx, d_delta) = values_and_gradients(backend, x, delta, ds, dy, config)
  want_s, want_y, want_grad = reference(x, delta, ds, dy)
  assert s.dtype == y.dtype == dx.dtype == dtype
  assert relative_error(s, want_s) < bound and relative_error(y, want_y) < bound
  assert relative_error(dx, want_grad) < bound
  if with_delta:
    np.testing.assert_array_equal(np.asarray(d_delta), np.asarray(dx))
  else:
    assert d_delta is None
  # The stream's cotangent matters: dropping it would miss the residual path's gradient.
  assert relative_error(want_grad - np.asarray(ds, np.float64), want_grad) > 20 * bound


def gated_reference(x, gate_logits, dy):
  """(y, dL/dx, dL/dgate_logits) in float64 for L = Σ y·dy, y = x / sqrt(mean(x²) + eps) · sigmoid(gate_logits)."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
  normed = x * r
  gate = 1.0 if gate_logits is None else 1 / (1 + np.exp(-np.asarray(gate_logits, np.float64)))
  d_normed = dy * gate
  dx = r * (d_normed - normed * np.mean(d_normed * normed, axis=-1, keepdims=True))
  return normed * gate, dx, (None if gate_logits is None else dy * normed * gate * (1 - gate))


@pytest.mark.parametrize("backend", ["pallas_gpu", "xla"])
@pytest.mark.parametrize("shape,dtype,bound", [((2, 9, 96), jnp.bfloat16, 8e-3), ((3, 4, 40), jnp.float32, 1e-6)])
@pytest.mark.parametrize("with_gate", [True, False])
def test_the_gated_norm_matches_a_float64_reference(backend, shape, dtype, bound, with_gate):
  x, gate_logits, _, dy = inputs(shape, dtype, seed=4)
  gate_logits = gate_logits if with_gate else None
  config = NormConfig(block_rows=2, block_rows_backward=4) if backend == "pallas_gpu" else None
  y, vjp = jax.vjp(lambda x, g: gated_rms_norm(x, g, eps=EPS, backend=backend, config=config), x, gate_logits)
  dx, d_gate = vjp(dy)
  want_y, want_dx, want_d_gate = gated_reference(x, gate_logits, dy)
  assert y.dtype == dx.dtype == dtype
  assert relative_error(y, want_y) < bound and relative_error(dx, want_dx) < bound
  if with_gate:
    assert d_gate.dtype == dtype and relative_error(d_gate, want_d_gate) < bound
  else:
    assert d_gate is None


def test_the_kernels_round_the_stream_as_the_unfused_add_does():
  """bf16 s = x + delta is rounded once, and y normalizes the rounded s: bit-equal to XLA's form."""
  x, delta, ds, dy = inputs((4, 6, 96), jnp.bfloat16, seed=1)
  s_gpu, y_gpu, _ = values_and_gradients("pallas_gpu", x, delta, ds, dy)
  s_xla, y_xla, _ = values_and_gradients("xla", x, delta, ds, dy)
  np.testing.assert_array_equal(np.asarray(s_gpu), np.asarray(s_xla))
  assert np.max(np.abs(np.asarray(y_gpu, np.float32) - np.asarray(y_xla, np.float32))) <= 2**-7 * 4


def test_bad_inputs_and_backends_are_refused():
  x = jnp.zeros((2, 3, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="Unknown rms-norm backend 'cuda'; valid: auto, xla, pallas_gpu"):
    residual_rms_norm(x, eps=EPS, backend="cuda")
  with pytest.raises(ValueError, match="delta must match x's shape and dtype"):
    residual_rms_norm(x, jnp.zeros((2, 3, 32), jnp.float32), eps=EPS, backend="pallas_gpu")
  with pytest.raises(TypeError, match="x has dtype int32; valid: float32, bfloat16, float16"):
    residual_rms_norm(jnp.zeros((2, 32), jnp.int32), eps=EPS, backend="pallas_gpu")
  with pytest.raises(ValueError, match="NormConfig.block_rows must be a power of two"):
    NormConfig(block_rows=3)
  assert (resolve_backend("auto", "tpu"), resolve_backend("auto", "cpu")) == ("xla", "xla")
  assert (
    resolve_backend("auto", "gpu") in ("xla", "pallas_gpu") and resolve_backend("pallas_gpu", "cpu") == "pallas_gpu"
  )


def test_the_kernels_run_per_shard_of_batch_and_length():
  """Under a data × fsdp mesh the kernels run in a shard_map over batch (and length where it is sharded): the
  values and gradients of the unsharded XLA form."""
  from lsm_jax import sharding

  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  x, delta, ds, dy = inputs((8, 12, 96), jnp.float32, seed=2)

  def outputs_and_gradients(x, delta, backend):
    outputs, vjp = jax.vjp(
      lambda x, delta: layers.sharded_residual_rms_norm(x, delta, eps=EPS, backend=backend), x, delta
    )
    return outputs, vjp((ds, dy))

  expected = outputs_and_gradients(x, delta, "xla")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1))
  with sharding.activate(mesh):
    got = jax.jit(outputs_and_gradients, static_argnums=2)(x, delta, "pallas_gpu")
    text = jax.jit(outputs_and_gradients, static_argnums=2).lower(x, delta, "pallas_gpu").as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert relative_error(g, e) < 1e-6


@pytest.mark.parametrize("arch", ["tnl", "hgrn2"])
def test_a_model_trains_the_same_with_the_fused_norms(arch):
  """A model's loss and gradients with the Pallas norms (interpret mode: the pre-norms with the residual adds,
  TNL's gated output norm, HGRN2's output norm) equal those with XLA's."""
  tiny = dict(num_layers=2, d_model=96, num_heads=2, head_dim=48, ffn_dim=64, vocab_size=64, dtype="float32")
  tiny |= dict(linear_attention_backend="xla", chunk_size=8)
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)

  def loss_and_grads(norm_backend):
    model = build_model(get_config(arch, "70m", norm_backend=norm_backend, **tiny), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    return jax.value_and_grad(loss)(params)

  (fused_loss, fused_grads), (xla_loss, xla_grads) = loss_and_grads("pallas_gpu"), loss_and_grads("xla")
  np.testing.assert_allclose(float(fused_loss), float(xla_loss), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(xla_grads)):
    assert relative_error(got, want) < 1e-5
