"""LLaMA's splash attention (Pallas TPU, in Pallas' interpreter on CPU) against the XLA path: values and gradients of
a tiny model with packed documents, unsharded and per shard of a batch × heads mesh, and the fallback for
lengths splash cannot block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_tools import equations

from lsm_jax import sharding
from lsm_jax.models import build_model, get_config
from lsm_jax.models.mixers import softmax

VOCAB = 128


@pytest.fixture(autouse=True)
def interpret_splash(monkeypatch):
  monkeypatch.setattr(softmax, "INTERPRET_SPLASH", True)


TINY = dict(num_layers=2, d_model=64, num_heads=4, head_dim=16, ffn_dim=96, vocab_size=VOCAB, dtype="float32")


def _batch(time, rows=4, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (rows, time)), jnp.int32)
  # Documents start inside splash blocks and exactly at one (t = 128); the last row is one document.
  starts = [(0, 5, 128, time - 3), (0, 70), (0, 1), (0,)]
  segment_ids = np.zeros((rows, time), np.int32)
  for row, row_starts in enumerate(starts[:rows]):
    for start in row_starts:
      segment_ids[row, start:] += 1
  return tokens, jnp.asarray(segment_ids)


def _loss_and_grads(attention_impl, time, mesh=None):
  config = get_config("llama", "70m", attention_impl=attention_impl, **TINY)
  graphdef, params = nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param)
  params = params.to_pure_dict()
  tokens, segment_ids = _batch(time)

  def loss_fn(params, tokens, segment_ids):
    logits = nnx.merge(graphdef, nnx.State(params))(tokens, segment_ids=segment_ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(logits**2)

  step = jax.value_and_grad(loss_fn)
  if mesh is None:
    return jax.jit(step)(params, tokens, segment_ids), jax.make_jaxpr(step)(params, tokens, segment_ids).jaxpr
  with sharding.activate(mesh):
    return jax.jit(step)(params, tokens, segment_ids), jax.make_jaxpr(step)(params, tokens, segment_ids).jaxpr


def _kernel_calls(jaxpr):
  return sum(eqn.primitive.name == "pallas_call" for eqn in equations(jaxpr))


def _assert_close(actual, expected):
  (loss, grads), (loss_ref, grads_ref) = actual, expected
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), grads, grads_ref
  )


def test_splash_matches_xla_with_documents():
  expected, _ = _loss_and_grads("xla", 256)
  actual, jaxpr = _loss_and_grads("splash", 256)
  assert _kernel_calls(jaxpr) > 0  # the splash kernels, not a fallback
  _assert_close(actual, expected)


def test_splash_runs_per_shard_of_batch_and_heads():
  # data 2 × fsdp 2 split the 4 rows, tensor 2 the 4 heads: each shard runs splash on its rows and heads.
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  expected, _ = _loss_and_grads("xla", 256)
  actual, jaxpr = _loss_and_grads("splash", 256, mesh)
  shard_maps = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "shard_map"]
  assert shard_maps and _kernel_calls(jaxpr) > 0
  _assert_close(actual, expected)


def test_a_time_split_mesh_takes_the_xla_path():
  # sequence 2 splits time: splash cannot run on a slice of the keys, so GSPMD partitions the XLA attention.
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, sequence=2))
  expected, _ = _loss_and_grads("xla", 256)
  actual, jaxpr = _loss_and_grads("splash", 256, mesh)
  assert _kernel_calls(jaxpr) == 0
  _assert_close(actual, expected)


def test_lengths_splash_cannot_block_take_the_xla_path():
  # T = 200 is not a multiple of 128 (evaluation prompts have any length): same model, XLA attention.
  assert softmax.splash_block(200) is None and softmax.splash_block(384) == 128
  expected, _ = _loss_and_grads("xla", 200)
  actual, jaxpr = _loss_and_grads("splash", 200)
  assert _kernel_calls(jaxpr) == 0
  _assert_close(actual, expected)


@pytest.mark.parametrize(
  "platform,dtype,expected",
  [
    ("tpu", jnp.bfloat16, "splash"),
    ("tpu", jnp.float32, "splash"),
    ("gpu", jnp.bfloat16, "pallas_gpu"),
    ("gpu", jnp.float32, "xla"),
    ("cpu", jnp.bfloat16, "xla"),
  ],
)
def test_auto_attention_follows_the_platform(platform, dtype, expected):
  dtype = jnp.dtype(dtype).name
  assert get_config("llama", "70m", dtype=dtype).resolved_for(platform).attention_impl == expected
  assert get_config("llama", "70m", dtype=dtype, attention_impl="xla").resolved_for(platform).attention_impl == "xla"
