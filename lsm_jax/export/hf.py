"""Hugging Face export of milestones and import of Hugging Face LLaMA checkpoints (docs/export.md).

Export (`export_hf`) writes a directory that `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads:
  LLaMA                  stock `LlamaForCausalLM` (model_type "llama", transformers' tensor names, no remote code)
  TNL, HGRN2, cosFormer2 `LsmForCausalLM` from modeling_lsm.py + configuration_lsm.py, copied into the directory and
                         named in config.json's `auto_map` (load with trust_remote_code=True)
  hybrid stacks          the same `LsmForCausalLM`, config.json's `layer_mixers` naming each layer's token mixer
                         (the expanded layer pattern); a pattern of one mixer of the architecture's family (linear
                         or softmax) exports as that pure model
plus model.safetensors (safetensors' own writer; bfloat16 through ml_dtypes), tokenizer.json and
tokenizer_config.json (hf_tokenizer), generation_config.json, a model card README.md, and lsm_jax_export.json (the
milestone's step, tokens, compute, ModelConfig and the JAX source of every tensor). When torch and transformers are
importable the export is then loaded back with transformers on CPU and refused (ExportVerificationError) if any
weight is missing or unexpected or its logits differ from the JAX model's.

Import (`import_llama`) reads a transformers LLaMA checkpoint (config.json + *.safetensors, transformers' names)
into lsm_jax's LLaMA parameters and writes them as milestone 0 of a run directory (run_metadata.json with the
ModelConfig and tokenizer), which `python -m lsm_jax.evaluate --run_dir=...` evaluates like a trained run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil

import numpy as np

from lsm_jax import checkpoint, layer_pattern
from lsm_jax.export import hf_tokenizer
from lsm_jax.export import tensors as tensor_names

EXPORT_DTYPES = ("float32", "bfloat16")
FORMATS = ("hf", "fla")
_LINEAR_ARCHS = ("tnl", "hgrn2", "cosformer2")
_REMOTE_CODE_FILES = ("configuration_lsm.py", "modeling_lsm.py")
# lsm_jax's torch names (tensors.py) -> transformers' LlamaForCausalLM names.
_LLAMA_RENAMES = (
  (r"^embed_tokens\.weight$", "model.embed_tokens.weight"),
  (r"^norm\.weight$", "model.norm.weight"),
  (r"^layers\.(\d+)\.token_mixer_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
  (r"^layers\.(\d+)\.channel_mixer_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
  (r"^layers\.(\d+)\.token_mixer\.([qkvo])_proj\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
  (r"^layers\.(\d+)\.channel_mixer\.(gate|up|down)_proj\.weight$", r"model.layers.\1.mlp.\2_proj.weight"),
)
_FLA_MISMATCH = (
  "--format=fla cannot represent lsm_jax's HGRN2 exactly, so it is refused: (1) our channel mixer is SGLU, "
  "down(gate(x) * up(x)) with no activation, while fla's HGRN2ForCausalLM uses GatedMLP with swish (or powlu); "
  "(2) our lower bounds are the exclusive cumsum over layers of softmax(lower_bound_logits), fla's are the "
  "cumsum minus its first row, different bounds for the same logits. Use --format=hf (loads with "
  "trust_remote_code=True, fla's chunk_gla kernel is used on CUDA when fla is installed)."
)


class ExportVerificationError(ValueError):
  """The written export does not load with transformers as the same model (missing weights or other logits)."""


def llama_tensor_name(name: str) -> str:
  """transformers' LlamaForCausalLM name of one of lsm_jax's torch tensor names."""
  for pattern, replacement in _LLAMA_RENAMES:
    if re.match(pattern, name):
      return re.sub(pattern, replacement, name)
  raise ValueError(f"LLaMA parameter {name} has no LlamaForCausalLM counterpart")


def _read_run_metadata(run_dir: str) -> dict:
  try:
    return checkpoint.read_run_metadata(run_dir)
  except FileNotFoundError:
    return {}


def _validation_loss(run_dir: str, step: int) -> float | None:
  """The last val_loss logged at or before `step` in run_dir/metrics.jsonl, if any."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  loss = None
  with open(path, encoding="utf-8") as handle:
    for line in handle:
      record = json.loads(line) if line.strip() else {}
      if isinstance(record.get("val_loss"), (int, float)) and record.get("step", 0) <= step:
        loss = float(record["val_loss"])
  return loss


def export_layout(model_config: dict) -> tuple[str, list[str] | None]:
  """(config.json's arch, its layer_mixers) of a ModelConfig dict: a model whose every layer has the mixer of its
  norms' family exports as that pure architecture (layer_mixers None; LLaMA as LlamaForCausalLM), any other stack
  as LsmForCausalLM with the architecture of its norms and channel mixer and one token mixer per layer."""
  arch = model_config.get("arch")
  valid = ("llama", *_LINEAR_ARCHS, *layer_pattern.HYBRID_ARCHS)
  if arch not in valid:
    raise ValueError(f"cannot export a model of arch {arch!r}; exportable architectures: {', '.join(valid)}")
  pattern = model_config.get("layer_pattern") or layer_pattern.default_pattern(arch)
  mixers = list(layer_pattern.layer_mixers(pattern, model_config["num_layers"]))
  norms = layer_pattern.HYBRID_ARCHS.get(arch, arch)
  if len(set(mixers)) == 1 and (mixers[0] == "llama") == (norms == "llama"):
    return mixers[0], None  # the linear architectures share their norms and channel mixer
  return norms, mixers


def _model_config_json(model_config: dict, *, max_length: int, eos_id: int | None, dtype: str) -> dict:
  common = {
    "vocab_size": model_config["vocab_size"],
    "hidden_size": model_config["d_model"],
    "num_hidden_layers": model_config["num_layers"],
    "num_attention_heads": model_config["num_heads"],
    "head_dim": model_config["head_dim"],
    "intermediate_size": model_config["ffn_dim"],
    "rms_norm_eps": model_config["norm_eps"],
    "initializer_range": model_config["init_std"],
    "tie_word_embeddings": True,
    "use_cache": True,
    "eos_token_id": eos_id,
    "pad_token_id": eos_id,
    "bos_token_id": None,
    "torch_dtype": dtype,
    "dtype": dtype,
  }
  arch, mixers = export_layout(model_config)
  if (arch, mixers) == ("llama", None):
    rope_theta = float(model_config["rope_theta"])
    return {
      **common,
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "num_key_value_heads": model_config["num_heads"],
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "max_position_embeddings": max_length,
      "rope_theta": rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
      "rope_scaling": None,
    }
  hybrid = {} if mixers is None else {"layer_mixers": mixers, "rope_theta": float(model_config["rope_theta"])}
  return {
    **common,
    "model_type": "lsm_jax",
    "architectures": ["LsmForCausalLM"],
    "arch": arch,
    **hybrid,
    "auto_map": {"AutoConfig": "configuration_lsm.LsmConfig", "AutoModelForCausalLM": "modeling_lsm.LsmForCausalLM"},
  }


_ARCH_NAMES = {
  "llama": "LLaMA (softmax attention, RoPE, SwiGLU)",
  "tnl": "TNL (TransNormerLLM: Lightning Attention with fixed decay, SGLU)",
  "hgrn2": "HGRN2 (gated linear RNN with state expansion, SGLU)",
  "cosformer2": "cosFormer2 (linear attention with LRPE and TPE, no decay, SGLU)",
}


_MIXER_NAMES = {"llama": "softmax attention", "tnl": "TNL", "hgrn2": "HGRN2", "cosformer2": "cosFormer2"}


def _architecture_name(model_config: dict) -> str:
  arch, mixers = export_layout(model_config)
  if mixers is None:
    return _ARCH_NAMES[arch]
  counts = layer_pattern.mixer_counts(model_config["layer_pattern"], model_config["num_layers"])
  layers = " and ".join(f"{count} {_MIXER_NAMES[mixer]}" for mixer, count in counts.items())
  return (
    f"hybrid of {layers} layers (layer pattern {model_config['layer_pattern']}; norms and channel mixer of "
    f"{_ARCH_NAMES[arch].split(' (')[0]})"
  )


def _model_card(model_config: dict, provenance: dict) -> str:
  arch, name = model_config["arch"], _architecture_name(model_config)
  loading = (
    "AutoModelForCausalLM.from_pretrained(path)"
    if export_layout(model_config) == ("llama", None)
    else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
  )

  def show(value, unit=""):
    return "unknown" if value is None else f"{value:,}{unit}" if isinstance(value, int) else f"{value:.6g}{unit}"

  rows = [
    ("Architecture", name),
    ("Size", model_config["size"]),
    ("Parameters", show(provenance["num_params"])),
    (
      "Layers / width / heads / FFN",
      f"{model_config['num_layers']} / {model_config['d_model']} / "
      f"{model_config['num_heads']} x {model_config['head_dim']} / {model_config['ffn_dim']}",
    ),
    ("Vocabulary", f"{model_config['vocab_size']:,} ({provenance['tokenizer']})"),
    ("Training step", show(provenance["step"])),
    ("Tokens seen", show(provenance["tokens_seen"])),
    ("Compute C", show(provenance["compute_pflops_days"], " PFLOP/s-days")),
    ("Validation loss", show(provenance["validation_loss"])),
    ("Weights dtype", provenance["dtype"]),
    ("lsm_jax version", provenance["code_version"] or "unknown"),
  ]
  table = "\n".join(f"| {name} | {value} |" for name, value in rows)
  return (
    f"---\nlibrary_name: transformers\ntags: [lsm_jax, {arch}]\n---\n\n"
    f"# {arch}-{model_config['size']} (lsm_jax)\n\n"
    f'A {name} language model trained with lsm_jax, a JAX reproduction of "Scaling Laws for '
    f'Linear Complexity Language Models" (arXiv 2406.16690).\n\n| | |\n|---|---|\n{table}\n\n'
    f"Load with `transformers`: `{loading}`; the tokenizer with `AutoTokenizer.from_pretrained(path)`.\n"
    f"`lsm_jax_export.json` records the milestone and the JAX parameter behind every tensor.\n"
  )


def export_hf(
  checkpoint_dir: str,
  out_dir: str,
  *,
  step: int | None = None,
  dtype: str | None = None,
  export_format: str = "hf",
  verify: bool = True,
) -> dict:
  """Writes the Hugging Face directory of a milestone (module docstring); returns lsm_jax_export.json's content.

  checkpoint_dir: a run directory (milestone `step`, default the last) or one milestone directory. dtype: of the
  written weights (default: as the milestone was saved). verify: reload with transformers and compare logits
  (skipped, with a note in the result, when torch or transformers is not installed).
  """
  if export_format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {export_format!r}")
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
  run_dir, step = checkpoint.resolve_milestone(checkpoint_dir, step, path_name="--checkpoint", step_name="--step")
  params, metadata = checkpoint.load_milestone(run_dir, step, dtype=dtype)
  model_config = metadata.get("model_config")
  if not model_config:
    raise ValueError(f"milestone {step} in {run_dir} has no model_config in its metadata; it cannot be exported")
  arch = model_config["arch"]
  layout = export_layout(model_config)
  if export_format == "fla":
    if layout != ("hgrn2", None):
      raise ValueError(f"--format=fla exists only for HGRN2 (fla has no {arch}); use --format=hf")
    raise ValueError(_FLA_MISMATCH)
  run_metadata = _read_run_metadata(run_dir)
  saved_dtype = dtype or metadata.get("dtype", "float32")
  pattern = model_config.get("layer_pattern") or layer_pattern.default_pattern(arch)
  named = tensor_names.torch_state_dict(params, model_config["num_layers"], pattern)
  if layout == ("llama", None):
    named = {llama_tensor_name(name): value for name, value in named.items()}
  weights = {name: np.asarray(tensor) for name, (tensor, _) in named.items()}

  os.makedirs(out_dir, exist_ok=True)
  import safetensors.numpy

  safetensors.numpy.save_file(
    weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt", "arch": arch, "step": str(step)}
  )
  max_length = int(run_metadata.get("seq_len") or 2048)
  tokenizer_spec = run_metadata.get("tokenizer")
  special = (
    hf_tokenizer.write_tokenizer_files(tokenizer_spec, out_dir, model_max_length=max_length) if tokenizer_spec else None
  )
  eos_id = special["eos_token_id"] if special else None
  with open(os.path.join(out_dir, "config.json"), "w") as handle:
    json.dump(
      _model_config_json(model_config, max_length=max_length, eos_id=eos_id, dtype=saved_dtype),
      handle,
      indent=2,
      sort_keys=True,
    )
  if layout != ("llama", None):
    for name in _REMOTE_CODE_FILES:
      shutil.copyfile(os.path.join(os.path.dirname(__file__), name), os.path.join(out_dir, name))
  with open(os.path.join(out_dir, "generation_config.json"), "w") as handle:
    json.dump({"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}, handle, indent=2)
  provenance = {
    "format": export_format,
    "arch": arch,
    "step": step,
    "dtype": saved_dtype,
    "num_params": int(sum(np.size(tensor) for tensor in weights.values())),
    "tokens_seen": metadata.get("tokens_seen"),
    "compute_pflops_days": metadata.get("compute_pflops_days"),
    "validation_loss": _validation_loss(run_dir, step),
    "code_version": metadata.get("code_version"),
    "tokenizer": tokenizer_spec if special else f"{tokenizer_spec} (no tokenizer files written)",
    "model_config": model_config,
    "tensor_sources": {name: source for name, (_, source) in named.items()},
  }
  with open(os.path.join(out_dir, "README.md"), "w") as handle:
    handle.write(_model_card(model_config, provenance))
  if verify:
    provenance["verification"] = verify_export(out_dir, params, model_config)
  with open(os.path.join(out_dir, "lsm_jax_export.json"), "w") as handle:
    json.dump(provenance, handle, indent=2, sort_keys=True)
  return provenance


def jax_logits(params: dict, model_config: dict, tokens: np.ndarray) -> np.ndarray:
  """fp32 logits [B, T, V] of lsm_jax's model with `params` (computed in float32 whatever the saved dtype)."""
  import jax
  from flax import nnx

  from lsm_jax.models import ModelConfig, build_model

  config = ModelConfig(**{**model_config, "dtype": "float32", "param_dtype": "float32"})
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))), nnx.Param)
  nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params))
  model = nnx.merge(graphdef, abstract)
  return np.asarray(jax.jit(lambda model, tokens: model(tokens))(model, tokens))


def load_with_transformers(out_dir: str):
  """(model, loading info) of an export, in float32 on CPU, refusing missing, unexpected or mismatched weights."""
  import torch
  import transformers

  dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
    out_dir, trust_remote_code=True, output_loading_info=True, **{dtype_key: torch.float32}
  )
  problems = {key: sorted(value) for key, value in info.items() if key != "error_msgs" and value}
  if problems or info.get("error_msgs"):
    raise ExportVerificationError(
      f"{out_dir} does not load cleanly with transformers: {problems} {info.get('error_msgs') or ''}"
    )
  return model.eval(), info


def verify_export(out_dir: str, params: dict, model_config: dict, *, length: int = 80, atol: float = 1e-3) -> dict:
  """Loads the export with transformers and compares its logits with lsm_jax's on a fixed batch (2 x `length`
  tokens, crossing a chunk boundary of the parallel form); raises ExportVerificationError beyond
  atol · max(1, max |logit|)."""
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError as error:
    return {"verified": False, "reason": f"not verified: {error.name} is not installed"}
  model, _ = load_with_transformers(out_dir)
  tokens = np.random.default_rng(0).integers(0, model_config["vocab_size"], size=(2, length), dtype=np.int32)
  expected = jax_logits(params, model_config, tokens)
  with torch.no_grad():
    actual = model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
  difference = float(np.max(np.abs(actual - expected)))
  tolerance = atol * max(1.0, float(np.max(np.abs(expected))))
  if not difference <= tolerance:
    raise ExportVerificationError(
      f"transformers' logits of {out_dir} differ from lsm_jax's by {difference:.3g} (tolerance {tolerance:.3g})"
    )
  return {"verified": True, "max_abs_logit_difference": difference, "tokens": list(tokens.shape)}


# ------------------------------------------------------------------------------------------------------ import


def _read_hf_checkpoint(hf_dir: str) -> tuple[dict, dict]:
  """(config.json, {name: array}) of a transformers checkpoint directory in safetensors (one file or shards)."""
  import safetensors.numpy

  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
  with open(config_path) as handle:
    config = json.load(handle)
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise ValueError(
      f"{hf_dir} has no *.safetensors weights (PyTorch .bin checkpoints are not read: convert them "
      f"with save_pretrained(..., safe_serialization=True))"
    )
  weights = {}
  for path in files:
    weights.update(safetensors.numpy.load_file(path))
  return config, weights


def _llama_model_config(config: dict) -> dict:
  """lsm_jax ModelConfig fields of a transformers LlamaConfig dict; refuses what lsm_jax's LLaMA cannot compute."""

  def require(condition, message):
    if not condition:
      raise ValueError(f"cannot import this LLaMA checkpoint: {message}")

  require(config.get("model_type") == "llama", f"model_type is {config.get('model_type')!r}, only 'llama' imports")
  heads, d_model = config["num_attention_heads"], config["hidden_size"]
  head_dim = config.get("head_dim") or d_model // heads
  kv_heads = config.get("num_key_value_heads") or heads
  require(
    kv_heads == heads,
    f"num_key_value_heads={kv_heads} != num_attention_heads={heads} (grouped-query "
    f"attention); lsm_jax's LLaMA has one key/value head per query head",
  )
  require(
    heads * head_dim == d_model,
    f"num_attention_heads * head_dim = {heads} * {head_dim} != hidden_size {d_model}; lsm_jax needs them equal",
  )
  require(config.get("hidden_act", "silu") == "silu", f"hidden_act is {config.get('hidden_act')!r}; SwiGLU needs silu")
  require(
    not config.get("attention_bias") and not config.get("mlp_bias"),
    "biases (attention_bias/mlp_bias) are not supported",
  )
  rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
  require(
    rope.get("rope_type", rope.get("type", "default")) == "default",
    f"RoPE scaling {rope} is not supported (only the default RoPE)",
  )
  return {
    "arch": "llama",
    "size": "imported",
    "num_layers": config["num_hidden_layers"],
    "d_model": d_model,
    "num_heads": heads,
    "head_dim": head_dim,
    "ffn_dim": config["intermediate_size"],
    "vocab_size": config["vocab_size"],
    "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
    "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
  }


def llama_params_from_hf(config: dict, weights: dict) -> tuple[dict, dict]:
  """(lsm_jax ModelConfig fields, stacked LLaMA params pure dict) of a transformers LLaMA checkpoint's tensors."""
  fields = _llama_model_config(config)
  layers, d_model, heads, head_dim = fields["num_layers"], fields["d_model"], fields["num_heads"], fields["head_dim"]
  embedding = weights.get("model.embed_tokens.weight")
  if embedding is None:
    raise ValueError("cannot import this LLaMA checkpoint: model.embed_tokens.weight is missing")
  head = weights.get("lm_head.weight")
  if head is not None and not np.array_equal(head, embedding):
    raise ValueError(
      "cannot import this LLaMA checkpoint: lm_head.weight differs from model.embed_tokens.weight "
      "(untied output head); lsm_jax's models tie the head to the embedding"
    )
  if head is None and config.get("tie_word_embeddings") is False:
    raise ValueError("cannot import this LLaMA checkpoint: tie_word_embeddings is false but lm_head.weight is missing")
  used = {"model.embed_tokens.weight", "lm_head.weight"}

  def take(name, shape):
    if name not in weights:
      raise ValueError(f"cannot import this LLaMA checkpoint: {name} is missing")
    value = weights[name]
    if tuple(value.shape) != tuple(shape):
      raise ValueError(
        f"cannot import this LLaMA checkpoint: {name} has shape {tuple(value.shape)}, expected "
        f"{tuple(shape)} from config.json"
      )
    used.add(name)
    return value

  def stacked(name, shape, to_kernel=lambda weight: weight.T):
    return np.stack([to_kernel(take(f"model.layers.{layer}.{name}", shape)) for layer in range(layers)])

  width, ffn = heads * head_dim, fields["ffn_dim"]
  qkv = np.stack(
    [
      stacked(f"self_attn.{part}_proj.weight", (width, d_model)).reshape(layers, d_model, heads, head_dim)
      for part in "qkv"
    ],
    axis=2,
  )
  params = {
    "embedding": embedding,
    "final_norm": {"scale": take("model.norm.weight", (d_model,))},
    "layers": {
      "mixer": {"qkv": {"kernel": qkv}, "out": {"kernel": stacked("self_attn.o_proj.weight", (d_model, width))}},
      "mixer_norm": {"scale": stacked("input_layernorm.weight", (d_model,), lambda w: w)},
      "mlp_norm": {"scale": stacked("post_attention_layernorm.weight", (d_model,), lambda w: w)},
      "mlp": {
        "gate": {"kernel": stacked("mlp.gate_proj.weight", (ffn, d_model))},
        "up": {"kernel": stacked("mlp.up_proj.weight", (ffn, d_model))},
        "down": {"kernel": stacked("mlp.down_proj.weight", (d_model, ffn))},
      },
    },
  }
  unused = sorted(name for name in weights if name not in used and not name.endswith("rotary_emb.inv_freq"))
  if unused:
    raise ValueError(f"cannot import this LLaMA checkpoint: tensors without an lsm_jax parameter: {unused[:8]}")
  return fields, params


def import_llama(hf_dir: str, run_dir: str, *, dtype: str | None = None, tokenizer: str | None = None) -> str:
  """Writes a transformers LLaMA checkpoint as milestone 0 of the lsm_jax run directory `run_dir`; returns it.

  dtype: of the milestone and the ModelConfig's compute dtype (default: float32 for fp32 weights, else bfloat16).
  tokenizer: the run's tokenizer spec (default: hf_dir/tokenizer.json, copied into run_dir; required without one).
  """
  import ml_dtypes

  from lsm_jax.models import ModelConfig, build_model

  if os.path.isdir(os.path.join(run_dir, "checkpoints")):
    raise ValueError(f"{run_dir} already holds checkpoints; import into a new run directory")
  config, weights = _read_hf_checkpoint(hf_dir)
  fields, params = llama_params_from_hf(config, weights)
  float_dtypes = {value.dtype for value in weights.values()}
  if dtype is None:
    dtype = "float32" if float_dtypes == {np.dtype(np.float32)} else "bfloat16"
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
  params = _cast_tree(params, np.float32 if dtype == "float32" else ml_dtypes.bfloat16)
  model_config = ModelConfig(**fields, dtype=dtype, param_dtype="float32")
  _check_against_model(params, model_config, build_model)
  from lsm_jax.data import tokenizer as tokenizer_lib

  hf_tokenizer_file = os.path.join(hf_dir, "tokenizer.json")
  if tokenizer is None and not os.path.isfile(hf_tokenizer_file):
    raise ValueError(
      f"{hf_dir} has no tokenizer.json; name the run's tokenizer (tokenizer='cl100k', 'bytes' or a "
      f"tokenizer path; CLI --tokenizer)"
    )
  vocab = tokenizer_lib.get_tokenizer(tokenizer or hf_tokenizer_file).vocab_size
  if vocab > model_config.vocab_size:
    raise ValueError(f"the tokenizer has {vocab} ids but the model's vocab_size is {model_config.vocab_size}")
  os.makedirs(run_dir, exist_ok=True)
  if tokenizer is None:  # the run keeps its own copy
    tokenizer = os.path.join(os.path.abspath(run_dir), "tokenizer.json")
    shutil.copyfile(hf_tokenizer_file, tokenizer)
  saver = checkpoint.Checkpointer(
    run_dir,
    save_interval_steps=1,
    max_to_keep=1,
    milestone_steps=[0],
    milestone_dtype=dtype,
    async_save=False,
    run_metadata={
      "arch": "llama",
      "size": model_config.size,
      "model_config": dataclasses.asdict(model_config),
      "run_name": f"llama_imported_{os.path.basename(os.path.normpath(hf_dir))}",
      "tokenizer": tokenizer,
      "imported_from": os.path.abspath(hf_dir),
      "seq_len": config.get("max_position_embeddings"),
    },
  )
  try:
    saver.save(0, {"params": params})
  finally:
    saver.close()
  return run_dir


def _cast_tree(tree, dtype):
  if isinstance(tree, dict):
    return {key: _cast_tree(value, dtype) for key, value in tree.items()}
  return np.ascontiguousarray(np.asarray(tree).astype(np.float32).astype(dtype))


def _check_against_model(params: dict, model_config, build_model) -> None:
  """The imported tree has exactly the shapes lsm_jax's LLaMA of `model_config` expects."""
  import jax
  from flax import nnx

  abstract = nnx.state(nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
  expected = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  actual = {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  if expected != actual:
    raise ValueError(f"imported LLaMA parameters do not match lsm_jax's model: expected {expected}, got {actual}")
