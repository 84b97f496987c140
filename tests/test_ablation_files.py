"""The ablation experiment files (gin/ablations/): each parses strictly leaving open only MODEL_DIR and DATA_DIR,
builds its model abstractly, trains the shape and context its name says with the paper's ~4M tokens per step,
and shares its hardware settings with the main 1B run."""

import glob
import math
import os
import re

import gin
import jax
import pytest
from flax import nnx

from lsm_jax import train
from lsm_jax.models.model import build_model

ASPECT_SHAPES = {"1536x32", "1792x24", "2048x18", "3072x8"}
CONTEXTS = {"2k": 2048, "4k": 4096, "8k": 8192, "16k": 16384}
ABLATION_FILES = sorted(
  os.path.relpath(path, train.REPO_ROOT)
  for pattern in ("aspect", "context")
  for path in glob.glob(os.path.join(train.REPO_ROOT, "gin", "ablations", pattern, "*.gin"))
)


def macro(name):
  """A macro's value, following macros bound to other macros."""
  value = gin.query_parameter(f"{name}/macro.value")
  while isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value


def parse(paths):
  gin.clear_config()
  train.parse_gin(paths, ["MODEL_DIR = '/unused'", "DATA_DIR = '/unused'"])


def test_the_grid_of_files():
  names = {os.path.basename(path)[: -len(".gin")] for path in ABLATION_FILES if "/aspect/" in path}
  assert names == {f"{arch}_{shape}" for arch in ("llama", "tnl", "hgrn2", "cosformer2") for shape in ASPECT_SHAPES}
  names = {os.path.basename(path)[: -len(".gin")] for path in ABLATION_FILES if "/context/" in path}
  assert names == {f"{arch}_{context}" for arch in ("tnl", "hgrn2", "cosformer2") for context in CONTEXTS} | {
    "llama_16k"
  }


@pytest.mark.parametrize("path", ABLATION_FILES)
def test_ablation_file_builds_the_run_its_name_says(path):
  group = path.split("/")[2]
  name = os.path.basename(path)[: -len(".gin")]
  arch, coordinate = name.split("_")
  parse([path])
  config = gin.query_parameter("MODEL_CONFIG/macro.value").scoped_configurable_fn()
  seq_len = gin.query_parameter("SEQ_LEN/macro.value")
  batch = gin.query_parameter("GLOBAL_BATCH_SIZE/macro.value")
  assert (gin.query_parameter("trainer.train.run_name"), gin.query_parameter("trainer.train.ablation")) == (name, group)
  assert (config.arch, config.size, config.head_dim, config.num_heads) == (arch, "1b", 128, config.d_model // 128)
  if group == "aspect":
    assert f"{config.d_model}x{config.num_layers}" == coordinate and seq_len == 8192
  else:
    assert (config.d_model, config.num_layers, seq_len) == (1536, 32, CONTEXTS[coordinate])
  # The FFN rule: 8/3·d rounded up to a multiple of 256.
  assert config.ffn_dim == 256 * math.ceil(8 * config.d_model / 3 / 256)
  # The paper's ~4M tokens per step and 300B tokens at every context.
  assert seq_len * batch == 480 * 8192
  assert gin.query_parameter("TRAIN_STEPS/macro.value") == round(300e9 / (seq_len * batch))
  microbatch = macro("PER_SHARD_MICROBATCH_SIZE")
  assert batch % (microbatch * 8) == 0  # divides over 8 batch shards
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  stacked_layers = {leaf.shape[0] for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)) if leaf.ndim == 3}
  assert stacked_layers == {config.num_layers}  # scanned layers: one stacked leading axis of L
  gin.clear_config()


@pytest.mark.parametrize("arch", ["llama", "tnl", "hgrn2", "cosformer2"])
def test_hardware_settings_equal_the_main_1b_run(arch):
  settings = {}
  for path in (f"gin/{arch}_1b.gin", f"gin/ablations/aspect/{arch}_1536x32.gin"):
    parse([path])
    settings[path] = (gin.query_parameter("configs.ModelConfig.remat_policy"), macro("PER_SHARD_MICROBATCH_SIZE"))
  gin.clear_config()
  assert len(set(settings.values())) == 1, settings


def test_ablation_file_names_state_their_shape():
  for path in ABLATION_FILES:
    assert re.fullmatch(r"gin/ablations/(aspect/\w+_\d+x\d+|context/\w+_\d+k)\.gin", path), path
