"""cosFormer2 token mixer: linear attention without decay (arXiv 2406.16690 §2.2, Eq. 17).

  q = SiLU(x W_q), k = SiLU(x W_k), v = x W_v
  q̃_t = [cos(θ t) ⊙ q_t, sin(θ t) ⊙ q_t], k̃_s likewise    (LRPE: the q/k width doubles to 2·d/h)
  o = LA(q̃, k̃, v) with λ = 1, so q̃_t·k̃_s = Σ_c q_c k_c cos(θ_c (t - s))
  y = (SRMSNorm(concat_h o) ⊙ sigmoid(x W_gdown W_gup)) W_o

Open choices of the paper, as resolved here:
  * LRPE θ is a fixed buffer (not learned): θ_c = 10000^(-2c/D) on the first half of the head channels and 0
    on the second half (xmixers "lrpe_type 6", the closest public cosFormer2); it adds no parameters, which
    matches the paper's parameter count. Positions restart at every document (packed rows).
  * TPE (once after the embedding) is `ToeplitzPositionalEncoding`: de parameters (e = d/h), an
    up-projection, a per-channel exponentially decaying recurrence with fixed timescales in [1, 8192] and
    the tied down-projection, added residually. It is an approximation of LightNet's TPE (unavailable).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lsm_jax.models import layers
from lsm_jax.models.mixers.tnl import TNLAttention
from pallas_kernels.linear_attention import common


def lrpe_frequencies(head_dim: int, theta: float = 10000.0):
  """Fixed LRPE frequencies: theta^(-2c/D) on the first half of the channels and 0 on the second half
  (xmixers "lrpe_type 6"): half the channels carry relative-position phases, half are position free."""
  half = head_dim // 2
  rotating = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
  return jnp.concatenate([rotating, jnp.zeros((head_dim - half,), jnp.float32)])


def lrpe(x, positions, theta: float = 10000.0):
  """Cosine LRPE: [B,T,H,D] -> [cos(θ t) ⊙ x, sin(θ t) ⊙ x] of width 2D, so that
  q̃_t · k̃_s = Σ_c q_c k_c cos(θ_c (t - s)): a per-channel relative cosine reweighting."""
  angles = positions.astype(jnp.float32)[:, :, None, None] * lrpe_frequencies(x.shape[-1], theta)
  x32 = x.astype(jnp.float32)
  return jnp.concatenate([x32 * jnp.cos(angles), x32 * jnp.sin(angles)], axis=-1).astype(x.dtype)


class ToeplitzPositionalEncoding(nnx.Module):
  """TPE of cosFormer2 (applied once after the embedding). The paper gives only its cost: de parameters with
  e = d/h, an up-projection (2nde), a recurrence (nde) and a down-projection. Our choice, flagged as an
  approximation of LightNet's TPE:
      u_t = x_t W            W [d, e], normal(0, init_std)      (the de parameters)
      h_t = λ ⊙ h_{t-1} + u_t  per channel, fixed λ_c = exp(-1/τ_c), τ_c log-spaced in [1, 8192]
      y_t = x_t + h_t Wᵀ      tied down-projection (no extra parameters)
  The recurrence is an exponential (Toeplitz) kernel over relative positions; it restarts at every
  document start, so packed documents never leak into each other, and runs as an associative scan in
  fp32. Decoding carries h [B, e]."""

  def __init__(self, d_model: int, dim: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    self.kernel = layers.make_param(rngs, (d_model, dim), ("embed", "kv"), std=std, dtype=param_dtype)
    self.dim = dim

  def log_decay(self):
    timescales = jnp.exp(jnp.linspace(0.0, math.log(8192.0), self.dim, dtype=jnp.float32))
    return -1.0 / timescales

  def __call__(self, x, segment_ids):
    """x [B,T,d], segment_ids [B,T] -> (y [B,T,d], final recurrent state [B,e] fp32)."""
    kernel = self.kernel[...].astype(jnp.float32)
    inputs = jnp.dot(x.astype(jnp.float32), kernel)
    decay = jnp.broadcast_to(jnp.exp(self.log_decay()), inputs.shape)
    decay = jnp.where(common.segment_starts(segment_ids, *segment_ids.shape)[..., None], 0.0, decay)

    def combine(earlier, later):
      decay_a, value_a = earlier
      decay_b, value_b = later
      return decay_a * decay_b, decay_b * value_a + value_b

    _, states = jax.lax.associative_scan(combine, (decay, inputs), axis=1)
    return x + jnp.dot(states, kernel.T).astype(x.dtype), states[:, -1]

  def step(self, x, state):
    """x [B,d], state [B,e] -> (y [B,d], new state)."""
    kernel = self.kernel[...].astype(jnp.float32)
    state = jnp.exp(self.log_decay()) * state + jnp.dot(x.astype(jnp.float32), kernel)
    return x + jnp.dot(state, kernel.T).astype(x.dtype), state


class CosFormer2Attention(TNLAttention):
  """TNL's projections, gate and norm, with LRPE features and no decay."""

  @classmethod
  def model_parameters(cls, config, num_layers, *, rngs):
    del num_layers  # one TPE after the embedding, whatever the depth
    return {
      "tpe": ToeplitzPositionalEncoding(
        config.d_model, config.head_dim, std=config.init_std, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs
      )
    }

  @classmethod
  def layer_inputs(cls, model, num_layers):
    del model, num_layers
    return {}  # no decay

  @classmethod
  def embed(cls, model, x, segment_ids):
    x, state = model.tpe(x, segment_ids if segment_ids is not None else jnp.zeros(x.shape[:2], jnp.int32))
    return x, {"tpe": state}

  @classmethod
  def embed_step(cls, model, x, decode_state):
    embedded, state = model.tpe.step(x[:, 0], decode_state["tpe"])
    return embedded[:, None], {"tpe": state}

  def _feature_map(self, q, k, positions):
    return lrpe(jax.nn.silu(q), positions), lrpe(jax.nn.silu(k), positions)

  def _attend(self, x, positions, log_decay, segment_ids, return_final_state):
    # LRPE doubles the key width: q, k, v leave the projection as separate arrays.
    q, k, v = self._project(x, positions)
    return layers.sharded_linear_attention(
      q,
      k,
      v,
      log_decay,
      segment_ids=segment_ids,
      return_final_state=return_final_state,
      backend=self.config.linear_attention_backend,
      chunk_size=self.config.chunk_size,
      gpu_overrides=self.config.linear_attention_gpu_overrides,
    )

  def _log_decay(self, layer_inputs):
    del layer_inputs
    return None
