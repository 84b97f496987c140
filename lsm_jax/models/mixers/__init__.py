"""Token mixers, one per architecture (the interface: mixers/base.py), and the registries of mixers (by the names
layer patterns use) and architectures."""

from __future__ import annotations

import dataclasses

from lsm_jax import layer_pattern
from lsm_jax.models.mixers.base import TokenMixer
from lsm_jax.models.mixers.cosformer2 import CosFormer2Attention
from lsm_jax.models.mixers.hgrn2 import HGRN2Mixer
from lsm_jax.models.mixers.softmax import SoftmaxAttention
from lsm_jax.models.mixers.tnl import TNLAttention


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What sets an architecture apart in the shared LanguageModel: its token mixer (with the mixer's hooks; a
  layer pattern may give some layers another) and the flavour of its norms and channel mixer."""

  mixer: type[TokenMixer]
  norm_gain: bool  # RMSNorm with a learned gain (LLaMA), else the gain-free SRMSNorm
  swish_glu: bool  # SwiGLU (LLaMA), else the activation-free SGLU


ARCHITECTURES = {
  "llama": Architecture(SoftmaxAttention, norm_gain=True, swish_glu=True),
  "tnl": Architecture(TNLAttention, norm_gain=False, swish_glu=False),
  "hgrn2": Architecture(HGRN2Mixer, norm_gain=False, swish_glu=False),
  "cosformer2": Architecture(CosFormer2Attention, norm_gain=False, swish_glu=False),
}
# Hybrid families take their linear architecture's norms and channel mixer in every layer.
ARCHITECTURES.update({family: ARCHITECTURES[linear] for family, linear in layer_pattern.HYBRID_ARCHS.items()})
MIXERS = {name: ARCHITECTURES[name].mixer for name in layer_pattern.MIXERS}

__all__ = [
  "ARCHITECTURES",
  "Architecture",
  "CosFormer2Attention",
  "HGRN2Mixer",
  "MIXERS",
  "SoftmaxAttention",
  "TNLAttention",
  "TokenMixer",
]
