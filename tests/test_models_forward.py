"""Behaviour of the four tiny models: causality, decoding == forward, packing, scan/remat equivalence, errors."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_tools import equations, pallas_kernel_names

from lsm_jax.models import ARCHS, build_model, get_config
from pallas_kernels.linear_attention.gpu.forward import FUSED_FORWARD_STATES

VOCAB = 512
# Small but exercises several chunks (chunk 4, T not a multiple), two heads and two layers.
TINY = dict(
  num_layers=2,
  d_model=64,
  num_heads=2,
  head_dim=32,
  ffn_dim=96,
  vocab_size=VOCAB,
  dtype="float32",
  linear_attention_backend="xla",
  chunk_size=4,
)
ATOL = 2e-4


def tiny_config(arch, **overrides):
  return get_config(arch, "70m", **{**TINY, **overrides})


class Runner:
  """Jitted entry points of one model (split once, merged inside jit)."""

  def __init__(self, config, seed=0):
    self.model = build_model(config, rngs=nnx.Rngs(seed))
    self.graphdef, self.state = nnx.split(self.model)

  @functools.partial(jax.jit, static_argnums=0)
  def _forward(self, state, tokens, segment_ids, positions):
    return nnx.merge(self.graphdef, state)(tokens, segment_ids=segment_ids, positions=positions)

  def forward(self, tokens, segment_ids=None, positions=None):
    return np.asarray(self._forward(self.state, tokens, segment_ids, positions))

  @functools.partial(jax.jit, static_argnums=(0, 5))
  def _prefill(self, state, tokens, segment_ids, positions, max_length):
    return nnx.merge(self.graphdef, state).prefill(
      tokens, segment_ids=segment_ids, positions=positions, max_length=max_length
    )

  @functools.partial(jax.jit, static_argnums=0)
  def _decode(self, state, tokens, decode_state):
    return nnx.merge(self.graphdef, state).decode_step(tokens, decode_state)

  def generate_logits(self, prompt, segment_ids, positions, continuation, max_length):
    """Prefill `prompt`, then feed `continuation` [B,K] one token at a time; returns (prefill logits,
    [B,K,V] logits of every decode step)."""
    logits, decode_state = self._prefill(self.state, prompt, segment_ids, positions, max_length)
    steps = []
    for t in range(continuation.shape[1]):
      step_logits, decode_state = self._decode(self.state, continuation[:, t], decode_state)
      steps.append(step_logits)
    return np.asarray(logits), np.asarray(jnp.stack(steps, axis=1))


@functools.cache
def runner(arch):
  return Runner(tiny_config(arch))


def random_tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


# Every forward call uses one shape ([2, 10] with segment ids) so each model compiles its forward once.
LENGTH = 10


@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch):
  run = runner(arch)
  base = random_tokens(0, (LENGTH,))
  ones = jnp.ones((2, LENGTH), jnp.int32)
  reference = run.forward(jnp.stack([base, base]), ones)[0]
  for t in (1, 4, 8):
    logits = run.forward(jnp.stack([base, base.at[t].set((base[t] + 7) % VOCAB)]), ones)[1]
    np.testing.assert_array_equal(logits[:t], reference[:t], err_msg=f"{arch}: token {t} leaked backwards")
    assert np.abs(logits[t:] - reference[t:]).max() > 1e-4, f"{arch}: token {t} changed nothing after it"


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_matches_forward(arch):
  """Left-padded prompts of 1 and 2 tokens (padding id 0, prompt id 1, positions from 0), then 8 tokens
  decoded one at a time, against the full forward pass of each unpadded row."""
  run = runner(arch)
  tokens = random_tokens(1, (2, LENGTH))
  full = run.forward(tokens, jnp.ones_like(tokens))
  prompt = jnp.stack([jnp.asarray([0, tokens[0, 0]]), tokens[1, :2]])
  segment_ids = jnp.asarray([[0, 1], [1, 1]], jnp.int32)
  positions = jnp.asarray([[0, 0], [0, 1]], jnp.int32)
  continuation = jnp.stack([tokens[0, 1:9], tokens[1, 2:10]])
  prefill_logits, steps = run.generate_logits(prompt, segment_ids, positions, continuation, max_length=LENGTH)
  np.testing.assert_allclose(prefill_logits[0, 1], full[0, 0], atol=ATOL, rtol=0)
  np.testing.assert_allclose(prefill_logits[1], full[1, :2], atol=ATOL, rtol=0)
  # Step s consumes continuation[:, s], so it predicts what follows it.
  np.testing.assert_allclose(steps[0], full[0, 1:9], atol=ATOL, rtol=0, err_msg=f"{arch}: left-padded row")
  np.testing.assert_allclose(steps[1], full[1, 2:10], atol=ATOL, rtol=0, err_msg=f"{arch}: unpadded row")


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_do_not_interact(arch):
  """Row 0 packs [A, B], row 1 packs [B, A]; each document's logits equal those of it alone at the start
  of a row."""
  run = runner(arch)
  doc_a, doc_b = random_tokens(2, (4,)), random_tokens(3, (6,))
  packed = jnp.stack([jnp.concatenate([doc_a, doc_b]), jnp.concatenate([doc_b, doc_a])])
  segment_ids = jnp.asarray([[1] * 4 + [2] * 6, [1] * 6 + [2] * 4], jnp.int32)
  logits = run.forward(packed, segment_ids)  # positions derived per document
  alone = run.forward(packed[::-1], jnp.ones_like(packed))  # row 0 starts with B, row 1 with A
  np.testing.assert_allclose(logits[0, 4:], alone[0, :6], atol=ATOL, rtol=0, err_msg=f"{arch}: B after A")
  np.testing.assert_allclose(logits[1, 6:], alone[1, :4], atol=ATOL, rtol=0, err_msg=f"{arch}: A after B")
  # Without separate segment ids the second document does see the first.
  unsegmented = run.forward(packed, jnp.ones_like(packed))
  assert np.abs(unsegmented[0, 4:] - alone[0, :6]).max() > 1e-3


def _loss_and_grads(config, tokens, segment_ids):
  model = build_model(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def loss_and_grads(params):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(logits**2)

    return jax.value_and_grad(loss_fn)(params)

  loss, grads = loss_and_grads(params)
  return loss, grads.to_pure_dict(), params.to_pure_dict()


def _unstack_layers(tree):
  """Pure-dict params of a scanned model -> those of the unscanned layout (layers 0..L-1)."""
  layers = tree["layers"]
  count = jax.tree.leaves(layers)[0].shape[0]
  return {**tree, "layers": {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count)}}


@pytest.mark.parametrize(
  "arch",
  ["llama", "hgrn2", pytest.param("tnl", marks=pytest.mark.slow), pytest.param("cosformer2", marks=pytest.mark.slow)],
)
def test_scanned_forward_matches_unscanned(arch):
  tokens = random_tokens(4, (2, LENGTH))
  segment_ids = jnp.asarray([[1] * 4 + [2] * 6, [1] * LENGTH], jnp.int32)
  unscanned = Runner(tiny_config(arch, scan_layers=False))
  np.testing.assert_allclose(
    unscanned.forward(tokens, segment_ids), runner(arch).forward(tokens, segment_ids), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize(
  "arch,remat_policy,scan_layers",
  [
    ("hgrn2", "full", True),
    pytest.param("hgrn2", "dots_saveable", False, marks=pytest.mark.slow),
    pytest.param("llama", "full", True, marks=pytest.mark.slow),
    pytest.param("tnl", "dots_saveable", True, marks=pytest.mark.slow),
    pytest.param("cosformer2", "dots_with_no_batch_dims_saveable", True, marks=pytest.mark.slow),
  ],
)
def test_scan_and_remat_gradients_match_unscanned(arch, remat_policy, scan_layers):
  """Loss and gradients of the scanned and/or rematerialised model equal the plain unscanned model's."""
  tokens = random_tokens(4, (2, 9))
  segment_ids = jnp.asarray([[1] * 4 + [2] * 5, [1] * 9], jnp.int32)
  loss_ref, grads_ref, params_ref = _loss_and_grads(tiny_config(arch, scan_layers=False), tokens, segment_ids)
  loss, grads, params = _loss_and_grads(
    tiny_config(arch, scan_layers=scan_layers, remat_policy=remat_policy), tokens, segment_ids
  )
  if scan_layers:
    grads, params = _unstack_layers(grads), _unstack_layers(params)
  jax.tree.map(np.testing.assert_array_equal, params, params_ref)  # same initialisation in both layouts
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize("arch", ["llama", "tnl"])
def test_fused_mlp_keeps_the_parameters_loss_and_gradients(arch):
  """fused_mlp changes how the GLU is computed, not the model: same parameters (one checkpoint serves both),
  loss and gradients, with the stacked layers scanned and a remat policy that saves the fused matmul."""
  tokens = random_tokens(4, (2, 9))
  segment_ids = jnp.asarray([[1] * 4 + [2] * 5, [1] * 9], jnp.int32)
  loss_ref, grads_ref, params_ref = _loss_and_grads(tiny_config(arch), tokens, segment_ids)
  loss, grads, params = _loss_and_grads(
    tiny_config(arch, fused_mlp=True, remat_policy="dots_saveable"), tokens, segment_ids
  )
  jax.tree.map(np.testing.assert_array_equal, params, params_ref)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref)


def test_unrolled_stacked_layers_match_the_scan():
  """unroll_layers applies the stacked layers one by one (no scan in the program) with the scan's loss and
  gradients, in the same stacked parameter layout."""
  tokens = random_tokens(4, (2, 9))
  segment_ids = jnp.asarray([[1] * 4 + [2] * 5, [1] * 9], jnp.int32)
  loss_ref, grads_ref, _ = _loss_and_grads(tiny_config("hgrn2", remat_policy="dots_saveable"), tokens, segment_ids)
  config = tiny_config("hgrn2", remat_policy="dots_saveable", unroll_layers=True)
  loss, grads, _ = _loss_and_grads(config, tokens, segment_ids)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref)
  model = build_model(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens, segment_ids=segment_ids).mean()))(params)
  assert "scan" not in {equation.primitive.name for equation in jaxpr.jaxpr.eqns}


def test_mixer_kernel_remat_policy_runs_the_kernel_forward_once():
  """dots_and_mixer_kernels_saveable keeps the linear-attention kernels' outputs and residuals but the per-chunk
  states: the gradient launches each other forward kernel once per layer (dots_saveable re-runs them in the
  backward); dots_and_all_mixer_kernels_saveable keeps the states too. Both give the loss and gradients of no
  remat. Pallas GPU kernels in interpret mode."""
  tokens = random_tokens(6, (2, 40))
  segment_ids = jnp.asarray([[1] * 25 + [2] * 15, [1] * 40], jnp.int32)
  kernels = dict(linear_attention_backend="pallas_gpu", chunk_size=16, scan_layers=False)
  launches = {}
  policies = ("dots_saveable", "dots_and_mixer_kernels_saveable", "dots_and_all_mixer_kernels_saveable")
  for policy in policies:
    config = tiny_config("hgrn2", **kernels, remat_policy=policy)
    model = build_model(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = lambda p: nnx.merge(graphdef, p)(tokens, segment_ids=segment_ids).mean()
    launches[policy] = collections.Counter(pallas_kernel_names(jax.make_jaxpr(jax.grad(loss_fn))(params).jaxpr))
  layers = TINY["num_layers"]
  for forward_kernel in ("linear_attention_intra_scores", "linear_attention_output"):
    assert launches["dots_saveable"][forward_kernel] == 2 * layers
    assert launches["dots_and_mixer_kernels_saveable"][forward_kernel] == layers
    assert launches["dots_and_all_mixer_kernels_saveable"][forward_kernel] == layers
  # The op's per-chunk states and gates are residuals: recomputed once for the backward, or kept.
  assert launches["dots_and_mixer_kernels_saveable"]["linear_attention_state_scan"] == 2 * layers
  assert launches["dots_and_mixer_kernels_saveable"]["linear_attention_chunk_sums"] == 3 * layers
  assert launches["dots_and_all_mixer_kernels_saveable"]["linear_attention_state_scan"] == layers
  assert launches["dots_and_all_mixer_kernels_saveable"]["linear_attention_chunk_sums"] == 2 * layers
  loss_ref, grads_ref, _ = _loss_and_grads(tiny_config("hgrn2", **kernels), tokens, segment_ids)
  for policy in policies[1:]:
    loss, grads, _ = _loss_and_grads(tiny_config("hgrn2", **kernels, remat_policy=policy), tokens, segment_ids)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref)


def test_remat_policies_recompute_or_keep_the_fused_forward_states():
  """A fused forward that stores its per-chunk states (GpuKernelConfig.fused_forward_states, TNL) is a state kernel
  to the remat policies: dots_and_mixer_kernels_saveable re-runs it for the backward, dots_and_all_mixer_kernels_
  saveable and no remat run it once; none runs a forward state scan. With the kernels also reading the packed
  q, k, v projection in place (packed_operands), both set through ModelConfig.linear_attention_gpu_overrides, all
  give the loss and gradients of the fused forward without stored states and without remat. Pallas GPU kernels
  in interpret mode."""
  tokens = random_tokens(7, (2, 40))
  segment_ids = jnp.asarray([[1] * 25 + [2] * 15, [1] * 40], jnp.int32)
  kernels = dict(linear_attention_backend="pallas_gpu", chunk_size=16, scan_layers=False)
  # The reference: the fused forward without stored states, dv from its own kernel.
  unfused = {"fused_forward_states": False, "fused_backward_dv": False}
  loss_ref, grads_ref, _ = _loss_and_grads(
    tiny_config("tnl", **kernels, linear_attention_gpu_overrides=unfused), tokens, segment_ids
  )
  kernels["linear_attention_gpu_overrides"] = {"fused_forward_states": True, "packed_operands": True}
  layers = TINY["num_layers"]
  runs = {"none": layers, "dots_and_mixer_kernels_saveable": 2 * layers, "dots_and_all_mixer_kernels_saveable": layers}
  for policy, runs_expected in runs.items():
    config = tiny_config("tnl", **kernels, remat_policy=policy)
    model = build_model(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = lambda p: nnx.merge(graphdef, p)(tokens, segment_ids=segment_ids).mean()
    launches = collections.Counter(pallas_kernel_names(jax.make_jaxpr(jax.grad(loss_fn))(params).jaxpr))
    assert launches[FUSED_FORWARD_STATES] == runs_expected, (policy, launches)
    packed_reads = [
      eqn
      for eqn in equations(jax.make_jaxpr(jax.grad(loss_fn))(params).jaxpr)
      if eqn.primitive.name == "pallas_call" and any(len(getattr(x.aval, "shape", ())) == 5 for x in eqn.invars)
    ]
    assert len(packed_reads) >= 3 * layers  # fused forward, reverse scan and dq/dk (dv too) kernels per layer
    assert launches["linear_attention_state_scan"] == 0 and launches["linear_attention_fused_forward"] == 0
    loss, grads, _ = _loss_and_grads(config, tokens, segment_ids)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref)


def test_bf16_compute_keeps_fp32_params_and_logits():
  model = build_model(tiny_config("hgrn2", dtype="bfloat16"), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  hidden, logits = nnx.jit(lambda m, t: (h := m.hidden_states(t), m.logits_from_hidden(h)))(
    model, random_tokens(5, (1, 6))
  )
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits)).all()


def test_every_param_has_logical_axis_names():
  valid = {"embed", "mlp", "heads", "kv", "vocab", "layers", None}
  for arch in ARCHS:
    for scan in (False, True):
      model = nnx.eval_shape(lambda: build_model(tiny_config(arch, scan_layers=scan), rngs=nnx.Rngs(0)))
      for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.get_value().ndim, (arch, path)
        assert set(names) <= valid, (arch, path, names)
        stacked = (scan and path[0] == "layers") or path[0] == "lower_bound_logits"
        assert (names[0] == "layers") == stacked, (arch, path, names)


def test_bad_inputs_raise_clear_errors():
  run = runner("tnl")
  model = run.model
  with pytest.raises(ValueError, match=r"tokens must have shape \[batch, time\]"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(TypeError, match="tokens must have an integer dtype"):
    model(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="segment_ids must have the shape of tokens"):
    model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(TypeError, match="positions must have an integer dtype"):
    model(jnp.zeros((1, 4), jnp.int32), positions=jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="max_length must be an int >= the prompt length 4"):
    model.prefill(
      jnp.zeros((1, 4), jnp.int32),
      segment_ids=jnp.ones((1, 4), jnp.int32),
      positions=jnp.zeros((1, 4), jnp.int32),
      max_length=3,
    )
  with pytest.raises(ValueError, match="prefill needs segment_ids and positions"):
    model.prefill(jnp.zeros((1, 4), jnp.int32), segment_ids=None, positions=None, max_length=8)
  with pytest.raises(ValueError, match=r"decode_step tokens must be \[batch\] integers"):
    model.decode_step(jnp.zeros((1, 1), jnp.int32), {})
  with pytest.raises(ValueError, match="hidden must end in d_model=64"):
    model.logits_from_hidden(jnp.zeros((1, 2, 3)))
  with pytest.raises(TypeError, match="config must be a lsm_jax.models.configs.ModelConfig"):
    build_model({"arch": "tnl"}, rngs=nnx.Rngs(0))
