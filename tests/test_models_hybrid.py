"""Hybrid stacks (linear layers interleaved with softmax ones): the layer-pattern grammar, decoding with mixed
caches, single-mixer patterns against the pure models, scanned against unscanned, and the accounting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_sequence_mesh as sequence_mesh
from flax import nnx
from test_models_forward import ATOL, LENGTH, TINY, Runner, random_tokens
from test_sequence_mesh import sequence_parallel_calls  # noqa: F401  (fixture)

from lsm_jax import flops, layer_pattern, sharding, summary
from lsm_jax.models import configs, get_config

# Five layers of "X*2,llama": one full block (a scanned run of two linear layers, then the softmax layer) and a
# cut-short block of two linear layers, so both groups, an inner scan and the tail are exercised.
PATTERNS = {"hgrn2_hybrid": "hgrn2*2,llama", "tnl_hybrid": "tnl*2,softmax"}


def hybrid_config(arch, **overrides):
  return get_config(arch, "70m", **{**TINY, "num_layers": 5, "layer_pattern": PATTERNS[arch], **overrides})


def test_pattern_grammar_expands_cuts_and_groups():
  assert layer_pattern.parse("hgrn2*3, softmax,tnl") == ("hgrn2",) * 3 + ("llama", "tnl")
  assert layer_pattern.layer_mixers("tnl*3,llama,tnl*4", 6) == ("tnl",) * 3 + ("llama", "tnl", "tnl")
  assert layer_pattern.mixer_counts("hgrn2*7,llama", 32) == {"hgrn2": 28, "llama": 4}
  for pattern, num_layers in (("hgrn2*3,llama,hgrn2*4", 26), ("llama", 4), ("tnl*2,llama", 5), ("tnl,llama", 2)):
    groups = layer_pattern.layer_groups(pattern, num_layers)
    runs = [run for group in groups for run in group]
    # Every layer appears once, under its own mixer; a run's layers are consecutive within a repetition.
    assert sorted(layer for run in runs for layer in run.flat_layers) == list(range(num_layers))
    mixers = layer_pattern.layer_mixers(pattern, num_layers)
    assert all(mixers[layer] == run.mixer for run in runs for layer in run.flat_layers)
    for run in runs:
      assert len(run.layers) == run.repeats and {len(r) for r in run.layers} == {run.length}
      assert all(list(r) == list(range(r[0], r[0] + run.length)) for r in run.layers)
  groups = layer_pattern.layer_groups("hgrn2*3,llama,hgrn2*4", 26)  # three full blocks of 8, then 2 layers
  assert [[(run.mixer, run.repeats, run.length) for run in group] for group in groups] == [
    [("hgrn2", 3, 3), ("llama", 3, 1), ("hgrn2", 3, 4)],
    [("hgrn2", 1, 2)],
  ]


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(layer_pattern="hgrn2*7,mamba"), "unknown mixer 'mamba'; valid: llama, tnl, hgrn2, cosformer2, softmax"),
    (dict(layer_pattern="hgrn2*0"), "count of 'hgrn2\\*0' must be positive"),
    (dict(layer_pattern="hgrn2**2"), "malformed term 'hgrn2\\*\\*2'"),
    (dict(layer_pattern=""), "hybrid family and needs a layer pattern such as 'hgrn2\\*7,llama'"),
    (dict(layer_pattern=("hgrn2", "llama")), "layer_pattern must be a string"),
  ],
)
def test_bad_patterns_are_refused_naming_the_valid_choices(overrides, message):
  with pytest.raises(ValueError, match=message):
    hybrid_config("hgrn2_hybrid", **overrides)


@pytest.fixture(scope="module", params=sorted(PATTERNS))
def hybrid_runner(request):
  return request.param, Runner(hybrid_config(request.param))


def test_hybrid_decode_with_mixed_caches_matches_forward(hybrid_runner):
  """Left-padded prompts, then one token at a time through KV caches (softmax layers) and recurrent states
  (linear layers), against the full forward pass of each unpadded row."""
  arch, run = hybrid_runner
  tokens = random_tokens(1, (2, LENGTH))
  full = run.forward(tokens, jnp.ones_like(tokens))
  prompt = jnp.stack([jnp.asarray([0, tokens[0, 0]]), tokens[1, :2]])
  segment_ids = jnp.asarray([[0, 1], [1, 1]], jnp.int32)
  positions = jnp.asarray([[0, 0], [0, 1]], jnp.int32)
  continuation = jnp.stack([tokens[0, 1:9], tokens[1, 2:10]])
  prefill_logits, steps = run.generate_logits(prompt, segment_ids, positions, continuation, max_length=LENGTH)
  np.testing.assert_allclose(prefill_logits[0, 1], full[0, 0], atol=ATOL, rtol=0)
  np.testing.assert_allclose(prefill_logits[1], full[1, :2], atol=ATOL, rtol=0)
  np.testing.assert_allclose(steps[0], full[0, 1:9], atol=ATOL, rtol=0, err_msg=f"{arch}: left-padded row")
  np.testing.assert_allclose(steps[1], full[1, 2:10], atol=ATOL, rtol=0, err_msg=f"{arch}: unpadded row")
  # The caches: per run, KV of max_length slots for the softmax layer, a head_dim² state per head for the others.
  _, state = run._prefill(run.state, prompt, segment_ids, positions, LENGTH)
  full_block, tail = state["layers"][:2], state["layers"][2]
  heads, head_dim = TINY["num_heads"], TINY["head_dim"]
  assert full_block[0]["state"].shape == (2, 2, heads, head_dim, head_dim)
  assert full_block[1]["key"].shape == (1, 2, LENGTH, heads, head_dim)
  assert tail["state"].shape == (2, 2, heads, head_dim, head_dim)


def test_hybrid_is_causal_and_keeps_packed_documents_apart(hybrid_runner):
  arch, run = hybrid_runner
  tokens = random_tokens(4, (2, LENGTH))
  segment_ids = jnp.asarray([[1] * 4 + [2] * 6, [1] * LENGTH], jnp.int32)
  logits = run.forward(tokens, segment_ids)
  changed = run.forward(tokens.at[:, 6].set((tokens[:, 6] + 1) % TINY["vocab_size"]), segment_ids)
  np.testing.assert_array_equal(logits[:, :6], changed[:, :6], err_msg=f"{arch}: the future leaked")
  assert np.abs(logits[:, 6:] - changed[:, 6:]).max() > 1e-4
  # The second document of row 0 equals that document alone at the start of a row.
  alone = run.forward(jnp.concatenate([tokens[:1, 4:], tokens[:1, :4]], axis=1), jnp.ones_like(tokens[:1]))
  np.testing.assert_allclose(logits[0, 4:], alone[0, :6], atol=ATOL, rtol=0, err_msg=f"{arch}: documents mixed")


@pytest.mark.parametrize(
  "arch, pattern, pure_arch",
  [("hgrn2_hybrid", "hgrn2*2", "hgrn2"), ("llama", "softmax*2", "llama"), ("cosformer2", "cosformer2*2", "cosformer2")],
)
def test_single_mixer_pattern_equals_the_pure_model(arch, pattern, pure_arch):
  """Four layers as two scanned blocks of two (a nested scan) equal the pure model with the same weights."""
  tokens = random_tokens(5, (2, LENGTH))
  pure = Runner(get_config(pure_arch, "70m", **{**TINY, "num_layers": 4}))
  patterned = Runner(get_config(arch, "70m", **{**TINY, "num_layers": 4, "layer_pattern": pattern}), seed=1)
  patterned.state = pure.state
  expected = pure.forward(tokens)
  assert np.abs(expected).max() > 1e-2
  np.testing.assert_allclose(patterned.forward(tokens), expected, atol=1e-5, rtol=0)


def _assert_same_prefill(runner_a, runner_b):
  """Both runners' prefill logits and decoding caches on the same prompt agree."""
  tokens = random_tokens(6, (2, LENGTH))
  segment_ids, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)
  logits_a, state_a = runner_a._prefill(runner_a.state, tokens, segment_ids, positions, 12)
  logits_b, state_b = runner_b._prefill(runner_b.state, tokens, segment_ids, positions, 12)
  np.testing.assert_allclose(logits_a, logits_b, atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), state_a, state_b)


def test_scanned_hybrid_equals_unscanned():
  """Both layouts draw layer l from key l: the stacked runs hold the unscanned blocks' parameters, and logits and
  decoding caches agree."""
  scanned = Runner(hybrid_config("hgrn2_hybrid"))
  unscanned = Runner(hybrid_config("hgrn2_hybrid", scan_layers=False))
  runs = [run for group in layer_pattern.layer_groups(PATTERNS["hgrn2_hybrid"], 5) for run in group]
  for stack, run in zip(scanned.model.layers, runs, strict=True):
    for position, layer in enumerate(run.flat_layers):
      block_params = jax.tree.map(lambda a, p=position: a[p], nnx.state(stack, nnx.Param).to_pure_dict())
      unscanned_params = nnx.state(unscanned.model.layers[layer], nnx.Param).to_pure_dict()
      jax.tree.map(np.testing.assert_array_equal, block_params, unscanned_params)
  _assert_same_prefill(scanned, unscanned)


def test_unrolled_stacked_hybrid_equals_unscanned():
  """Stacked runs applied layer by layer (unroll_layers) interleave the runs' layers in the pattern's order."""
  unrolled = Runner(hybrid_config("hgrn2_hybrid", unroll_layers=True))
  unscanned = Runner(hybrid_config("hgrn2_hybrid", scan_layers=False))
  _assert_same_prefill(unrolled, unscanned)


@pytest.mark.parametrize("arch", configs.HYBRID_ARCHS)
@pytest.mark.parametrize("size", ["tiny", "1b"])
def test_instantiated_parameters_equal_the_accounting(arch, size):
  """The built model's non-embedding parameters (norms carry none in the linear families) are the per-layer
  formula of lsm_jax.flops."""
  config = hybrid_config(arch) if size == "tiny" else get_config(arch, size)
  expected = flops.non_embedding_params(
    arch,
    config.num_layers,
    config.d_model,
    config.num_heads,
    ffn_dim=config.ffn_dim,
    layer_pattern=config.layer_pattern,
  )
  assert summary.count_non_embedding_params(config) == expected


@pytest.mark.parametrize("linear", ["tnl", "hgrn2", "cosformer2"])
def test_hybrid_flops_mix_the_pure_models_layer_by_layer(linear):
  """A 7:1 hybrid of 32 layers costs 7/8 of the pure linear model plus 1/8 of LLaMA (every term is per layer or,
  like HGRN2's lower bounds, proportional to its layers); cosFormer2's TPE is counted once, not 7/8 of once."""
  shape, step = (32, 1536, 12), (480, 8192)
  full = dict(ffn_dim=4096, vocab_size=100280)
  pattern = f"{linear}*7,llama"
  for options in ({}, full):
    hybrid = flops.flops_per_step(linear, *shape, *step, layer_pattern=pattern, **options)
    mixed = 7 / 8 * flops.flops_per_step(linear, *shape, *step, **options)
    mixed += 1 / 8 * flops.flops_per_step("llama", *shape, *step, **options)
    tpe = 1 / 8 * 3 * 480 * 4 * 8192 * 1536**2 / 12 if linear == "cosformer2" and options else 0.0
    assert hybrid == pytest.approx(mixed + tpe, rel=1e-12)
  params = flops.non_embedding_params(linear, *shape, ffn_dim=4096, layer_pattern=pattern)
  mixed = 7 / 8 * flops.non_embedding_params(linear, *shape, ffn_dim=4096)
  mixed += 1 / 8 * flops.non_embedding_params("llama", *shape, ffn_dim=4096)
  tpe = 1 / 8 * 1536 * 128 if linear == "cosformer2" else 0.0
  assert params == pytest.approx(mixed + tpe, rel=1e-12)
  with pytest.raises(ValueError, match="needs a layer pattern"):
    flops.non_embedding_params("hgrn2_hybrid", *shape)


def test_hybrid_under_fsdp_and_sequence_parallelism_with_remat_matches_single_device(sequence_parallel_calls):  # noqa: F811
  """fsdp=2 × sequence=4: the linear layers take the sequence-parallel op, the softmax layer is left to GSPMD;
  full remat there, none in the single-device reference; loss, logits and gradients agree."""
  config = sequence_mesh.tiny_config("hgrn2_hybrid", num_layers=3, layer_pattern="hgrn2,llama", attention_impl="xla")
  logits, loss, grads = sequence_mesh.logits_loss_and_grads(
    dataclasses.replace(config, remat_policy="full"), sharding.make_mesh(sequence_mesh.SEQUENCE_MESH)
  )
  logits_ref, loss_ref, grads_ref = sequence_mesh.logits_loss_and_grads(config)
  assert sequence_parallel_calls and set(sequence_parallel_calls) == {"sequence"}
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  sequence_mesh.assert_close(logits, logits_ref)
  sequence_mesh.assert_close(grads, grads_ref, rtol=1e-4, atol=1e-6)
