"""Sequence parallelism at the model level: a mesh with `sequence` > 1 splits time, and every architecture's
loss, logits and gradients equal the single-device computation (8 fake CPU devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lsm_jax import sharding, trainer
from lsm_jax.models import build_model, get_config, layers
from pallas_kernels.linear_attention import linear_attention, sequence_parallel

VOCAB = 256
T = 64  # 4 sequence shards of 16
TINY = dict(
  num_layers=2,
  d_model=64,
  num_heads=2,
  head_dim=32,
  ffn_dim=96,
  vocab_size=VOCAB,
  dtype="float32",
  linear_attention_backend="xla",
  chunk_size=8,
)
# Row 0: documents start inside shards (t = 5, 46) and exactly at a shard boundary (t = 16); row 1: one
# document spans two shards and the next starts at the boundary t = 32.
SEGMENT_IDS = np.asarray([[1] * 5 + [2] * 11 + [3] * 30 + [4] * 18, [1] * 32 + [2] * 32], np.int32)
SEQUENCE_MESH = sharding.MeshConfig(data=1, fsdp=2, sequence=4, tensor=1)


def tiny_config(arch, **overrides):
  return get_config(arch, "70m", **{**TINY, **overrides})


def tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, T)), jnp.int32)


def logits_loss_and_grads(config, mesh=None):
  """(logits, loss, grads) of a tiny model, unsharded (mesh None) or jitted with the trainer's shardings."""
  graphdef, params = nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param)
  params = params.to_pure_dict()
  inputs, segment_ids = tokens(), jnp.asarray(SEGMENT_IDS)

  def loss_fn(params, inputs, segment_ids):
    model = nnx.merge(graphdef, nnx.State(params))
    logits = model(inputs, segment_ids=segment_ids)
    loss = jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(logits**2)
    return loss, logits

  step = jax.value_and_grad(loss_fn, has_aux=True)
  if mesh is None:
    (loss, logits), grads = jax.jit(step)(params, inputs, segment_ids)
    return logits, loss, grads
  _, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))), nnx.Param)
  param_shardings = sharding.named_shardings(sharding.state_partition_specs(abstract_params, mesh), mesh)
  batch = sharding.batch_sharding(mesh)
  with sharding.activate(mesh):
    (loss, logits), grads = jax.jit(step, in_shardings=(param_shardings, batch, batch))(params, inputs, segment_ids)
  return logits, loss, grads


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol), actual, expected
  )


@pytest.fixture
def sequence_parallel_calls(monkeypatch):
  """Counts traced calls of the sequence-parallel op, to prove the sharded model really takes that path."""
  calls = []
  original = sequence_parallel.sequence_parallel_linear_attention

  def spy(*args, **kwargs):
    calls.append(kwargs["sequence_axis"])
    return original(*args, **kwargs)

  monkeypatch.setattr(sequence_parallel, "sequence_parallel_linear_attention", spy)
  return calls


@pytest.mark.parametrize("arch", ["tnl", "hgrn2", "cosformer2"])
def test_linear_models_match_single_device(arch, sequence_parallel_calls):
  config = tiny_config(arch)
  mesh = sharding.make_mesh(SEQUENCE_MESH)
  logits, loss, grads = logits_loss_and_grads(config, mesh)
  logits_ref, loss_ref, grads_ref = logits_loss_and_grads(config)
  assert sequence_parallel_calls and set(sequence_parallel_calls) == {"sequence"}
  assert logits.sharding.spec[1] == "sequence"  # activations stay split over time up to the head
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  assert_close(logits, logits_ref)
  assert_close(grads, grads_ref, rtol=1e-4, atol=1e-6)


def test_pallas_kernels_run_per_time_shard(sequence_parallel_calls):
  """The wrapper with a Pallas backend (GPU kernels in interpret mode on CPU) under fsdp=2 × sequence=4:
  values, final state and gradients (gate included) equal the float32 reference recurrence."""
  keys = jax.random.split(jax.random.key(0), 5)
  shape = (2, 128, 2, 16)  # shards of 32 tokens: two chunks of 16 each
  q, k, v = (jax.random.normal(key, shape) * 0.5 for key in keys[:3])
  log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + 2.0)
  segment_ids = jnp.asarray([[1] * 3 + [2] * 29 + [3] * 50 + [4] * 46, [1] * 70 + [2] * 58], jnp.int32)
  weights = jax.random.normal(keys[4], shape)

  def loss(attention, q, k, v, log_decay):
    out, state = attention(q, k, v, log_decay, segment_ids=segment_ids, return_final_state=True)
    return jnp.sum(out * weights) + jnp.sum(state**2), (out, state)

  reference = lambda *a, **kw: linear_attention(*a, backend="reference", **kw)  # noqa: E731
  pallas = lambda *a, **kw: layers.sharded_linear_attention(*a, backend="pallas_gpu", chunk_size=16, **kw)  # noqa: E731
  grad = lambda attention: jax.value_and_grad(
    functools.partial(loss, attention),
    argnums=(0, 1, 2, 3),  # noqa: E731
    has_aux=True,
  )
  (_, expected), grads_ref = grad(reference)(q, k, v, log_decay)
  with sharding.activate(sharding.make_mesh(SEQUENCE_MESH)):
    (_, actual), grads = jax.jit(grad(pallas))(q, k, v, log_decay)
  assert sequence_parallel_calls == ["sequence"]
  assert_close(actual, expected, rtol=1e-4, atol=1e-5)
  assert_close(grads, grads_ref, rtol=1e-4, atol=1e-5)


def test_softmax_attention_is_left_to_gspmd(sequence_parallel_calls):
  """LLaMA under a sequence mesh: GSPMD gathers keys and values across the time shards; same result."""
  config = tiny_config("llama", attention_impl="xla")
  logits, loss, grads = logits_loss_and_grads(config, sharding.make_mesh(SEQUENCE_MESH))
  logits_ref, loss_ref, grads_ref = logits_loss_and_grads(config)
  assert not sequence_parallel_calls
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  assert_close(logits, logits_ref)
  assert_close(grads, grads_ref, rtol=1e-4, atol=1e-6)


def test_mesh_and_batch_sharding_split_time():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, sequence=4))
  assert dict(mesh.shape) == {"data": 1, "sequence": 4, "fsdp": 2, "tensor": 1}
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), "sequence")
  assert sharding.logical_to_mesh_spec(
    ("activation_batch", "activation_length", "activation_embed"), (2, T, 64), mesh
  ) == P("fsdp", "sequence", None)
  sharding.check_sequence_divisible(T, mesh)
  with pytest.raises(ValueError, match="seq_len 30 is not divisible by the 4 devices of mesh axis 'sequence'"):
    sharding.check_sequence_divisible(30, mesh)
  # Without sequence parallelism the batch layout is unchanged.
  plain = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1))
  assert sharding.batch_sharding(plain).spec == P(("data", "fsdp"), None)


def test_length_not_divisible_by_the_sequence_shards_stays_correct(sequence_parallel_calls):
  """A prompt of any length (e.g. greedy samples) falls back to the unsplit op instead of failing."""
  config = tiny_config("tnl")
  mesh = sharding.make_mesh(SEQUENCE_MESH)
  graphdef, state = nnx.split(build_model(config, rngs=nnx.Rngs(0)))
  inputs = tokens()[:, :30]
  forward = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(inputs))
  expected = forward(state, inputs)
  with sharding.activate(mesh):
    actual = forward(state, jax.device_put(inputs, NamedSharding(mesh, P())))
  assert not sequence_parallel_calls
  assert_close(actual, expected)


def test_train_step_matches_single_device():
  """Trainer level: one step with two microbatches over a sequence mesh equals one device's full-batch step."""
  config = tiny_config("hgrn2")
  positions = np.concatenate([np.arange(n) for n in (5, 11, 30, 18, 32, 32)]).reshape(2, T)
  batch = {
    "inputs": jnp.concatenate([tokens(1), tokens(2)]),
    "targets": jnp.concatenate([tokens(3), tokens(4)]),
    "segment_ids": jnp.asarray(np.tile(SEGMENT_IDS, (2, 1))),
    "positions": jnp.asarray(np.tile(positions, (2, 1)), jnp.int32),
    "loss_mask": jnp.asarray(np.random.default_rng(5).random((4, T)) < 0.8, jnp.float32),
  }
  metrics = {}
  for name, mesh_config, microbatch in (
    ("single", sharding.MeshConfig(fsdp=1, num_devices=1), None),
    ("sequence", SEQUENCE_MESH, 1),
  ):
    program = trainer.build_train_program(
      config,
      mesh=sharding.make_mesh(mesh_config),
      train_steps=4,
      seq_len=T,
      global_batch_size=4,
      per_shard_microbatch_size=microbatch,
    )
    state, rest = program.init()
    placed = {key: jax.device_put(value, program.batch_sharding) for key, value in batch.items()}
    with sharding.activate(program.mesh):
      _, metrics[name] = program.train_step(state, rest, placed)
  assert program.num_microbatches == 2
  assert_close(metrics["sequence"], metrics["single"], rtol=1e-5)


def test_train_program_refuses_a_seq_len_the_sequence_axis_does_not_divide():
  with pytest.raises(ValueError, match="trainer.train.seq_len 30 is not divisible by the 4 devices"):
    trainer.build_train_program(
      tiny_config("tnl"), mesh=sharding.make_mesh(SEQUENCE_MESH), train_steps=4, seq_len=30, global_batch_size=2
    )
