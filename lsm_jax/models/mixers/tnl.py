"""TNL token mixer (TransNormerLLM with Lightning Attention; arXiv 2406.16690 Eq. 9).

  q = SiLU(x W_q), k = SiLU(x W_k), v = x W_v                 (no activation on v, as in the paper)
  o = LA(q, k, v; λ_h^(l))    λ_h^(l) = exp(-s_h (1 - l/(L-1) + 1e-5)), s_h the ALiBi slopes (fixed)
  y = (SRMSNorm(concat_h o) ⊙ sigmoid(x W_gdown W_gup)) W_o   (low-rank gate, rank d/h)
No query scaling and no denominator: the norm after the attention keeps it stable. The per-layer
log-decays arrive in `layer_inputs["log_decay"]` ([H]) so stacked, scanned layers share one code path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lsm_jax.models import layers
from lsm_jax.models.mixers import base
from pallas_kernels.linear_attention import linear_attention_step


def alibi_slopes(num_heads: int):
  """ALiBi head slopes: 2^(-8(h+1)/H) for a power of two H; otherwise those of the nearest lower power of
  two c followed by every other slope of 2c (ALiBi paper, lightning-attention utils)."""

  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    return power_of_two(num_heads)
  closest = 2 ** math.floor(math.log2(num_heads))
  return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


def tnl_log_decays(num_layers: int, num_heads: int):
  """[L, H] fixed log-decays of TNL: -s_h · (1 - l/(L-1) + 1e-5); layer 0 decays fastest, the last ~1."""
  slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
  depth = jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)
  return -slopes[None, :] * (1.0 - depth[:, None] + 1e-5)


class TNLAttention(base.TokenMixer):
  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    d, heads, head_dim = config.d_model, config.num_heads, config.head_dim
    kwargs = dict(std=config.init_std, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.qkv = layers.Linear(d, (3, heads, head_dim), ("embed", None, "heads", "kv"), **kwargs)
    self.gate = layers.LowRankOutputGate(d, head_dim, **kwargs)
    self.out = layers.Linear(heads * head_dim, d, ("heads", "embed"), **kwargs)

  @classmethod
  def layer_inputs(cls, model, num_layers):
    # In a hybrid the depth runs over the TNL layers alone: the first decays fastest, the last ~1.
    return {"log_decay": tnl_log_decays(num_layers, model.config.num_heads)}

  def _feature_map(self, q, k, positions):
    del positions
    return jax.nn.silu(q), jax.nn.silu(k)

  def _log_decay(self, layer_inputs):
    return layer_inputs["log_decay"]

  def _project(self, x, positions):
    qkv = self.qkv(x, jnp.dtype(self.config.dtype))
    q, k = self._feature_map(qkv[..., 0, :, :], qkv[..., 1, :, :], positions)
    return q, k, qkv[..., 2, :, :]

  def _output(self, attended, x):
    dtype = jnp.dtype(self.config.dtype)
    attended = layers.constrain(attended, ("activation_batch", "activation_length", "activation_heads", None))
    gated = layers.sharded_gated_rms_norm(
      attended.reshape(*attended.shape[:-2], -1),
      self.gate.logits(x, dtype),
      eps=self.config.norm_eps,
      backend=self.config.norm_backend,
    )
    return self.out(gated, dtype)

  def _attend(self, x, positions, log_decay, segment_ids, return_final_state):
    # The packed projection goes to the op whole: the GPU kernels can read q, k, v in place and apply the SiLU.
    del positions
    return layers.sharded_linear_attention_qkv(
      self.qkv(x, jnp.dtype(self.config.dtype)),
      log_decay,
      feature_map="silu",
      segment_ids=segment_ids,
      return_final_state=return_final_state,
      backend=self.config.linear_attention_backend,
      chunk_size=self.config.chunk_size,
      gpu_overrides=self.config.linear_attention_gpu_overrides,
    )

  def __call__(self, x, *, segment_ids, positions, layer_inputs, max_length=None):
    result = self._attend(x, positions, self._log_decay(layer_inputs), segment_ids, max_length is not None)
    if max_length is None:
      return self._output(result, x), None
    attended, state = result
    return self._output(attended, x), {"state": state}

  def decode(self, x, cache, *, positions, layer_inputs, context):
    del context
    q, k, v = self._project(x, positions)
    attended, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], cache["state"], self._log_decay(layer_inputs))
    return self._output(attended[:, None], x), {"state": state}
