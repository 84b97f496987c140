"""LLaMA token mixer: causal softmax attention with RoPE (paper eqs. 4-7; no GQA, as in the paper).

Packed documents: keys are masked to the query's own segment and RoPE uses per-document positions, so a
document inside a packed row sees exactly what it would see alone. Decoding uses a KV cache of
`max_length` slots; slots whose segment id differs from the current document's are masked out (this covers
left padding, segment id 0, and unwritten slots).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lsm_jax.models import layers


def resolve_attention_impl(attention_impl: str, dtype, platform: str | None = None) -> str:
  """"auto" -> cuDNN flash attention on GPU for 16-bit inputs, else XLA. `platform`: the target's (None: the
  default device's)."""
  if attention_impl != "auto":
    return attention_impl
  if (platform or jax.default_backend()) == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


class SoftmaxAttention(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    d, heads, head_dim = config.d_model, config.num_heads, config.head_dim
    kwargs = dict(std=config.init_std, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.qkv = layers.Linear(d, (3, heads, head_dim), ("embed", None, "heads", "kv"), **kwargs)
    self.out = layers.Linear(heads * head_dim, d, ("heads", "embed"), **kwargs)

  def _project(self, x, positions):
    dtype = jnp.dtype(self.config.dtype)
    qkv = self.qkv(x, dtype)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q = layers.rotary_embedding(q, positions, self.config.rope_theta)
    k = layers.rotary_embedding(k, positions, self.config.rope_theta)
    return q, k, v

  def _output(self, attended):
    attended = layers.constrain(attended, ("activation_batch", "activation_length", "activation_heads", None))
    return self.out(attended.reshape(*attended.shape[:-2], -1), jnp.dtype(self.config.dtype))

  def __call__(self, x, *, segment_ids, positions, layer_inputs, max_length=None):
    del layer_inputs
    q, k, v = self._project(x, positions)
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    attended = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True,
        implementation=resolve_attention_impl(self.config.attention_impl, q.dtype))
    cache = None
    if max_length is not None:
      pad = [(0, 0), (0, max_length - k.shape[1]), (0, 0), (0, 0)]
      cache = {"key": jnp.pad(k, pad), "value": jnp.pad(v, pad)}
    return self._output(attended), cache

  def decode(self, x, cache, *, positions, layer_inputs, context):
    del layer_inputs
    q, k, v = self._project(x, positions)
    index = context["index"]
    keys = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), index, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), index, axis=1)
    scores = jnp.einsum("bqhd,bshd->bhqs", q, keys, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
    visible = (context["key_segment_ids"] == context["segment"][:, None])[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    attended = jnp.einsum("bhqs,bshd->bqhd", weights.astype(values.dtype), values)
    return self._output(attended), {"key": keys, "value": values}
