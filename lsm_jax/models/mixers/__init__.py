"""Token mixers, one per architecture. Each implements
  __call__(x [B,T,d], *, segment_ids, positions, layer_inputs, max_length=None) -> (y, cache | None)
      (the decoding cache is returned only for a prefill, i.e. when max_length is given)
  decode(x [B,1,d], cache, *, positions [B,1], layer_inputs, context) -> (y, cache)
"""
from lsm_jax.models.mixers.cosformer2 import CosFormer2Attention
from lsm_jax.models.mixers.hgrn2 import HGRN2Mixer
from lsm_jax.models.mixers.softmax import SoftmaxAttention
from lsm_jax.models.mixers.tnl import TNLAttention

MIXERS = {
    "llama": SoftmaxAttention,
    "tnl": TNLAttention,
    "hgrn2": HGRN2Mixer,
    "cosformer2": CosFormer2Attention,
}

__all__ = ["MIXERS", "CosFormer2Attention", "HGRN2Mixer", "SoftmaxAttention", "TNLAttention"]
