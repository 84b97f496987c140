r"""Export a milestone checkpoint as safetensors weights plus a config.json that a PyTorch user can read.

  python -m lsm_jax.export --checkpoint=MODEL_DIR --out=DIR [--step=N] [--dtype=bfloat16|float32]

`--checkpoint` is a run directory (MODEL_DIR; the milestone `--step`, default the last one) or one milestone
directory MODEL_DIR/checkpoints/milestones/<step>. Writes DIR/model.safetensors and DIR/config.json.
`--dtype` defaults to the milestone's saved dtype. (numpy has no bfloat16: read bf16 files with torch or
`safetensors.safe_open(..., framework="pt")`; float32 files also load with `safetensors.numpy`.)

Tensor naming (JAX pure-dict path -> PyTorch name, layer l = 0..L-1). Weights of linear maps are in PyTorch
nn.Linear layout [out_features, in_features] (y = x @ weight.T); the JAX kernels are [in, *out] and are
flattened over their output axes, then transposed. Stacked layers (scan_layers=True, leading [L] axis) and
unstacked ones (`layers/<l>/...`) give the same names.

  embedding [V, d]                          embed_tokens.weight [V, d]      (the output head is tied to it)
  final_norm/scale [d]                      norm.weight                     (LLaMA only; the others use SRMSNorm)
  layers/mixer_norm/scale                   layers.l.token_mixer_norm.weight    (LLaMA only)
  layers/mlp_norm/scale                     layers.l.channel_mixer_norm.weight  (LLaMA only)
  layers/mixer/qkv/kernel [d, 3, h, hd]     layers.l.token_mixer.{q,k,v}_proj.weight [h*hd, d]
  layers/mixer/in_proj/kernel [d,3,h,hd]    layers.l.token_mixer.{v,q,f}_proj.weight (HGRN2, in that order;
                                            f gives the forget gate logits)
  layers/mixer/out(_proj)/kernel [h*hd, d]  layers.l.token_mixer.o_proj.weight [d, h*hd]
  layers/mixer/gate/{down,up}/kernel        layers.l.token_mixer.output_gate.{down,up}_proj.weight
                                            (TNL, cosFormer2: sigmoid(up(down(x))))
  layers/mlp/{gate,up,down}/kernel          layers.l.channel_mixer.{gate,up,down}_proj.weight
                                            (down(act(gate(x)) * up(x)); act = SiLU for LLaMA, identity (SGLU))
  lower_bound_logits [L, d]                 lower_bound_logits [L, d]       (HGRN2; lower bounds = exclusive
                                            cumsum of softmax over the layer axis)
  tpe/kernel [d, e]                         tpe.up_proj.weight [e, d]       (cosFormer2; the down projection is
                                            tied: y = x + h @ tpe.up_proj.weight)
Any other parameter keeps its path joined with "." (`kernel`/`scale` become `weight`, linear layout as above).
config.json holds the ModelConfig, Hugging Face-style aliases, the step/tokens/compute of the milestone, and
`tensor_sources`: for each tensor the JAX path and the slice of the fused kernel it came from.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

from lsm_jax import checkpoint

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
_COMPONENT_NAMES = {"mixer": "token_mixer", "mlp": "channel_mixer", "mixer_norm": "token_mixer_norm",
                    "mlp_norm": "channel_mixer_norm", "final_norm": "norm", "out": "o_proj", "out_proj": "o_proj",
                    "up": "up_proj", "down": "down_proj"}
_FUSED_PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "in_proj": ("v_proj", "q_proj", "f_proj")}


def _torch_component(parents: list[str], key: str) -> str:
  if key == "gate":  # the mixer's low-rank output gate vs the GLU's gate projection
    return "output_gate" if parents and parents[-1] == "token_mixer" else "gate_proj"
  return _COMPONENT_NAMES.get(key, key)


def _linear_weight(kernel: np.ndarray) -> np.ndarray:
  """JAX kernel [in, *out] -> PyTorch weight [prod(out), in]."""
  return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def _leaf_tensors(path: list, leaf: np.ndarray, source: str) -> list[tuple[str, np.ndarray, str]]:
  """(PyTorch name, tensor, JAX source) for one per-layer parameter; `path` has the layer index in it."""
  if path == ["embedding"]:
    return [("embed_tokens.weight", leaf, source)]
  names: list[str] = []
  for key in path[:-1]:
    names.append(str(key) if isinstance(key, int) else _torch_component(names, key))
  last = path[-1]
  if last == "kernel" and names and names[0] == "tpe":
    return [(".".join([*names, "up_proj", "weight"]), _linear_weight(leaf), source)]
  if last == "kernel" and path[-2] in _FUSED_PROJECTIONS and leaf.ndim >= 3:
    parts = _FUSED_PROJECTIONS[path[-2]]
    if leaf.shape[1] != len(parts):
      raise ValueError(f"{source} has shape {leaf.shape}; expected [in, {len(parts)}, heads, head_dim]")
    return [(".".join([*names[:-1], part, "weight"]), _linear_weight(leaf[:, index]), f"{source}[:, {index}]")
            for index, part in enumerate(parts)]
  if last == "kernel":
    return [(".".join([*names, "weight"]), _linear_weight(leaf), source)]
  if last == "scale":
    return [(".".join([*names, "weight"]), leaf, source)]
  return [(".".join([*names, _torch_component(names, last)]), leaf, source)]


def torch_state_dict(params: dict, num_layers: int) -> dict[str, tuple[np.ndarray, str]]:
  """PyTorch-named tensors {name: (array, JAX source)} from a params pure dict (stacked or unstacked layers).

  The source is the JAX path, with `[l]` for a slice of a stacked parameter and `[:, i]` for a fused part.
  """
  tensors: dict[str, tuple[np.ndarray, str]] = {}

  def add(path, leaf, source):
    for name, tensor, tensor_source in _leaf_tensors(path, leaf, source):
      if name in tensors:
        raise ValueError(f"two parameters map to the PyTorch name {name}: {tensors[name][1]} and {tensor_source}")
      tensors[name] = (tensor, tensor_source)

  def visit(node, path):
    if not isinstance(node, dict):
      add(path, np.asarray(node), "/".join(map(str, path)))
    elif path == ["layers"] and node and all(isinstance(key, str) for key in node):
      visit_stacked(node, path)  # scan_layers: every leaf has a leading [num_layers] axis
    else:
      for key, child in node.items():
        visit(child, [*path, key])

  def visit_stacked(node, path):
    if isinstance(node, dict):
      for key, child in node.items():
        visit_stacked(child, [*path, key])
      return
    if node.shape[0] != num_layers:
      raise ValueError(f"stacked parameter {'/'.join(path)} has leading dimension {node.shape[0]}, "
                       f"expected num_layers={num_layers}")
    stacked = np.asarray(node)
    for layer in range(num_layers):
      add([path[0], layer, *path[1:]], stacked[layer], f"{'/'.join(path)}[{layer}]")

  visit(params, [])
  return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """Writes the safetensors format (8-byte little-endian header size, JSON header, raw little-endian data).

  Written directly, not through the safetensors package, because its numpy API has no bfloat16.
  """
  header: dict = {"__metadata__": metadata}
  offset = 0
  for name, tensor in tensors.items():
    if tensor.dtype.name not in SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {name} has dtype {tensor.dtype}; exportable dtypes: {list(SAFETENSORS_DTYPES)}")
    header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype.name], "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + tensor.nbytes]}
    offset += tensor.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the format recommends an 8-byte aligned data start
  if sys.byteorder != "little":
    raise OSError("write_safetensors writes native bytes and needs a little-endian machine")
  with open(path, "wb") as handle:
    handle.write(struct.pack("<Q", len(encoded)))
    handle.write(encoded)
    for tensor in tensors.values():
      handle.write(np.ascontiguousarray(tensor).tobytes())


def _resolve(checkpoint_dir: str, step: int | None) -> tuple[str, int]:
  """(run directory, milestone step) from a run directory or a milestone step directory."""
  checkpoint_dir = os.path.abspath(checkpoint_dir)
  parent = os.path.dirname(checkpoint_dir)
  if os.path.basename(checkpoint_dir).isdigit() and os.path.basename(parent) == "milestones":
    named_step = int(os.path.basename(checkpoint_dir))
    if step is not None and step != named_step:
      raise ValueError(f"--step={step} contradicts the milestone directory {checkpoint_dir}")
    return os.path.dirname(os.path.dirname(parent)), named_step
  if not os.path.isdir(os.path.join(checkpoint_dir, "checkpoints", "milestones")):
    raise ValueError(f"--checkpoint={checkpoint_dir} must be a run directory (with checkpoints/milestones/) or "
                     f"a milestone directory MODEL_DIR/checkpoints/milestones/<step>")
  steps = checkpoint.list_milestones(checkpoint_dir)
  if not steps:
    raise ValueError(f"{checkpoint_dir} has no complete milestone checkpoint")
  return checkpoint_dir, steps[-1] if step is None else step


def export(checkpoint_dir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None) -> dict:
  """Writes out_dir/model.safetensors and out_dir/config.json; returns the config dict."""
  if dtype is not None and dtype not in SAFETENSORS_DTYPES:
    raise ValueError(f"dtype must be one of {list(SAFETENSORS_DTYPES)}, got {dtype!r}")
  run_dir, step = _resolve(checkpoint_dir, step)
  params, metadata = checkpoint.load_milestone(run_dir, step, dtype=dtype)
  model_config = metadata.get("model_config")
  if not model_config:
    raise ValueError(f"milestone {step} in {run_dir} has no model_config in its metadata; it cannot be exported")
  named = torch_state_dict(params, model_config["num_layers"])
  tensors = {name: tensor for name, (tensor, _) in named.items()}
  saved_dtype = dtype or metadata.get("dtype", "float32")
  config = {
      "model_type": f"lsm_jax_{model_config['arch']}",
      **model_config,
      "hidden_size": model_config["d_model"], "num_hidden_layers": model_config["num_layers"],
      "num_attention_heads": model_config["num_heads"], "intermediate_size": model_config["ffn_dim"],
      "rms_norm_eps": model_config.get("norm_eps"), "tie_word_embeddings": True, "torch_dtype": saved_dtype,
      "linear_weight_layout": "[out_features, in_features] (torch.nn.Linear)",
      "step": step, "tokens_seen": metadata.get("tokens_seen"),
      "compute_pflops_days": metadata.get("compute_pflops_days"), "code_version": metadata.get("code_version"),
      "tensor_sources": {name: source for name, (_, source) in named.items()},
  }
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors,
                    {"format": "pt", "arch": model_config["arch"], "step": str(step)})
  with open(os.path.join(out_dir, "config.json"), "w") as handle:
    json.dump(config, handle, indent=2, sort_keys=True)
  return config


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m lsm_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="run directory or milestone directory")
  parser.add_argument("--out", required=True, help="output directory for model.safetensors and config.json")
  parser.add_argument("--step", type=int, default=None, help="milestone step (default: the last milestone)")
  parser.add_argument("--dtype", choices=list(SAFETENSORS_DTYPES), default=None, help="default: as saved")
  args = parser.parse_args(argv)
  config = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
  print(f"exported step {config['step']} ({len(config['tensor_sources'])} tensors, {config['torch_dtype']}) "
        f"to {args.out}")


if __name__ == "__main__":
  main()
