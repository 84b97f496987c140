"""Model configurations: the four architectures at the paper's six sizes (reconciled shapes).

The shapes are stored once, in the gin model files gin/models/<arch>/<size>.gin (each includes its architecture's
base.gin), and `get_config` reads them. They reconcile arXiv 2406.16690 Table 2 with Table 7 and reproduce every
row of Table 7 (non-embedding parameters and PFLOPs/step): head dim 128 everywhere, so heads = d/128; the 1B FFN
width is 4096 (Table 7 prints 5632, which contradicts its own parameter column); TNL and cosFormer2 use 25 layers
at 410M to pay for their output-gate parameters. The hybrid families (`HYBRID_ARCHS`, docs/hybrids.md) have the
shapes of their linear architecture and a `layer_pattern` that puts a softmax layer among the linear ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import gin
import jax
import jax.numpy as jnp
from gin import config_parser

from lsm_jax import layer_pattern as layer_pattern_lib
from lsm_jax import train as train_cli
from pallas_kernels import glu, rms_norm
from pallas_kernels.linear_attention import api as linear_attention_api

# The four architectures of the paper; the hybrid families (linear layers interleaved with softmax ones,
# lsm_jax/layer_pattern.py) have their linear architecture's norms and channel mixer.
ARCHS = ("llama", "tnl", "hgrn2", "cosformer2")
HYBRID_ARCHS = tuple(layer_pattern_lib.HYBRID_ARCHS)
ALL_ARCHS = ARCHS + HYBRID_ARCHS
SIZES = ("70m", "160m", "410m", "1b", "3b", "7b")
DTYPES = ("float32", "bfloat16", "float16")
LINEAR_ATTENTION_BACKENDS = linear_attention_api.BACKENDS
# The gain-free RMS norms of the linear architectures (pre-norms with their residual adds, the mixers' output
# norms): "pallas_gpu" runs them as fused Pallas GPU kernels, "auto" resolves by rms_norm.resolve_backend (the
# kernels on a GPU, XLA elsewhere). LLaMA's norms (with a gain) are always XLA's.
NORM_BACKENDS = rms_norm.BACKENDS
# The fused GLU's product gradient (fused_mlp): "pallas_gpu" forms it in one Pallas GPU kernel, "auto" resolves by
# glu.resolve_backend (the kernel on a GPU, XLA's autodiff elsewhere).
GLU_BACKENDS = glu.BACKENDS
# "none": keep every activation; "full": recompute the whole layer in the backward pass; the dots policies are
# jax.checkpoint_policies of the same name (save matmul outputs, recompute the cheap elementwise work), the
# mixer-kernel ones also keep the token mixers' fused-kernel outputs: HGRN2's GPU per-chunk states recomputed
# (dots_and_mixer_kernels_saveable) or kept (dots_and_all_mixer_kernels_saveable, more memory, less time).
REMAT_POLICIES = (
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "dots_and_mixer_kernels_saveable",
  "dots_and_all_mixer_kernels_saveable",
)
# "auto": splash attention on TPU, "pallas_gpu" on GPU for 16-bit compute (the Pallas GPU flash-attention kernels:
# documents by segment ids, no [T, T] mask; cuDNN for batches of one document per row), XLA elsewhere (jax 0.10's
# implementation=None always picks XLA, so the choice is made here: ModelConfig.resolved_for).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything needed to build a LanguageModel. JSON-able: `ModelConfig(**dataclasses.asdict(c))`."""

  arch: str
  size: str
  num_layers: int
  d_model: int
  num_heads: int
  ffn_dim: int
  head_dim: int = 128
  vocab_size: int = 100280
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  linear_attention_backend: str = "auto"
  chunk_size: int | None = None  # None: the backend's default
  # GpuKernelConfig knobs replacing the tuned defaults of the "pallas_gpu" linear-attention kernels, e.g. in gin
  # `configs.ModelConfig.linear_attention_gpu_overrides = {'fused_forward_states': True}` (docs/tuning.md). Kept as
  # sorted (knob, value) pairs; the other backends have no such knobs.
  linear_attention_gpu_overrides: tuple[tuple[str, bool | int], ...] = ()
  scan_layers: bool = True  # stack layers and lax.scan them (one layer compiled, not L)
  # Stacked layers applied one after another instead of by lax.scan: every layer compiled (longer compile), no
  # per-layer copies of stacked residuals and weights (faster on GPUs; docs/performance.md). Parameters,
  # checkpoints and optimizer state keep the stacked layout.
  unroll_layers: bool = False
  # The GLU's up and gate projections as one matmul of their weights stacked at use (layers.GatedMLP; parameters
  # and checkpoints unchanged).
  fused_mlp: bool = False
  glu_backend: str = "auto"  # GLU_BACKENDS
  norm_backend: str = "auto"  # NORM_BACKENDS
  remat_policy: str = "none"  # REMAT_POLICIES; where "none" does not fit, dots_and_mixer_kernels_saveable
  # is the fastest on the H200 (docs/performance.md)
  attention_impl: str = "auto"  # softmax layers only
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  init_std: float = 0.02  # normal(0, 0.02) for every linear and the embedding (OpenNLPLab)
  # Token mixer of each layer (grammar: lsm_jax/layer_pattern.py, e.g. "hgrn2*7,llama"); "" means the
  # architecture's own mixer in every layer. Hybrid families must set one.
  layer_pattern: str = ""

  def __post_init__(self):
    _check_choice("arch", self.arch, ALL_ARCHS)
    for name in ("num_layers", "d_model", "num_heads", "ffn_dim", "head_dim", "vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int; got {value!r}.")
    if self.num_heads * self.head_dim != self.d_model:
      raise ValueError(
        f"ModelConfig needs num_heads * head_dim == d_model; got {self.num_heads} * {self.head_dim} != {self.d_model}."
      )
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even (RoPE/LRPE rotate channel pairs); got {self.head_dim}.")
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("linear_attention_backend", self.linear_attention_backend, LINEAR_ATTENTION_BACKENDS)
    _check_choice("norm_backend", self.norm_backend, NORM_BACKENDS)
    _check_choice("glu_backend", self.glu_backend, GLU_BACKENDS)
    _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size <= 0):
      raise ValueError(f"ModelConfig.chunk_size must be None or a positive int; got {self.chunk_size!r}.")
    try:
      overrides = linear_attention_api.checked_gpu_overrides(self.linear_attention_gpu_overrides)
    except (TypeError, ValueError) as error:
      raise type(error)(f"ModelConfig.linear_attention_gpu_overrides: {error}") from None
    object.__setattr__(self, "linear_attention_gpu_overrides", overrides)  # a mapping or JSON's lists, normalized
    for name in ("scan_layers", "unroll_layers", "fused_mlp"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name} must be a bool; got {getattr(self, name)!r}.")
    if not isinstance(self.layer_pattern, str):
      raise ValueError(
        f"ModelConfig.layer_pattern must be a string such as 'hgrn2*7,llama'; got {self.layer_pattern!r}."
      )
    layer_pattern_lib.parse(self.pattern)  # a bad pattern fails here, naming the valid mixers

  @property
  def pattern(self) -> str:
    """The layer pattern in effect: `layer_pattern`, or the architecture's own mixer in every layer."""
    return self.layer_pattern or layer_pattern_lib.default_pattern(self.arch)

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The token mixer of every layer (canonical names: llama, tnl, hgrn2, cosformer2)."""
    return layer_pattern_lib.layer_mixers(self.pattern, self.num_layers)

  def resolved_for(self, platform: str | None = None) -> ModelConfig:
    """This config with its "auto" kernel choices fixed for `platform` ("tpu", "gpu", "cpu"; None: the default
    device's). Explicit choices stay as they are.

    The mixers resolve at trace time with the default device's platform. The trainer resolves from the mesh's
    devices instead, so a program compiled ahead of time for a TPU topology from a CPU host gets the TPU kernels.
    """
    platform = platform or jax.default_backend()
    attention_impl = self.attention_impl
    if attention_impl == "auto":
      if platform == "tpu":
        attention_impl = "splash"
      elif platform == "gpu" and jnp.dtype(self.dtype) in (jnp.bfloat16, jnp.float16):
        # Documents by segment ids: 1.3-12x cuDNN with the dense mask (benchmarks/results/attention_h200.md)
        attention_impl = "pallas_gpu"
      else:
        attention_impl = "xla"
    return dataclasses.replace(
      self,
      attention_impl=attention_impl,
      linear_attention_backend=linear_attention_api.resolve_backend(self.linear_attention_backend, platform),
      norm_backend=rms_norm.resolve_backend(self.norm_backend, platform),
      glu_backend=glu.resolve_backend(self.glu_backend, platform),
    )

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls(**json.loads(text))


def _check_choice(name, value, valid):
  if value not in valid:
    raise ValueError(f"Unknown {name} {value!r}; valid: {', '.join(map(str, valid))}.")


def model_file(arch: str, size: str) -> str:
  """The gin model file of (arch, size): gin/models/<arch>/<size>.gin under the config root."""
  _check_choice("arch", arch, ALL_ARCHS)
  _check_choice("size", size, SIZES)
  return os.path.join(train_cli.CONFIG_ROOT, "gin", "models", arch, f"{size}.gin")


@functools.lru_cache(maxsize=None)
def _model_file_bindings(path: str) -> tuple[tuple[str, Any], ...]:
  """The `configs.ModelConfig` bindings of a gin file and the files it includes, in gin's order (an include's
  bindings first, later bindings win). Read with gin's own parser, so the global gin config stays untouched."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"gin model file {path} does not exist.")
  with open(path) as f:
    statements = list(config_parser.ConfigParser(f, gin.config.ParserDelegate(skip_unknown=True)))
  bindings = []
  for statement in statements:
    if isinstance(statement, config_parser.IncludeStatement):
      bindings.extend(_model_file_bindings(os.path.join(train_cli.CONFIG_ROOT, statement.filename)))
    elif (
      isinstance(statement, config_parser.BindingStatement)
      and not statement.scope
      and statement.selector.split(".")[-1] == ModelConfig.__name__
    ):
      bindings.append((statement.arg_name, statement.value))
  return tuple(bindings)


def get_config(arch: str, size: str, **overrides) -> ModelConfig:
  """The configuration of (arch, size) that its gin model file gin/models/<arch>/<size>.gin binds (the shapes of
  the paper are stored there alone), with any ModelConfig field overridden."""
  path = model_file(arch, size)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown ModelConfig field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}.")
  values = dict(_model_file_bindings(path))
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(
      f"{path} binds unknown ModelConfig field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}."
    )
  if (values.get("arch"), values.get("size")) != (arch, size):
    raise ValueError(
      f"{path} binds arch {values.get('arch')!r} and size {values.get('size')!r}, not the "
      f"{arch!r} and {size!r} its path names."
    )
  values.update(overrides)
  return ModelConfig(**values)
