"""Hybrid stacks through a run directory: a milestone saves and restores the per-run parameter stacks, the evaluation
loader rebuilds the same model from run_metadata.json, and the Hugging Face export writes each layer with its own
mixer (transformers' logits: tests/test_export_hf.py)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from lsm_jax import checkpoint
from lsm_jax.evaluate import engine as engine_lib
from lsm_jax.export import hf
from lsm_jax.models import build_model, get_config

CONFIG = get_config(
  "tnl_hybrid",
  "70m",
  num_layers=3,
  layer_pattern="tnl,llama",
  d_model=64,
  num_heads=2,
  head_dim=32,
  ffn_dim=96,
  vocab_size=260,
  dtype="float32",
)


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp("hybrid") / "run")
  model = build_model(CONFIG, rngs=nnx.Rngs(7))
  checkpointer = checkpoint.Checkpointer(
    run_dir,
    save_interval_steps=100,
    max_to_keep=1,
    milestone_steps=[0, 4],
    milestone_dtype="float32",
    async_save=False,
    run_metadata={
      "arch": CONFIG.arch,
      "size": CONFIG.size,
      "model_config": dataclasses.asdict(CONFIG),
      "tokenizer": "bytes",
    },
  )
  checkpointer.save(4, {"params": nnx.state(model, nnx.Param).to_pure_dict()}, metadata={"tokens_seen": 4096})
  checkpointer.close()
  return run_dir, model


def test_milestone_restores_the_hybrid_and_the_loader_rebuilds_it(hybrid_run):
  run_dir, model = hybrid_run
  params, metadata = checkpoint.load_milestone(run_dir, 4)
  assert metadata["model_config"]["layer_pattern"] == "tnl,llama"
  jax.tree.map(np.testing.assert_array_equal, params, nnx.state(model, nnx.Param).to_pure_dict())
  loaded, _, run_metadata, _ = engine_lib.load_model(run_dir, 4)
  assert loaded.config == CONFIG and run_metadata["arch"] == "tnl_hybrid"
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9), dtype=np.int32)
  np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))


def test_export_writes_each_layer_with_its_own_mixer(hybrid_run, tmp_path):
  run_dir, _ = hybrid_run
  result = hf.export_hf(run_dir, str(tmp_path / "out"), verify=False)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["arch"] == "tnl" and config["layer_mixers"] == ["tnl", "llama", "tnl"]
  sources = result["tensor_sources"]
  assert sources["layers.1.token_mixer.k_proj.weight"] == "layers/1/mixer/qkv/kernel[0][:, 1]"  # the softmax run
  assert sources["layers.2.token_mixer.output_gate.up_proj.weight"] == "layers/2/mixer/gate/up/kernel[0]"
