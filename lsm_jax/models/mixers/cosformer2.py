"""cosFormer2 token mixer: linear attention without decay (arXiv 2406.16690 §2.2, Eq. 17).

  q = SiLU(x W_q), k = SiLU(x W_k), v = x W_v
  q̃_t = [cos(θ t) ⊙ q_t, sin(θ t) ⊙ q_t], k̃_s likewise    (LRPE: the q/k width doubles to 2·d/h)
  o = LA(q̃, k̃, v) with λ = 1, so q̃_t·k̃_s = Σ_c q_c k_c cos(θ_c (t - s))
  y = (SRMSNorm(concat_h o) ⊙ sigmoid(x W_gdown W_gup)) W_o

Open choices of the paper, as resolved here:
  * LRPE θ is a fixed buffer (not learned): θ_c = 10000^(-2c/D) on the first half of the head channels and 0
    on the second half (xmixers "lrpe_type 6", the closest public cosFormer2); it adds no parameters, which
    matches the paper's parameter count. Positions restart at every document (packed rows).
  * TPE (once after the embedding) is `layers.ToeplitzPositionalEncoding`: de parameters (e = d/h), an
    up-projection, a per-channel exponentially decaying recurrence with fixed timescales in [1, 8192] and
    the tied down-projection, added residually. It is an approximation of LightNet's TPE (unavailable).
"""
from __future__ import annotations

import jax

from lsm_jax.models import layers
from lsm_jax.models.mixers.tnl import TNLAttention


class CosFormer2Attention(TNLAttention):
  """TNL's projections, gate and norm, with LRPE features and no decay."""

  def _feature_map(self, q, k, positions):
    return layers.lrpe(jax.nn.silu(q), positions), layers.lrpe(jax.nn.silu(k), positions)

  def _log_decay(self, layer_inputs):
    del layer_inputs
    return None
