"""Building blocks and token mixers against float64 NumPy references written from the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm_jax.models import build_model, configs, get_config, layers
from lsm_jax.models.mixers import ARCHITECTURES, HGRN2Mixer, SoftmaxAttention, TNLAttention, cosformer2, softmax, tnl
from lsm_jax.models.mixers.hgrn2 import hgrn2_gate, hgrn2_lower_bounds

TINY = dict(
  num_layers=3,
  d_model=16,
  num_heads=2,
  head_dim=8,
  ffn_dim=24,
  vocab_size=64,
  dtype="float32",
  linear_attention_backend="xla",
  chunk_size=4,
)


def f64(x):
  return np.asarray(x, np.float64)


def srms(x, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def silu(x):
  return x * sigmoid(x)


def test_alibi_slopes_match_the_alibi_schedule():
  np.testing.assert_allclose(tnl.alibi_slopes(8), [2.0**-i for i in range(1, 9)])
  # Non-power-of-two: the 8-head slopes, then every other slope of the 16-head schedule.
  np.testing.assert_allclose(
    tnl.alibi_slopes(12), [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
  )
  assert len(tnl.alibi_slopes(20)) == 20


def test_tnl_log_decays_scale_per_layer():
  log_decay = np.asarray(tnl.tnl_log_decays(4, 8))
  slopes = np.asarray([2.0**-i for i in range(1, 9)])
  for layer in range(4):
    np.testing.assert_allclose(log_decay[layer], -slopes * (1 - layer / 3 + 1e-5), rtol=1e-6)
  # Layer 0, H = 8: ALiBi slopes 2^(-8(h+1)/H) give λ = exp(-slope) from 0.607 to 0.996.
  np.testing.assert_allclose(np.exp(log_decay[0, [0, -1]]), [0.607, 0.996], atol=1e-3)


def test_hgrn2_log_decay_is_stable_and_exact():
  forget = np.linspace(-40.0, 40.0, 81)
  for layer_index, bound in ((0, 0.0), (1, 0.3), (2, 0.9)):
    got = np.asarray(hgrn2_gate(jnp.asarray(forget, jnp.float32), jnp.float32(bound), layer_index, jnp.float32)[1])
    expected = np.log(bound + (1 - bound) * sigmoid(forget))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()

  # Layer 0's bound is exactly 0; its gradient must stay finite (no log(0) leaking into it).
  def loss(bound, forget):
    return jnp.sum(hgrn2_gate(forget, bound, jnp.int32(0), jnp.float32)[1])

  grads = jax.grad(loss, argnums=(0, 1))(jnp.float32(0.0), jnp.asarray(forget, jnp.float32))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("layer_index", [0, 3])
@pytest.mark.parametrize("traced_index", [False, True])
def test_hgrn2_gate_gradients_match_the_paper_formula_in_float64(layer_index, traced_index):
  # λ = lb + (1 - lb) σ(f), k = 1 - λ. For L = Σ a·k + b·log λ, float64 NumPy by hand:
  # ∂L/∂f = (b/λ - a) (1 - lb) σ(f) (1 - σ(f)),  ∂L/∂lb = Σ (b/λ - a) (1 - σ(f)) (layer 0: lb ≡ 0, no gradient).
  rng = np.random.default_rng(layer_index)
  extremes = np.broadcast_to(np.asarray([-100.0, -30.0, -18.0, 18.0, 40.0])[None, :, None, None], (2, 5, 2, 3))
  forget = np.concatenate([rng.normal(0.0, 4.0, (2, 5, 2, 3)), extremes], axis=1)
  bound = 0.0 if layer_index == 0 else rng.uniform(0.05, 0.95, (2, 3))
  a, b = rng.normal(size=forget.shape), rng.normal(size=forget.shape)
  index = jnp.int32(layer_index) if traced_index else layer_index

  def loss(forget, bound):
    k, log_decay = hgrn2_gate(forget, bound, index, jnp.float32)
    return jnp.sum(a * k) + jnp.sum(b * log_decay)

  got_forget, got_bound = jax.jit(jax.grad(loss, argnums=(0, 1)))(
    jnp.asarray(forget, jnp.float32), jnp.broadcast_to(jnp.asarray(bound, jnp.float32), (2, 3))
  )
  s = 1 / (1 + np.exp(-f64(forget)))
  decay = bound + (1 - bound) * s
  g = b / decay - a
  np.testing.assert_allclose(got_forget, g * (1 - bound) * s * (1 - s), rtol=2e-5, atol=1e-6)
  expected_bound = np.zeros((2, 3)) if layer_index == 0 else np.sum(g * (1 - s), axis=(0, 1))
  np.testing.assert_allclose(got_bound, expected_bound, rtol=2e-5, atol=1e-4)
  k, log_decay = hgrn2_gate(jnp.asarray(forget, jnp.bfloat16), jnp.asarray(bound, jnp.float32), index, jnp.bfloat16)
  assert k.dtype == jnp.bfloat16 and log_decay.dtype == jnp.float32
  np.testing.assert_allclose(log_decay, np.log(bound + (1 - bound) * s), rtol=1e-2, atol=1e-2)


def test_hgrn2_lower_bounds_are_an_exclusive_cumsum_over_layers():
  # At the (zero) init the softmax over layers is uniform: lb_l = l / L.
  np.testing.assert_allclose(
    hgrn2_lower_bounds(jnp.zeros((4, 3))), np.broadcast_to(np.arange(4)[:, None] / 4, (4, 3)), atol=1e-7
  )
  logits = np.random.default_rng(7).normal(size=(5, 3))
  weights = np.exp(logits) / np.exp(logits).sum(0)
  expected = np.stack([weights[:layer].sum(0) for layer in range(5)])  # Σ_{i<l}
  np.testing.assert_allclose(hgrn2_lower_bounds(jnp.asarray(logits, jnp.float32)), expected, atol=1e-6)


def test_lrpe_is_a_relative_per_channel_cosine():
  rng = np.random.default_rng(0)
  head_dim, time = 8, 6
  q, k = rng.normal(size=(1, time, 1, head_dim)), rng.normal(size=(1, time, 1, head_dim))
  positions = jnp.asarray([[3, 4, 5, 9, 10, 11]], jnp.int32)
  q_tilde = f64(cosformer2.lrpe(jnp.asarray(q, jnp.float32), positions))[0, :, 0]
  k_tilde = f64(cosformer2.lrpe(jnp.asarray(k, jnp.float32), positions))[0, :, 0]
  assert q_tilde.shape == (time, 2 * head_dim)
  theta = np.concatenate([10000.0 ** (-2 * np.arange(4) / head_dim), np.zeros(4)])
  pos = np.asarray(positions[0], np.float64)
  relative_phases = np.cos(theta * (pos[:, None, None] - pos[None, :, None]))
  expected = np.einsum("tc,sc,tsc->ts", q[0, :, 0], k[0, :, 0], relative_phases)
  np.testing.assert_allclose(q_tilde @ k_tilde.T, expected, rtol=1e-5, atol=1e-5)


def test_rotary_embedding_depends_only_on_relative_position():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))

  def score(t, s):
    rq = softmax.rotary_embedding(q, jnp.asarray([[t]]), 10000.0)
    rk = softmax.rotary_embedding(k, jnp.asarray([[s]]), 10000.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-5)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
  # Against the complex-rotation form on (first half, second half) pairs.
  theta = 10000.0 ** (-2 * np.arange(4) / 8)
  rotate = lambda x, p: (x[:4] + 1j * x[4:]) * np.exp(1j * theta * p)
  expected = np.real(np.sum(rotate(f64(q).ravel(), 7) * np.conj(rotate(f64(k).ravel(), 3))))
  assert score(7, 3) == pytest.approx(expected, rel=1e-5)


def test_every_architecture_is_registered_with_the_parameters_its_mixer_adds():
  assert set(ARCHITECTURES) == set(configs.ALL_ARCHS)
  own_parameters = {"llama": set(), "tnl": set(), "hgrn2": {"lower_bound_logits"}, "cosformer2": {"tpe"}}
  for arch, expected in own_parameters.items():
    model = nnx.eval_shape(lambda arch=arch: build_model(get_config(arch, "70m", **TINY), rngs=nnx.Rngs(0)))
    top_level = set(nnx.state(model, nnx.Param).to_pure_dict())
    assert top_level == {"embedding", "layers", *expected} | ({"final_norm"} if arch == "llama" else set()), arch


def test_positions_restart_at_every_document():
  segment_ids = jnp.asarray([[1, 1, 2, 2, 2, 3], [0, 0, 1, 1, 1, 1]], jnp.int32)
  np.testing.assert_array_equal(layers.positions_from_segments(segment_ids), [[0, 1, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3]])


def test_tpe_matches_a_float64_recurrence_with_resets_and_steps():
  tpe = cosformer2.ToeplitzPositionalEncoding(6, 4, std=0.5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 7, 6))
  segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]], jnp.int32)
  out, final_state = tpe(jnp.asarray(x, jnp.float32), segment_ids)
  kernel, decay = f64(tpe.kernel[...]), np.exp(f64(tpe.log_decay()))
  state, expected = np.zeros(4), []
  for t in range(7):
    state = (0 if t == 3 else decay * state) + x[0, t] @ kernel
    expected.append(x[0, t] + state @ kernel.T)
  np.testing.assert_allclose(out[0], np.stack(expected), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final_state[0], state, rtol=1e-5, atol=1e-6)
  # Decoding step by step from the start of document 2 gives the same outputs.
  step_state = jnp.zeros((1, 4))
  for t in range(3, 7):
    y, step_state = tpe.step(jnp.asarray(x[:, t], jnp.float32), step_state)
    np.testing.assert_allclose(y[0], expected[t], rtol=1e-5, atol=1e-5)


def _mixer_inputs(seed, time=9):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(1, time, 16))


def test_tnl_mixer_matches_masked_parallel_form():
  config = get_config("tnl", "70m", **TINY)
  mixer = TNLAttention(config, rngs=nnx.Rngs(3))
  x = _mixer_inputs(3)
  layer = 1
  log_decay = tnl.tnl_log_decays(3, 2)[layer]
  y, _ = nnx.jit(lambda m, x: m(x, segment_ids=None, positions=None, layer_inputs={"log_decay": log_decay}))(
    mixer, jnp.asarray(x, jnp.float32)
  )
  qkv = np.einsum("btd,dnhk->btnhk", x, f64(mixer.qkv.kernel[...]))
  q, k, v = silu(qkv[0, :, 0]), silu(qkv[0, :, 1]), qkv[0, :, 2]  # [T, H, D]
  t = np.arange(9)
  mask = np.tril(np.exp(f64(log_decay)[:, None, None] * (t[:, None] - t[None, :])))  # λ^(t-s), s <= t
  attended = np.einsum("thd,shd,hts,she->the", q, k, mask, v).reshape(9, 16)
  gate = sigmoid(x[0] @ f64(mixer.gate.down.kernel[...]) @ f64(mixer.gate.up.kernel[...]))
  expected = (srms(attended) * gate) @ f64(mixer.out.kernel[...])
  np.testing.assert_allclose(y[0], expected, rtol=1e-4, atol=1e-5)


def test_hgrn2_mixer_matches_float64_recurrence():
  config = get_config("hgrn2", "70m", **TINY)
  mixer = HGRN2Mixer(config, rngs=nnx.Rngs(4))
  x = _mixer_inputs(4)
  lower_bound = np.random.default_rng(5).uniform(0.1, 0.8, size=16)
  layer_inputs = {"index": jnp.int32(2), "lower_bound": jnp.asarray(lower_bound, jnp.float32)}
  y, _ = nnx.jit(lambda m, x: m(x, segment_ids=None, positions=None, layer_inputs=layer_inputs))(
    mixer, jnp.asarray(x, jnp.float32)
  )
  proj = np.einsum("btd,dnhk->btnhk", x, f64(mixer.in_proj.kernel[...]))[0]
  v, q, forget = proj[:, 0], silu(proj[:, 1]), proj[:, 2]  # [T, H, D]
  forget_gate = lower_bound.reshape(2, 8) + (1 - lower_bound.reshape(2, 8)) * sigmoid(forget)
  state, outs = np.zeros((2, 8, 8)), []
  for t in range(9):
    state = forget_gate[t][:, :, None] * state + (1 - forget_gate[t])[:, :, None] * v[t][:, None, :]
    outs.append(np.einsum("hk,hkv->hv", q[t], state).reshape(16))
  expected = srms(np.stack(outs)) @ f64(mixer.out_proj.kernel[...])
  np.testing.assert_allclose(y[0], expected, rtol=1e-4, atol=1e-5)


def test_softmax_mixer_matches_float64_attention():
  config = get_config("llama", "70m", **TINY)
  mixer = SoftmaxAttention(config, rngs=nnx.Rngs(6))
  x = _mixer_inputs(6, time=7)
  positions = jnp.arange(7)[None]
  y, _ = mixer(jnp.asarray(x, jnp.float32), segment_ids=None, positions=positions, layer_inputs={})
  qkv = np.einsum("btd,dnhk->btnhk", x, f64(mixer.qkv.kernel[...]))
  q = f64(softmax.rotary_embedding(jnp.asarray(qkv[:, :, 0], jnp.float32), positions, 10000.0))[0]
  k = f64(softmax.rotary_embedding(jnp.asarray(qkv[:, :, 1], jnp.float32), positions, 10000.0))[0]
  v = qkv[0, :, 2]
  scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(8) + np.where(np.tri(7, dtype=bool), 0, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("hts,shd->thd", weights, v).reshape(7, 16) @ f64(mixer.out.kernel[...])
  np.testing.assert_allclose(y[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decay_mode", ["scalar", "token"])
def test_packed_linear_attention_runs_per_shard_of_batch_and_heads(monkeypatch, decay_mode):
  """sharded_linear_attention_qkv hands the Pallas GPU kernels (interpret mode) the packed projection per shard,
  batch over data × fsdp and heads over tensor, with the kernels reading it in place (packed_operands): the same
  values and gradients as the unsharded XLA op of the sliced, SiLU-mapped q, k, v. A decay per head and token
  [B, T, H] is split like the rows."""
  import dataclasses

  from lsm_jax import sharding
  from pallas_kernels.linear_attention import testing
  from pallas_kernels.linear_attention.gpu import op as gpu_op

  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  tuned = gpu_op.default_config
  calls = []

  def packed_config(mode, shape, dtype):
    calls.append(shape)
    return dataclasses.replace(tuned(mode, shape, dtype), packed_operands=True)

  monkeypatch.setattr(gpu_op, "default_config", packed_config)
  batch, time, heads, dim = 4, 48, 2, 16
  q, k, v, log_decay, _, segment_ids = testing.random_inputs(
    3, batch=batch, time=time, heads=heads, dim_k=dim, dim_v=dim, decay_mode=decay_mode
  )
  qkv = jnp.stack([q, k, v], axis=2)

  def loss(qkv, log_decay, backend):
    out = layers.sharded_linear_attention_qkv(
      qkv, log_decay, feature_map="silu", segment_ids=segment_ids, backend=backend, chunk_size=16
    )
    return jnp.sum(out * jnp.arange(dim, dtype=out.dtype)), out

  (_, expected), expected_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(qkv, log_decay, "xla")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  with sharding.activate(mesh):
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(
      qkv, log_decay, "pallas_gpu"
    )
  assert set(calls) == {(batch // 4, time, heads // 2, dim)}
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-4, atol=1e-5)
  for got, want in zip(grads, expected_grads):
    assert testing.relative_rms_error(got, want) < 1e-4


def _dot_count(fn, *args):
  return sum(eqn.primitive.name == "dot_general" for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns)


@pytest.mark.parametrize("swish", [False, True])
def test_fused_mlp_is_one_input_matmul_with_the_values_and_gradients_of_two(swish):
  """GatedMLP(fused=True) stacks the up and gate weights at use: the GLU of a float64 reference, two matmuls in the
  forward instead of three and four instead of six in the backward, the gradients of the unfused module."""
  kwargs = dict(swish=swish, std=0.3, param_dtype=jnp.float32)
  fused = layers.GatedMLP(16, 24, **kwargs, rngs=nnx.Rngs(4), fused=True)
  unfused = layers.GatedMLP(16, 24, **kwargs, rngs=nnx.Rngs(4))
  x = jax.random.normal(jax.random.key(5), (2, 7, 16))
  up, gate, down = (f64(m.kernel[...]) for m in (fused.up, fused.gate, fused.down))
  act = silu if swish else (lambda z: z)
  expected = ((f64(x) @ up) * act(f64(x) @ gate)) @ down
  np.testing.assert_allclose(np.asarray(fused(x, jnp.float32)), expected, rtol=1e-5, atol=1e-5)

  def loss(module, x):
    return jnp.sum(jnp.sin(module(x, jnp.float32)))

  grads = {}
  for name, module in (("fused", fused), ("unfused", unfused)):
    graphdef, params = nnx.split(module, nnx.Param)
    forward = lambda p, x: loss(nnx.merge(graphdef, p), x)  # noqa: E731
    grads[name] = jax.grad(forward, argnums=(0, 1))(params, x)
    dots = (_dot_count(forward, params, x), _dot_count(jax.grad(forward, argnums=(0, 1)), params, x))
    assert dots == ((2, 6) if name == "fused" else (3, 9)), (name, dots)
  for got, want in zip(jax.tree.leaves(grads["fused"]), jax.tree.leaves(grads["unfused"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_fused_mlp_adds_no_communication_under_tensor_parallelism():
  """The stacked weights keep the "mlp" axis sharded as it is: the fused GLU's compiled step on a data × fsdp ×
  tensor mesh holds no collective the two-matmul GLU does not."""
  import collections
  import re

  from lsm_jax import sharding

  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  x = jax.random.normal(jax.random.key(6), (8, 12, 64))
  collectives = {}
  for fused in (False, True):
    module = layers.GatedMLP(64, 128, swish=True, std=0.1, param_dtype=jnp.float32, rngs=nnx.Rngs(0), fused=fused)
    graphdef, params = nnx.split(module, nnx.Param)
    shardings = sharding.named_shardings(sharding.state_partition_specs(params, mesh), mesh)
    x_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, None))

    def step(p, x):
      return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, jnp.bfloat16).astype(jnp.float32) ** 2))(p)

    pure = params.to_pure_dict()
    with sharding.activate(mesh):
      lowered = jax.jit(lambda p, x: step(nnx.State(p), x), in_shardings=(shardings, x_sharding)).lower(pure, x)
    text = lowered.compile().as_text()
    collectives[fused] = collections.Counter(
      re.findall(r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(", text)
    )
  assert collectives[False], "the mesh shards the GLU: the unfused step communicates"
  for kind, count in collectives[True].items():
    assert count <= collectives[False][kind], (kind, collectives)
