"""Parameter and FLOP accounting for the four architectures of arXiv 2406.16690 and their hybrids.

Two levels of detail, both from the paper:

* Table 1 (the default): non-embedding parameters ``N`` and per-step training FLOPs with the GLU width
  fixed at 8/3·d and sub-leading terms dropped. This is what the paper fits scaling laws on, and with
  batch 480 × 8192 tokens it reproduces every "PFLOPs/step" entry of Table 7.
* Appendix A.1 (pass ``ffn_dim`` and ``vocab_size``): the full training FLOPs with the actual GLU width
  and the tied embedding/head term ``12·b·n·d·v``, for model-FLOPs utilisation.

Conventions follow the paper: a multiply-accumulate is 2 FLOPs, a training step costs 3× the forward pass,
and every linear-attention block size, output-gate bottleneck and TPE width equals the head dim ``d/h``.
A hybrid (``layer_pattern``, lsm_jax/layer_pattern.py) is counted layer by layer: each layer's token mixer by its
own architecture's per-layer terms, every layer's channel mixer alike, and each model-level term (cosFormer2's
TPE, HGRN2's lower bounds over its own layers) once where its mixer appears.
Scaling code imports this module only; it must never import model code.
"""

from __future__ import annotations

from lsm_jax import layer_pattern as layer_pattern_lib

PFLOP_S_DAY = 8.64e19  # FLOPs in one PFLOP/s-day: 1e15 FLOP/s × 86,400 s
ARCHS = ("llama", "tnl", "hgrn2", "cosformer2")
HYBRID_ARCHS = tuple(layer_pattern_lib.HYBRID_ARCHS)


def _check_shape(arch: str, **sizes) -> None:
  if arch not in ARCHS + HYBRID_ARCHS:
    raise ValueError(f"unknown arch {arch!r}; valid archs are {', '.join(ARCHS + HYBRID_ARCHS)}")
  for name, value in sizes.items():
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f"{name} must be a positive number, got {value!r}")


def layer_counts(arch: str, num_layers: int, layer_pattern: str | None = None) -> dict[str, int]:
  """{mixer: its number of layers} of a model: every layer ``arch``'s own mixer without ``layer_pattern``
  (which a hybrid family must give)."""
  if not layer_pattern:
    return {layer_pattern_lib.default_pattern(arch): num_layers}
  if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
    raise ValueError(f"num_layers must be a positive int with a layer pattern, got {num_layers!r}")
  return layer_pattern_lib.mixer_counts(layer_pattern, num_layers)


def non_embedding_params(
  arch: str,
  num_layers: int,
  d_model: int,
  num_heads: int,
  *,
  ffn_dim: int | None = None,
  layer_pattern: str | None = None,
) -> float:
  """Non-embedding parameter count ``N`` of the paper.

  ``ffn_dim=None`` gives Table 1 (GLU width 8/3·d, so the layer stack is 12·l·d²); with ``ffn_dim``
  the Appendix A.1 count 4·l·d² + 3·l·d·g, which is what Table 7's "Params" column uses.
  Norm weights are not counted (the paper omits them; they are < 0.3M at every size).
  ``layer_pattern``: a hybrid's mixer per layer (required for the hybrid families).
  """
  _check_shape(arch, num_layers=num_layers, d_model=d_model, num_heads=num_heads, ffn_dim=ffn_dim)
  counts = layer_counts(arch, num_layers, layer_pattern)
  l, d = float(num_layers), float(d_model)  # noqa: E741  (the paper's symbols)
  head_dim = d / num_heads  # also the output-gate bottleneck t and the TPE width e
  if ffn_dim is None:
    stack = 12 * l * d**2
  else:
    stack = 4 * l * d**2 + 3 * l * d * ffn_dim
  per_layer_extra = {
    "llama": 0.0,
    "tnl": 2 * d * head_dim,  # low-rank output gate d→t→d per layer
    "hgrn2": d,  # per-layer forget-gate lower bounds
    "cosformer2": 2 * d * head_dim,  # output gate per layer
  }
  extra = sum(count * per_layer_extra[mixer] for mixer, count in counts.items())
  if "cosformer2" in counts:
    extra += d * head_dim  # one TPE
  return stack + extra


def flops_per_step(
  arch: str,
  num_layers: int,
  d_model: int,
  num_heads: int,
  batch_size: int,
  seq_len: int,
  *,
  ffn_dim: int | None = None,
  vocab_size: int | None = None,
  layer_pattern: str | None = None,
) -> float:
  """Training FLOPs (forward + backward) of one step of ``batch_size`` sequences of ``seq_len`` tokens.

  Without ``ffn_dim``/``vocab_size``: the Table 1 expression, 72·b·n·l·d²·(1 + arch terms), used for the
  scaling-law compute C and Table 7. With both: Appendix A.1's full count, including the 12·b·n·d·v
  embedding/head term (and LLaMA's softmax 9·n²·h term that Table 1 drops), for MFU. ``layer_pattern``: a
  hybrid's mixer per layer (required for the hybrid families); each layer adds its own mixer's terms.
  """
  _check_shape(
    arch,
    num_layers=num_layers,
    d_model=d_model,
    num_heads=num_heads,
    batch_size=batch_size,
    seq_len=seq_len,
    ffn_dim=ffn_dim,
    vocab_size=vocab_size,
  )
  if (ffn_dim is None) != (vocab_size is None):
    raise ValueError(
      "pass both ffn_dim and vocab_size (Appendix A.1 full FLOPs) or neither "
      f"(Table 1 FLOPs); got ffn_dim={ffn_dim!r}, vocab_size={vocab_size!r}"
    )
  counts = layer_counts(arch, num_layers, layer_pattern)
  b, n, l, d, h = float(batch_size), float(seq_len), float(num_layers), float(d_model), float(num_heads)  # noqa: E741
  if ffn_dim is None:
    relative = {
      "llama": n / (6 * d) + 5 / (18 * d),
      "tnl": 1 / (2 * h) + 5 / (18 * d),
      "hgrn2": 1 / (3 * h) + 29 / (72 * d),
      "cosformer2": 3 / (4 * h) + 23 / (72 * d),
    }
    return 72 * b * n * d**2 * sum(count * (1 + relative[mixer]) for mixer, count in counts.items())

  g, v = float(ffn_dim), float(vocab_size)
  # Forward FLOPs of one layer's token mixer on one sequence (Appendix A.1, block size = d/h).
  token_mixer = {
    "llama": 8 * n * d**2 + 4 * n**2 * d + 3 * n**2 * h + 4 * n * d,
    "tnl": 8 * n * d**2 + 12 * n * d**2 / h + 4 * n * d,
    "hgrn2": 8 * n * d**2 + 8 * n * d**2 / h + 7 * n * d,
    "cosformer2": 8 * n * d**2 + 18 * n * d**2 / h + 5 * n * d,
  }
  channel_mixer = 6 * n * d * g + n * g  # three GLU projections + the elementwise product
  per_sequence_forward = sum(count * token_mixer[mixer] for mixer, count in counts.items()) + l * channel_mixer
  if "cosformer2" in counts:
    per_sequence_forward += 4 * n * d**2 / h  # TPE, applied once after the embedding
  total = 3 * b * per_sequence_forward + 12 * b * n * d * v  # tied embedding + head, as the paper counts it
  if "hgrn2" in counts:
    total += 12 * d * counts["hgrn2"]  # lower bounds: softmax + cumsum over the HGRN2 layers, once per step
  return total


def to_pflops_days(flops):
  """FLOPs → PFLOP/s-days (the unit of C in Table 3 and Figure 1); works on scalars and numpy arrays."""
  return flops / PFLOP_S_DAY
