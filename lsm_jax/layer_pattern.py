"""Layer patterns: which token mixer each layer of a model uses (hybrid stacks of linear and softmax layers).

Grammar: comma-separated terms, each a mixer name or `mixer*count`; the expanded terms form one block that
repeats from the first layer on, the last repetition cut short where the layer count ends:

  "hgrn2*7,llama"         seven HGRN2 layers then one softmax layer, repeated (MiniMax-01's 7:1)
  "tnl*3,llama,tnl*4"     the same ratio with the softmax layer 4th in each block of eight, so that even a stack of
                          four to seven layers has one
  "hgrn2"                 every layer HGRN2

Mixers are the pure architectures' ("llama", also spelled "softmax", "tnl", "hgrn2", "cosformer2"). The norms and
channel mixer of every layer are the architecture's (`ModelConfig.arch`), so a hybrid family such as
`hgrn2_hybrid` has HGRN2's SRMSNorm and SGLU in all its layers, softmax ones included.

Plain Python (no jax), so that `lsm_jax.flops` and the scaling code can use it without model code.
"""

from __future__ import annotations

import dataclasses
import re

MIXERS = ("llama", "tnl", "hgrn2", "cosformer2")
MIXER_ALIASES = {"softmax": "llama"}
# Hybrid families: their norms and channel mixer are those of the linear architecture named here.
HYBRID_ARCHS = {"tnl_hybrid": "tnl", "hgrn2_hybrid": "hgrn2"}
_TERM = re.compile(r"([a-z0-9_]+)(?:\*([0-9]+))?")


def parse(pattern: str) -> tuple[str, ...]:
  """The repeated block of `pattern`, one canonical mixer name per layer."""
  if not isinstance(pattern, str) or not pattern.strip():
    raise ValueError(f"layer pattern must be a non-empty string such as 'hgrn2*7,llama'; got {pattern!r}.")
  block = []
  for term in pattern.replace(" ", "").split(","):
    match = _TERM.fullmatch(term)
    if match is None:
      raise ValueError(f"layer pattern {pattern!r} has a malformed term {term!r}; terms are 'mixer' or 'mixer*count'.")
    name, count = match.group(1), match.group(2)
    name = MIXER_ALIASES.get(name, name)
    if name not in MIXERS:
      valid = ", ".join((*MIXERS, *MIXER_ALIASES))
      raise ValueError(f"layer pattern {pattern!r} names unknown mixer {match.group(1)!r}; valid: {valid}.")
    if count is not None and int(count) <= 0:
      raise ValueError(f"layer pattern {pattern!r}: the count of {term!r} must be positive.")
    block.extend([name] * (1 if count is None else int(count)))
  return tuple(block)


def layer_mixers(pattern: str, num_layers: int) -> tuple[str, ...]:
  """The mixer of every one of `num_layers` layers: the block of `pattern` repeated and cut at num_layers."""
  block = parse(pattern)
  return tuple(block[layer % len(block)] for layer in range(num_layers))


def mixer_counts(pattern: str, num_layers: int) -> dict[str, int]:
  """{mixer: number of its layers}, in the order the mixers first appear."""
  counts = {}
  for mixer in layer_mixers(pattern, num_layers):
    counts[mixer] = counts.get(mixer, 0) + 1
  return counts


def default_pattern(arch: str) -> str:
  """The pattern of a model without one: every layer the architecture's own mixer (hybrids have none)."""
  if arch in HYBRID_ARCHS:
    raise ValueError(
      f"arch {arch!r} is a hybrid family and needs a layer pattern such as '{HYBRID_ARCHS[arch]}*7,llama'."
    )
  return arch


@dataclasses.dataclass(frozen=True)
class LayerRun:
  """Consecutive layers of one mixer inside a repeated block: `length` layers per repetition, `repeats`
  repetitions. `layers[r][i]` is the model's index of layer i of repetition r; a scanned model stacks a run's
  parameters on one leading axis of repeats × length in that (repetition-major) order."""

  mixer: str
  repeats: int
  length: int
  layers: tuple[tuple[int, ...], ...]

  @property
  def flat_layers(self) -> tuple[int, ...]:
    return tuple(layer for repetition in self.layers for layer in repetition)


def layer_groups(pattern: str, num_layers: int) -> tuple[tuple[LayerRun, ...], ...]:
  """The scanned groups of a stack: the full repetitions of the block, then the cut-short last one (if any).
  Each group is its runs of consecutive same-mixer layers; a group is scanned over its repetitions and each run of
  more than one layer over its layers, so one layer per run is compiled whatever the depth."""
  block = parse(pattern)
  full, tail = divmod(num_layers, len(block))
  groups = []
  for first, repeats, width in ((0, full, len(block)), (full * len(block), 1, tail)):
    if repeats == 0 or width == 0:
      continue
    runs, start = [], 0
    while start < width:
      end = start
      while end < width and block[end] == block[start]:
        end += 1
      stride = len(block)
      layers = tuple(tuple(first + r * stride + i for i in range(start, end)) for r in range(repeats))
      runs.append(LayerRun(block[start], repeats, end - start, layers))
      start = end
    groups.append(tuple(runs))
  return tuple(groups)
