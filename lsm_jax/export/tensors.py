r"""lsm_jax parameter names -> PyTorch tensor names (the layout of the exported linear models).

Tensor naming (JAX pure-dict path -> PyTorch name, layer l = 0..L-1). Weights of linear maps are in PyTorch
nn.Linear layout [out_features, in_features] (y = x @ weight.T); the JAX kernels are [in, *out] and are
flattened over their output axes, then transposed. Stacked layers (scan_layers=True, leading [L] axis) and
unstacked ones (`layers/<l>/...`) give the same names. A scanned hybrid stack holds one stack per run of its layer
pattern (`layers/<k>/...`, leading axis over the run's layers in `layer_pattern.LayerRun.flat_layers` order);
each layer is named by its model index and mapped by its own mixer's parameters. `lsm_jax.export.hf` writes TNL,
HGRN2, cosFormer2 and hybrids under these names (the module names of modeling_lsm.py) and renames a pure LLaMA's
to transformers' LlamaForCausalLM.

  embedding [V, d]                          embed_tokens.weight [V, d]      (the output head is tied to it)
  final_norm/scale [d]                      norm.weight                     (LLaMA's norms only; the others use
                                                                            SRMSNorm)
  layers/mixer_norm/scale                   layers.l.token_mixer_norm.weight    (LLaMA's norms only)
  layers/mlp_norm/scale                     layers.l.channel_mixer_norm.weight  (LLaMA's norms only)
  layers/mixer/qkv/kernel [d, 3, h, hd]     layers.l.token_mixer.{q,k,v}_proj.weight [h*hd, d]
  layers/mixer/in_proj/kernel [d,3,h,hd]    layers.l.token_mixer.{v,q,f}_proj.weight (HGRN2, in that order;
                                            f gives the forget gate logits)
  layers/mixer/out(_proj)/kernel [h*hd, d]  layers.l.token_mixer.o_proj.weight [d, h*hd]
  layers/mixer/gate/{down,up}/kernel        layers.l.token_mixer.output_gate.{down,up}_proj.weight
                                            (TNL, cosFormer2: sigmoid(up(down(x))))
  layers/mlp/{gate,up,down}/kernel          layers.l.channel_mixer.{gate,up,down}_proj.weight
                                            (down(act(gate(x)) * up(x)); act = SiLU for LLaMA, identity (SGLU))
  lower_bound_logits [L, d]                 lower_bound_logits [L, d]       (HGRN2; lower bounds = exclusive
                                            cumsum of softmax over the layer axis; L counts HGRN2 layers)
  tpe/kernel [d, e]                         tpe.up_proj.weight [e, d]       (cosFormer2; the down projection is
                                            tied: y = x + h @ tpe.up_proj.weight)
Any other parameter keeps its path joined with "." (`kernel`/`scale` become `weight`, linear layout as above).
"""

from __future__ import annotations

import numpy as np

from lsm_jax import layer_pattern

_COMPONENT_NAMES = {
  "mixer": "token_mixer",
  "mlp": "channel_mixer",
  "mixer_norm": "token_mixer_norm",
  "mlp_norm": "channel_mixer_norm",
  "final_norm": "norm",
  "out": "o_proj",
  "out_proj": "o_proj",
  "up": "up_proj",
  "down": "down_proj",
}
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
    return [
      (".".join([*names[:-1], part, "weight"]), _linear_weight(leaf[:, index]), f"{source}[:, {index}]")
      for index, part in enumerate(parts)
    ]
  if last == "kernel":
    return [(".".join([*names, "weight"]), _linear_weight(leaf), source)]
  if last == "scale":
    return [(".".join([*names, "weight"]), leaf, source)]
  return [(".".join([*names, _torch_component(names, last)]), leaf, source)]


def _is_stack(block: dict) -> bool:
  """Whether a `layers/<k>` entry is a stack of layers: its channel mixer's kernels then have a leading axis."""
  return np.ndim(block["mlp"]["down"]["kernel"]) == 3


def torch_state_dict(params: dict, num_layers: int, pattern: str | None = None) -> dict[str, tuple[np.ndarray, str]]:
  """PyTorch-named tensors {name: (array, JAX source)} from a params pure dict (stacked or unstacked layers).

  pattern: the layer pattern in effect (ModelConfig.pattern), which orders the layers of a scanned hybrid's run
  stacks. The source is the JAX path, with `[l]` for a slice of a stacked parameter and `[:, i]` for a fused part.
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
      visit_stacked(node, path, range(num_layers))  # scan_layers: every leaf has a leading [num_layers] axis
    elif path == ["layers"] and node and _is_stack(next(iter(node.values()))):
      visit_runs(node)
    else:
      for key, child in node.items():
        visit(child, [*path, key])

  def visit_runs(node):
    """A scanned hybrid: `layers/<k>` stacks run k's layers."""
    if pattern is None:
      raise ValueError(
        "layers holds the run stacks of a scanned hybrid (layers/<run>/...); torch_state_dict needs its layer "
        "pattern (pattern=ModelConfig.pattern)"
      )
    runs = [run for group in layer_pattern.layer_groups(pattern, num_layers) for run in group]
    if sorted(node) != list(range(len(runs))):
      raise ValueError(
        f"layers holds stacks {sorted(node)}, but layer pattern {pattern!r} over {num_layers} layers has "
        f"{len(runs)} runs: {[f'{run.mixer}*{len(run.flat_layers)}' for run in runs]}"
      )
    for index, run in enumerate(runs):
      visit_stacked(node[index], ["layers", index], run.flat_layers)

  def visit_stacked(node, path, layers):
    """Slices row i of every leaf under `path` as the parameter of model layer layers[i]."""
    if isinstance(node, dict):
      for key, child in node.items():
        visit_stacked(child, [*path, key], layers)
      return
    if node.shape[0] != len(layers):
      raise ValueError(
        f"stacked parameter {'/'.join(map(str, path))} has leading dimension {node.shape[0]}, expected "
        f"{len(layers)} (its layers {list(layers)} of num_layers={num_layers})"
      )
    stacked = np.asarray(node)
    layer_path = [key for key in path if isinstance(key, str)][1:]  # without "layers" and the run index
    for row, layer in enumerate(layers):
      add(["layers", layer, *layer_path], stacked[row], f"{'/'.join(map(str, path))}[{row}]")

  visit(params, [])
  return tensors
