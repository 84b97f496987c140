"""LLaMA token mixer: causal softmax attention with RoPE (paper eqs. 4-7; no GQA, as in the paper).

Packed documents: keys are masked to the query's own segment and RoPE uses per-document positions, so a
document inside a packed row sees exactly what it would see alone. Decoding uses a KV cache of
`max_length` slots; slots whose segment id differs from the current document's are masked out (this covers
left padding, segment id 0, and unwritten slots).

Implementations: "splash" (Pallas TPU splash attention: block-sparse causal mask, documents by segment ids, no
[T, T] array), "pallas_gpu" (Pallas GPU flash attention, pallas_kernels.attention: documents by segment ids, no
[T, T] array, key blocks hidden by the mask skipped; batches of one document per row go to cuDNN), "cudnn" (cuDNN flash
attention through jax.nn.dot_product_attention) and "xla" (the same call, plain XLA). The last two take the
documents as a dense [B, 1, T, T] mask. "auto" picks splash on TPU, pallas_gpu on GPU (16-bit), xla elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from lsm_jax.models import layers
from lsm_jax.models.mixers import base
from pallas_kernels import attention as pallas_attention

# Splash attention's query and key blocks: the largest of these dividing T (512 is MaxText's default).
SPLASH_BLOCKS = (512, 256, 128)
# CPU tests set this: splash then runs in Pallas' HLO interpreter, in seconds (pltpu.force_tpu_interpret_mode
# took minutes on its grid and rejects a vmapped splash). Off means Mosaic, also when compiling ahead for a TPU
# from a CPU host.
INTERPRET_SPLASH = False


def rotary_embedding(x, positions, theta: float):
  """RoPE on [B,T,H,D] with per-token positions [B,T]; rotates (first half, second half) channel pairs with
  frequencies theta^(-2j/D), computed in fp32."""
  half = x.shape[-1] // 2
  frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, :, None, None] * frequencies
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def splash_block(length: int) -> int | None:
  """The splash block for a sequence of `length`, or None where splash cannot run it (T not a multiple of
  128: the one model also serves evaluation prompts of any length, which then take the XLA path)."""
  return next((block for block in SPLASH_BLOCKS if length % block == 0), None)


def splash_attention(q, k, v, segment_ids):
  """Causal splash attention of q, k, v [B, T, H, D] (keys limited to the query's segment when segment_ids
  [B, T] are given) -> [B, T, H, D], per shard of the active mesh (batch and heads); None where it cannot run:
  T not a multiple of 128, or the time axis split over the mesh. Off TPU the kernels need INTERPRET_SPLASH."""
  _, length, _, head_dim = q.shape
  block = splash_block(length)
  shards = layers.KernelShards(q)
  if block is None or shards.length is not None:
    return None

  def attend(q, k, v, segment_ids):
    local_heads = q.shape[2]
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * local_heads)
    sizes = splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=INTERPRET_SPLASH)
    # The kernel neither scales the logits nor batches: heads-major [H, T, D] rows, vmapped over the examples.
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    if segment_ids is None:
      out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v))
    else:
      out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids)))(
        heads_major(q), heads_major(k), heads_major(v), segment_ids
      )
    return heads_major(out)

  if not shards.sharded:
    return attend(q, k, v, segment_ids)
  activation = shards.activation_spec()
  segment_spec = None if segment_ids is None else shards.segment_spec()
  return shards.per_shard(attend, (activation, activation, activation, segment_spec), activation)(q, k, v, segment_ids)


def pallas_gpu_attention(q, k, v, segment_ids):
  """Causal flash attention (Pallas GPU kernels; interpret mode off the GPU) of q, k, v [B, T, H, D] (keys limited
  to the query's segment when segment_ids [B, T] are given) -> [B, T, H, D], per shard of the active mesh (batch
  and heads); None where it cannot run: a head_dim the kernels lack, or the time axis split over the mesh.

  On the GPU with 16-bit inputs, a batch without documents, or whose rows hold one document each, goes to cuDNN's
  causal kernel instead (no mask there, and 2.4x this kernel's speed forward+backward at 8x2048 on an H200); the
  choice between the two is made at run time from the segment ids."""
  shards = layers.KernelShards(q)
  if q.shape[-1] not in pallas_attention.HEAD_DIMS or shards.length is not None:
    return None

  def flash(q, k, v, segment_ids):
    if not shards.sharded:
      return pallas_attention.flash_attention(q, k, v, segment_ids)
    activation = shards.activation_spec()
    segment_spec = None if segment_ids is None else shards.segment_spec()
    in_specs = (activation, activation, activation, segment_spec)
    return shards.per_shard(pallas_attention.flash_attention, in_specs, activation)(q, k, v, segment_ids)

  if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
    return flash(q, k, v, segment_ids)
  cudnn = lambda q, k, v, _: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if segment_ids is None:
    return cudnn(q, k, v, None)
  one_document_per_row = jnp.all(segment_ids == segment_ids[:, :1])
  return jax.lax.cond(one_document_per_row, cudnn, flash, q, k, v, segment_ids)


# The attention kernels by implementation; the others ("cudnn", "xla") are jax.nn.dot_product_attention's.
KERNELS = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention}


class SoftmaxAttention(base.TokenMixer):
  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    d, heads, head_dim = config.d_model, config.num_heads, config.head_dim
    kwargs = dict(std=config.init_std, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.qkv = layers.Linear(d, (3, heads, head_dim), ("embed", None, "heads", "kv"), **kwargs)
    self.out = layers.Linear(heads * head_dim, d, ("heads", "embed"), **kwargs)

  @classmethod
  def prefill_state(cls, segment_ids, max_length):
    # Segment id of every cache slot; unwritten slots are padding until decoding writes them.
    return {"key_segment_ids": jnp.pad(segment_ids, [(0, 0), (0, max_length - segment_ids.shape[1])])}

  @classmethod
  def decode_context(cls, decode_state):
    key_segment_ids = jax.lax.dynamic_update_slice_in_dim(
      decode_state["key_segment_ids"],
      decode_state["segment"][:, None].astype(decode_state["key_segment_ids"].dtype),
      decode_state["index"],
      axis=1,
    )
    return {"key_segment_ids": key_segment_ids}, {"key_segment_ids": key_segment_ids}

  def _project(self, x, positions):
    dtype = jnp.dtype(self.config.dtype)
    qkv = self.qkv(x, dtype)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q = rotary_embedding(q, positions, self.config.rope_theta)
    k = rotary_embedding(k, positions, self.config.rope_theta)
    return q, k, v

  def _output(self, attended):
    attended = layers.constrain(attended, ("activation_batch", "activation_length", "activation_heads", None))
    return self.out(attended.reshape(*attended.shape[:-2], -1), jnp.dtype(self.config.dtype))

  def __call__(self, x, *, segment_ids, positions, layer_inputs, max_length=None):
    del layer_inputs
    q, k, v = self._project(x, positions)
    implementation = self.config.resolved_for().attention_impl
    kernel = KERNELS.get(implementation)
    attended = None if kernel is None else kernel(q, k, v, segment_ids)
    if attended is None:
      mask = None
      if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
      attended = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation="xla" if kernel is not None else implementation
      )
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
