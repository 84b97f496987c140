"""ModelConfig, get_config and the 24 gin model files."""

import dataclasses
import glob
import os

import gin
import pytest

from lsm_jax.models import configs
from pallas_kernels import glu
from pallas_kernels.rms_norm import api as rms_norm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# arXiv 2406.16690 Tables 2 and 7, reconciled: size -> (layers, d, heads, GLU width).
RECONCILED = {
  "70m": (6, 512, 4, 1536),
  "160m": (12, 768, 6, 2048),
  "410m": (26, 1024, 8, 2816),
  "1b": (32, 1536, 12, 4096),
  "3b": (35, 2560, 20, 6912),
  "7b": (32, 4096, 32, 11008),
}


@pytest.mark.parametrize("arch", configs.ALL_ARCHS)
@pytest.mark.parametrize("size", configs.SIZES)
def test_reconciled_shapes(arch, size):
  config = configs.get_config(arch, size)
  layers, d_model, heads, ffn = RECONCILED[size]
  if size == "410m" and arch in ("tnl", "cosformer2", "tnl_hybrid"):
    layers = 25
  assert (config.num_layers, config.d_model, config.num_heads, config.ffn_dim) == (layers, d_model, heads, ffn)
  assert (config.head_dim, config.vocab_size, config.dtype, config.param_dtype) == (128, 100280, "bfloat16", "float32")


def test_json_round_trip_and_overrides():
  config = configs.get_config("hgrn2", "1b", scan_layers=False, remat_policy="full", chunk_size=32)
  assert configs.ModelConfig.from_json(config.to_json()) == config
  assert configs.ModelConfig(**dataclasses.asdict(config)) == config
  assert (config.scan_layers, config.remat_policy, config.chunk_size) == (False, "full", 32)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.num_layers = 3


def test_gpu_kernel_overrides_from_a_gin_mapping_survive_json_and_stay_hashable():
  # An experiment binds a dict; the config keeps sorted (knob, value) pairs, so it stays hashable and JSON gives
  # it back.
  from lsm_jax import train as train_cli
  from lsm_jax import trainer

  binding = "configs.ModelConfig.linear_attention_gpu_overrides = {'packed_operands': True, 'num_warps': 8}"
  with gin.unlock_config():
    gin.clear_config()
    try:
      train_cli.parse_gin(["gin/tnl_70m.gin"], ["MODEL_DIR = '/tmp/unused'", "DATA_DIR = 'unused'", binding])
      config = gin.get_bindings(trainer.train)["model_config"]
    finally:
      gin.clear_config()
  assert config.linear_attention_gpu_overrides == (("num_warps", 8), ("packed_operands", True))
  assert config.arch == "tnl" and config.size == "70m"
  restored = configs.ModelConfig.from_json(config.to_json())
  assert restored == config and hash(restored) == hash(config)
  assert configs.get_config("tnl", "70m").linear_attention_gpu_overrides == ()


@pytest.mark.parametrize(
  "platform, dtype, backend, attention, norm, glu_backend",
  [
    ("tpu", "bfloat16", "pallas_tpu", "splash", "xla", "xla"),
    ("gpu", "bfloat16", "pallas_gpu", "pallas_gpu", rms_norm.GPU_DEFAULT, glu.api.GPU_DEFAULT),
    ("gpu", "float32", "pallas_gpu", "xla", rms_norm.GPU_DEFAULT, glu.api.GPU_DEFAULT),
    ("cpu", "bfloat16", "xla", "xla", "xla", "xla"),
  ],
)
def test_resolved_for_fixes_the_auto_kernel_choices_of_the_platform(
  platform, dtype, backend, attention, norm, glu_backend
):
  config = configs.get_config("tnl", "70m", dtype=dtype)
  resolved = config.resolved_for(platform)
  assert (
    resolved.linear_attention_backend,
    resolved.attention_impl,
    resolved.norm_backend,
    resolved.glu_backend,
  ) == (backend, attention, norm, glu_backend)
  auto = dict(linear_attention_backend="auto", attention_impl="auto", norm_backend="auto", glu_backend="auto")
  assert dataclasses.replace(resolved, **auto) == config
  # Explicit choices stay, whatever the platform.
  assert resolved.resolved_for("cpu") == resolved


@pytest.mark.parametrize(
  "call,message",
  [
    (lambda: configs.get_config("mamba", "1b"), "Unknown arch 'mamba'; valid: llama, tnl, hgrn2, cosformer2"),
    (lambda: configs.get_config("tnl", "13b"), "Unknown size '13b'; valid: 70m, 160m, 410m, 1b, 3b, 7b"),
    (lambda: configs.get_config("tnl", "1b", n_layers=3), "Unknown ModelConfig field.* n_layers; valid: .*num_layers"),
    (lambda: configs.get_config("tnl", "1b", dtype="int8"), "Unknown dtype 'int8'; valid: float32, bfloat16"),
    (lambda: configs.get_config("tnl", "1b", remat_policy="some"), "Unknown remat_policy 'some'; valid: none, full"),
    (
      lambda: configs.get_config("tnl", "1b", linear_attention_backend="cuda"),
      "Unknown linear_attention_backend 'cuda'; valid: auto, reference, xla",
    ),
    (lambda: configs.get_config("llama", "1b", attention_impl="flash"), "Unknown attention_impl 'flash'"),
    (lambda: configs.get_config("tnl", "1b", norm_backend="triton"), "Unknown norm_backend 'triton'; valid: auto"),
    (lambda: configs.get_config("tnl", "1b", d_model=1000), r"num_heads \* head_dim == d_model"),
    (lambda: configs.get_config("tnl", "1b", num_layers=0), "num_layers must be a positive int"),
    (lambda: configs.get_config("tnl", "1b", chunk_size=-4), "chunk_size must be None or a positive int"),
    (lambda: configs.get_config("tnl", "1b", unroll_layers="yes"), "unroll_layers must be a bool; got 'yes'"),
    (
      lambda: configs.get_config("tnl", "1b", linear_attention_gpu_overrides={"num_warp": 8}),
      "ModelConfig.linear_attention_gpu_overrides: unknown GpuKernelConfig knob 'num_warp'; valid: .*num_warps",
    ),
    (
      lambda: configs.get_config("tnl", "1b", linear_attention_gpu_overrides={"chunk_size": 48}),
      "ModelConfig.linear_attention_gpu_overrides: GpuKernelConfig.chunk_size=48; valid: a power of two >= 16",
    ),
  ],
)
def test_bad_configs_raise_clear_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"fused_forward_states": 1}, "GpuKernelConfig.fused_forward_states=1; valid: True or False"),
    ("packed_operands", "GpuKernelConfig overrides 'packed_operands'; valid: a mapping of knob to value"),
  ],
)
def test_gpu_kernel_overrides_of_the_wrong_type_are_refused(overrides, message):
  with pytest.raises(TypeError, match=f"ModelConfig.linear_attention_gpu_overrides: {message}"):
    configs.get_config("tnl", "1b", linear_attention_gpu_overrides=overrides)


def _write_model_file(root, arch, size, bindings):
  path = root / "gin" / "models" / arch / f"{size}.gin"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
    "from __gin__ import dynamic_registration\nfrom lsm_jax.models import configs\n\n"
    "configs.ModelConfig:\n" + "".join(f"  {name} = {value!r}\n" for name, value in bindings.items())
  )


@pytest.mark.parametrize(
  "bindings, message",
  [
    (dict(arch="tnl", size="160m"), "binds arch 'tnl' and size '160m', not the 'tnl' and '70m' its path names"),
    (dict(arch="tnl", size="70m", n_layers=3), "binds unknown ModelConfig field.* n_layers; valid: .*num_layers"),
  ],
)
def test_get_config_reads_the_model_file_and_refuses_a_wrong_one(tmp_path, monkeypatch, bindings, message):
  monkeypatch.setattr(configs.train_cli, "CONFIG_ROOT", str(tmp_path))
  _write_model_file(
    tmp_path, "tnl", "70m", dict(arch="tnl", size="70m", num_layers=3, d_model=256, num_heads=2, ffn_dim=640)
  )
  assert configs.get_config("tnl", "70m") == configs.ModelConfig("tnl", "70m", 3, 256, 2, 640)
  _write_model_file(tmp_path, "tnl", "70m", bindings)
  configs._model_file_bindings.cache_clear()
  with pytest.raises(ValueError, match=message):
    configs.get_config("tnl", "70m")
  monkeypatch.setattr(configs.train_cli, "CONFIG_ROOT", str(tmp_path / "elsewhere"))
  with pytest.raises(FileNotFoundError, match="gin model file .*elsewhere/gin/models/tnl/70m.gin does not exist"):
    configs.get_config("tnl", "70m")


def _parse(path):
  gin.clear_config()
  gin.add_config_file_search_path(REPO_ROOT)
  gin.parse_config_files_and_bindings([path], [], skip_unknown=False)
  model_config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  paper_config = gin.get_configurable("lsm_jax.models.configs.get_config")()
  gin.clear_config()
  return model_config, paper_config


def test_every_model_gin_file_parses_to_get_config():
  files = sorted(glob.glob(os.path.join(REPO_ROOT, "gin", "models", "*", "*.gin")))
  expected = {f"{arch}/{size}" for arch in configs.ALL_ARCHS for size in configs.SIZES}
  sized = {os.path.relpath(f, os.path.join(REPO_ROOT, "gin", "models"))[:-4] for f in files}
  assert sized == expected | {f"{arch}/base" for arch in configs.ALL_ARCHS}
  for arch in configs.ALL_ARCHS:
    for size in configs.SIZES:
      model_config, paper_config = _parse(os.path.join(REPO_ROOT, "gin", "models", arch, f"{size}.gin"))
      assert model_config == configs.get_config(arch, size), (arch, size)
      assert paper_config == configs.get_config(arch, size), (arch, size)
