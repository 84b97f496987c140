"""lsm_jax.export: the tensors of milestones of real (tiny) model trees, pure and hybrid, checked name by name and bit
by bit.

The transformers round trip (logits, generation, tokenizers, import) is in tests/test_export_hf.py."""

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

from lsm_jax import checkpoint
from lsm_jax.export import __main__ as export_cli
from lsm_jax.export import hf
from lsm_jax.models import build_model, get_config

NUM_LAYERS = 2


def tiny_params(arch, scan_layers, seed=3, **overrides):
  """The real model's parameter tree (shapes from nnx.eval_shape) filled with seeded normal values."""
  shape = dict(num_layers=NUM_LAYERS, d_model=256, num_heads=2, ffn_dim=384, vocab_size=320)
  config = get_config(arch, "70m", **{**shape, **overrides}, scan_layers=scan_layers)
  abstract = nnx.state(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
  rng = np.random.default_rng(seed)
  return config, jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape, dtype=np.float32), abstract)


def save_milestone(run_dir, config, params, dtype="float32"):
  checkpointer = checkpoint.Checkpointer(
    str(run_dir),
    save_interval_steps=100,
    max_to_keep=1,
    milestone_steps=[0, 4],
    milestone_dtype=dtype,
    async_save=False,
    run_metadata={"arch": config.arch, "size": config.size, "model_config": dataclasses.asdict(config)},
  )
  checkpointer.save(4, {"params": params}, metadata={"tokens_seen": 4096})
  checkpointer.close()


def expected_tensors(arch, params, mixers=None):
  """The documented mapping, written out by hand per architecture (stacked or unstacked layers), in lsm_jax's
  torch names; `hf_names` gives LLaMA's transformers names. mixers: each layer's token mixer (a hybrid stack, its
  layers unstacked); `arch` then gives the norms."""
  mixers = mixers or [arch] * NUM_LAYERS

  def layer(tree, index):
    layers = tree["layers"]
    if index in layers:
      return layers[index]
    return jax.tree.map(lambda leaf: np.asarray(leaf)[index], layers)

  def linear(kernel):
    kernel = np.asarray(kernel)
    return kernel.reshape(kernel.shape[0], -1).T

  expected = {"embed_tokens.weight": np.asarray(params["embedding"])}
  for index, mixer_name in enumerate(mixers):
    block, prefix = layer(params, index), f"layers.{index}."
    mixer, mlp = block["mixer"], block["mlp"]
    for name in ("gate", "up", "down"):
      expected[f"{prefix}channel_mixer.{name}_proj.weight"] = linear(mlp[name]["kernel"])
    if mixer_name == "hgrn2":
      fused = np.asarray(mixer["in_proj"]["kernel"])
      for part, name in enumerate("vqf"):
        expected[f"{prefix}token_mixer.{name}_proj.weight"] = linear(fused[:, part])
      expected[f"{prefix}token_mixer.o_proj.weight"] = linear(mixer["out_proj"]["kernel"])
    else:
      fused = np.asarray(mixer["qkv"]["kernel"])
      for part, name in enumerate("qkv"):
        expected[f"{prefix}token_mixer.{name}_proj.weight"] = linear(fused[:, part])
      expected[f"{prefix}token_mixer.o_proj.weight"] = linear(mixer["out"]["kernel"])
    if mixer_name in ("tnl", "cosformer2"):
      for name in ("down", "up"):
        expected[f"{prefix}token_mixer.output_gate.{name}_proj.weight"] = linear(mixer["gate"][name]["kernel"])
    if arch == "llama":
      expected[f"{prefix}token_mixer_norm.weight"] = np.asarray(block["mixer_norm"]["scale"])
      expected[f"{prefix}channel_mixer_norm.weight"] = np.asarray(block["mlp_norm"]["scale"])
  if arch == "llama":
    expected["norm.weight"] = np.asarray(params["final_norm"]["scale"])
  if "hgrn2" in mixers:
    expected["lower_bound_logits"] = np.asarray(params["lower_bound_logits"])
  if "cosformer2" in mixers:
    expected["tpe.up_proj.weight"] = np.asarray(params["tpe"]["kernel"]).T
  return expected


def hf_names(arch, tensors):
  """LLaMA under transformers' LlamaForCausalLM names, written out by hand; the linear models keep lsm_jax's."""
  if arch != "llama":
    return tensors
  renamed = {}
  for name, tensor in tensors.items():
    for ours, theirs in (
      ("token_mixer_norm", "input_layernorm"),
      ("channel_mixer_norm", "post_attention_layernorm"),
      ("token_mixer", "self_attn"),
      ("channel_mixer", "mlp"),
    ):
      name = name.replace(f".{ours}.", f".{theirs}.")
    renamed[f"model.{name}"] = tensor
  return renamed


@pytest.mark.parametrize("arch", ["llama", "tnl", "hgrn2", "cosformer2"])
def test_export_matches_every_parameter(tmp_path, arch):
  config, params = tiny_params(arch, scan_layers=True)
  save_milestone(tmp_path / "run", config, params)
  export_cli.main([f"--checkpoint={tmp_path / 'run'}", f"--out={tmp_path / 'out'}", "--noverify"])

  loaded = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  expected = hf_names(arch, expected_tensors(arch, params))
  assert sorted(loaded) == sorted(expected)
  for name, tensor in expected.items():
    assert loaded[name].dtype == np.float32
    np.testing.assert_array_equal(loaded[name], tensor, err_msg=name)
  # Nothing dropped: the exported elements are exactly the model's parameters.
  assert sum(t.size for t in loaded.values()) == sum(np.size(leaf) for leaf in jax.tree.leaves(params))

  exported_config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported_config["model_type"] == ("llama" if arch == "llama" else "lsm_jax")
  assert exported_config["num_hidden_layers"] == NUM_LAYERS and exported_config["hidden_size"] == 256
  assert exported_config["tie_word_embeddings"] is True and exported_config["torch_dtype"] == "float32"
  provenance = json.loads((tmp_path / "out" / "lsm_jax_export.json").read_text())
  assert provenance["arch"] == arch and provenance["step"] == 4 and provenance["tokens_seen"] == 4096
  assert sorted(provenance["tensor_sources"]) == sorted(expected)


def test_stacked_and_unstacked_layers_export_identically(tmp_path):
  stacked_config, stacked_params = tiny_params("tnl", scan_layers=True)
  unstacked_config, unstacked_layout = tiny_params("tnl", scan_layers=False)
  unstacked_params = {
    **stacked_params,
    "layers": {
      index: jax.tree.map(lambda leaf, i=index: leaf[i], stacked_params["layers"]) for index in range(NUM_LAYERS)
    },
  }
  assert jax.tree.structure(unstacked_params) == jax.tree.structure(unstacked_layout)
  for name, config, params in (
    ("stacked", stacked_config, stacked_params),
    ("unstacked", unstacked_config, unstacked_params),
  ):
    save_milestone(tmp_path / name, config, params)
    hf.export_hf(str(tmp_path / name / "checkpoints" / "milestones" / "4"), str(tmp_path / f"{name}_out"), verify=False)
  stacked = safetensors.numpy.load_file(str(tmp_path / "stacked_out" / "model.safetensors"))
  unstacked = safetensors.numpy.load_file(str(tmp_path / "unstacked_out" / "model.safetensors"))
  assert sorted(stacked) == sorted(unstacked)
  for name in stacked:
    np.testing.assert_array_equal(stacked[name], unstacked[name], err_msg=name)


def test_bfloat16_export_is_bit_exact(tmp_path):
  config, params = tiny_params("hgrn2", scan_layers=True)
  save_milestone(tmp_path / "run", config, params, dtype="bfloat16")
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"), step=4, verify=False)
  raw = (tmp_path / "out" / "model.safetensors").read_bytes()
  header_size = int.from_bytes(raw[:8], "little")
  assert json.loads(raw[8 : 8 + header_size])["__metadata__"] == {"format": "pt", "arch": "hgrn2", "step": "4"}
  loaded = {
    name: np.frombuffer(view["data"], dtype=ml_dtypes.bfloat16).reshape(view["shape"])
    for name, view in safetensors.deserialize(raw)
    if view["dtype"] == "BF16"
  }
  expected = expected_tensors("hgrn2", params)
  assert sorted(loaded) == sorted(expected)
  for name, tensor in expected.items():
    np.testing.assert_array_equal(loaded[name], tensor.astype(ml_dtypes.bfloat16), err_msg=name)


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match="must be a run directory"):
    hf.export_hf(str(tmp_path), str(tmp_path / "out"))
  config, params = tiny_params("llama", scan_layers=True)
  save_milestone(tmp_path / "run", config, params)
  with pytest.raises(ValueError, match=r"--step=3 is not a complete milestone of .*run; its milestones: \[4\]"):
    hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"), step=3)
  with pytest.raises(ValueError, match="dtype must be one of"):
    hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"), dtype="float16")
  with pytest.raises(ValueError, match="only for HGRN2"):
    hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"), export_format="fla")


def test_fla_format_is_refused_with_the_mismatch(tmp_path):
  config, params = tiny_params("hgrn2", scan_layers=True)
  save_milestone(tmp_path / "run", config, params)
  with pytest.raises(ValueError, match=r"SGLU.*swish.*exclusive cumsum.*first row"):
    hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"), export_format="fla")
  assert not (tmp_path / "out").exists()


# The model layer of each row of a scanned hybrid's run stacks (5 layers), written out by hand: the runs of the
# pattern's block in order, each stacked repetition by repetition, then those of the cut-short last block.
HYBRID_RUN_LAYERS = {
  "hgrn2,llama": [(0, 2), (1, 3), (4,)],
  "cosformer2,llama,tnl*2": [(0,), (1,), (2, 3), (4,)],
}


@pytest.mark.parametrize(
  "arch, pattern",
  [("hgrn2_hybrid", "hgrn2,llama"), ("llama", "cosformer2,llama,tnl*2")],  # linear norms; LLaMA's norms
)
def test_hybrid_layers_export_by_their_own_mixer_from_either_layout(tmp_path, arch, pattern):
  """The scanned hybrid holds one stack per run, the unscanned one layer l at layers/l; both export layer l's
  parameters, by its own mixer, under layers.l."""
  shape = dict(num_layers=5, layer_pattern=pattern)
  config, params = tiny_params(arch, scan_layers=True, **shape)
  unscanned_config, unscanned_layout = tiny_params(arch, scan_layers=False, **shape)
  runs = HYBRID_RUN_LAYERS[pattern]
  assert sorted(params["layers"]) == list(range(len(runs)))
  unscanned = {
    **params,
    "layers": {
      layer: jax.tree.map(lambda leaf, row=row: leaf[row], params["layers"][run])
      for run, layers in enumerate(runs)
      for row, layer in enumerate(layers)
    },
  }
  # Each layer received its own mixer's parameters: the unscanned model's tree, shape for shape.
  assert jax.tree.structure(unscanned) == jax.tree.structure(unscanned_layout)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, unscanned, unscanned_layout)) == [True] * len(
    jax.tree.leaves(unscanned)
  )
  norms = "llama" if arch == "llama" else "hgrn2"
  expected = expected_tensors(norms, unscanned, mixers=list(config.layer_mixers))
  for name, layout_config, layout_params in (("scanned", config, params), ("unscanned", unscanned_config, unscanned)):
    save_milestone(tmp_path / name, layout_config, layout_params)
    hf.export_hf(str(tmp_path / name), str(tmp_path / f"{name}_out"), verify=False)
    loaded = safetensors.numpy.load_file(str(tmp_path / f"{name}_out" / "model.safetensors"))
    assert sorted(loaded) == sorted(expected)
    for tensor_name, tensor in expected.items():
      np.testing.assert_array_equal(loaded[tensor_name], tensor, err_msg=f"{tensor_name} ({name})")
  exported_config = json.loads((tmp_path / "scanned_out" / "config.json").read_text())
  assert exported_config["model_type"] == "lsm_jax" and exported_config["arch"] == norms
  assert exported_config["layer_mixers"] == list(config.layer_mixers) and exported_config["rope_theta"] == 10000.0
  assert (tmp_path / "scanned_out" / "modeling_lsm.py").is_file()


@pytest.mark.parametrize(
  "arch, pattern, pure",
  [("tnl", "tnl", "tnl"), ("hgrn2_hybrid", f"hgrn2*{NUM_LAYERS}", "hgrn2"), ("llama", "llama", "llama")],
)
def test_a_pattern_of_one_mixer_exports_as_the_pure_model(tmp_path, arch, pattern, pure):
  """Every layer with the mixer of its norms' family: the pure model's config.json, weights and modeling files."""
  pure_config, params = tiny_params(pure, scan_layers=True)
  patterned_config = dataclasses.replace(pure_config, arch=arch, layer_pattern=pattern)
  for name, config in (("pure", pure_config), ("patterned", patterned_config)):
    save_milestone(tmp_path / name, config, params)
    hf.export_hf(str(tmp_path / name), str(tmp_path / f"{name}_out"), verify=False)
  pure_out, patterned_out = tmp_path / "pure_out", tmp_path / "patterned_out"
  assert (patterned_out / "config.json").read_text() == (pure_out / "config.json").read_text()
  assert sorted(path.name for path in patterned_out.glob("*.py")) == sorted(path.name for path in pure_out.glob("*.py"))
  pure_tensors = safetensors.numpy.load_file(str(pure_out / "model.safetensors"))
  patterned_tensors = safetensors.numpy.load_file(str(patterned_out / "model.safetensors"))
  assert sorted(patterned_tensors) == sorted(pure_tensors)
  for name, tensor in pure_tensors.items():
    np.testing.assert_array_equal(patterned_tensors[name], tensor, err_msg=name)
