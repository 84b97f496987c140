"""HGRN2 token mixer: gated linear RNN with outer-product state expansion (arXiv 2406.16690
Eqs. 12-13; code semantics of hgru2-pytorch and FLA).

  v, q, f = split(x W_in)                   one d -> 3d projection, in that order
  q = SiLU(q)
  λ = lb_l + (1 - lb_l) σ(f)                per key channel; lb_l from `layer_inputs["lower_bound"]`
  k = 1 - λ = (1 - lb_l) σ(-f),  log λ = log1p(-k) or log λ, whichever is exact   (layer 0 has lb = 0)
  S_t = Diag(λ_t) S_{t-1} + k_tᵀ v_t,  o_t = q_t S_t      (head dim d/h = 128, state 128 × 128 per head)
  y = SRMSNorm(concat_h o) W_out
There is no output gate beyond q. The lower bounds (lb = exclusive cumsum over layers of softmax of a
learned [L, d] parameter of the model) are computed once per forward and scanned in with the layer index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm_jax.models import layers
from lsm_jax.models.mixers import base
from pallas_kernels.linear_attention import linear_attention_step


def hgrn2_lower_bounds(lower_bound_logits):
  """[L, d] learned logits -> [L, d] lower bounds: exclusive cumsum over layers of their softmax, so layer 0
  has bound 0 and the bounds rise with depth (l/L at a uniform init)."""
  layer_weights = jax.nn.softmax(lower_bound_logits.astype(jnp.float32), axis=0)
  return jnp.cumsum(layer_weights, axis=0) - layer_weights


def _hgrn2_gate_parts(forget, lower_bound, layer_index):
  """fp32 (s = σ(f), 1 - s, lb, λ, k = 1 - λ, log λ) for forget logits [..., H, D], lower bound [H, D] and the
  (possibly traced) layer index, with one exp, one reciprocal and two logs per element: the gate is computed
  elementwise over every token and channel, so transcendental count, not memory, sets its time."""
  bound = jnp.where(layer_index == 0, 0.0, lower_bound)  # layer 0's bound is exactly 0
  e = jnp.exp(-jnp.abs(forget))
  r = 1.0 / (1.0 + e)
  positive = forget >= 0
  s, one_minus_s = jnp.where(positive, r, e * r), jnp.where(positive, e * r, r)
  decay = bound + (1.0 - bound) * s
  k = (1.0 - bound) * one_minus_s  # 1 - λ without cancellation
  log_decay = jnp.where(k < 0.5, jnp.log1p(-k), jnp.log(decay))
  # With lb = 0, λ = σ(f) underflows below f ≈ -87; there log σ(f) = f - log1p(e^f) is f to fp32 precision.
  log_decay = jnp.where((bound == 0.0) & (forget < -20.0), forget, log_decay)
  return s, one_minus_s, bound, decay, k, log_decay


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def hgrn2_gate(forget_logits, lower_bound, layer_index, dtype):
  """(k = 1 - λ in `dtype`, log λ in fp32) for forget logits [..., H, D] in any float dtype.

  The custom VJP forms the gradient in one elementwise pass from the logits alone; autodiff of the gate saves fp32
  intermediates per element and spreads its gradient over several fusions. With g = ∂L/∂log λ - λ ∂L/∂k and
  s = σ(f): ∂L/∂f = g (1 - lb) s (1 - s) / λ and ∂L/∂lb = Σ g (1 - s) / λ (none for layer 0, whose bound is 0).
  """
  _, _, _, _, k, log_decay = _hgrn2_gate_parts(forget_logits.astype(jnp.float32), lower_bound, layer_index)
  return k.astype(dtype), log_decay


def _hgrn2_gate_fwd(forget_logits, lower_bound, layer_index, dtype):
  return hgrn2_gate(forget_logits, lower_bound, layer_index, dtype), (forget_logits, lower_bound, layer_index)


def _hgrn2_gate_bwd(dtype, residuals, cotangents):
  del dtype
  forget_logits, lower_bound, layer_index = residuals
  d_k, d_log_decay = cotangents
  s, one_minus_s, bound, decay, _, _ = _hgrn2_gate_parts(forget_logits.astype(jnp.float32), lower_bound, layer_index)
  g = d_log_decay - d_k.astype(jnp.float32) * decay
  # (1 - lb) s / λ lies in [0, 1]; it is 1 where λ = s underflows (lb = 0).
  bounded_share = jnp.where(decay > 0.0, (1.0 - bound) * s / decay, 1.0)
  d_forget = g * bounded_share * one_minus_s
  d_bound = jnp.where((layer_index == 0) | (decay == 0.0), 0.0, g * one_minus_s / decay)
  d_bound = jnp.sum(d_bound, axis=tuple(range(d_bound.ndim - jnp.ndim(lower_bound))))
  return d_forget.astype(forget_logits.dtype), d_bound.astype(lower_bound.dtype), None


hgrn2_gate.defvjp(_hgrn2_gate_fwd, _hgrn2_gate_bwd)


class HGRN2Mixer(base.TokenMixer):
  @classmethod
  def model_parameters(cls, config, num_layers, *, rngs):
    # Zero logits: uniform softmax over layers, so lower bounds start at l/L (FLA's init). A hybrid's bounds
    # rise over its HGRN2 layers alone.
    return {
      "lower_bound_logits": layers.make_param(
        rngs,
        (num_layers, config.d_model),
        ("layers", "embed"),
        std=0.0,
        dtype=jnp.dtype(config.param_dtype),
        init="zeros",
      )
    }

  @classmethod
  def layer_inputs(cls, model, num_layers):
    del num_layers  # the rows of lower_bound_logits
    return {"lower_bound": hgrn2_lower_bounds(model.lower_bound_logits[...])}

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    d, heads, head_dim = config.d_model, config.num_heads, config.head_dim
    kwargs = dict(std=config.init_std, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.in_proj = layers.Linear(d, (3, heads, head_dim), ("embed", None, "heads", "kv"), **kwargs)
    self.out_proj = layers.Linear(heads * head_dim, d, ("heads", "embed"), **kwargs)

  def _project(self, x, layer_inputs):
    dtype = jnp.dtype(self.config.dtype)
    proj = self.in_proj(x, dtype)
    v, q, forget_logits = proj[..., 0, :, :], proj[..., 1, :, :], proj[..., 2, :, :]
    lower_bound = layer_inputs["lower_bound"].reshape(self.config.num_heads, self.config.head_dim)
    k, log_decay = hgrn2_gate(forget_logits, lower_bound, layer_inputs["index"], dtype)
    return jax.nn.silu(q), k, v, log_decay

  def _output(self, attended):
    dtype = jnp.dtype(self.config.dtype)
    attended = layers.constrain(attended, ("activation_batch", "activation_length", "activation_heads", None))
    normed = layers.sharded_gated_rms_norm(
      attended.reshape(*attended.shape[:-2], -1), eps=self.config.norm_eps, backend=self.config.norm_backend
    )
    return self.out_proj(normed, dtype)

  def __call__(self, x, *, segment_ids, positions, layer_inputs, max_length=None):
    del positions
    q, k, v, log_decay = self._project(x, layer_inputs)
    result = layers.sharded_linear_attention(
      q,
      k,
      v,
      log_decay,
      segment_ids=segment_ids,
      return_final_state=max_length is not None,
      backend=self.config.linear_attention_backend,
      chunk_size=self.config.chunk_size,
      gpu_overrides=self.config.linear_attention_gpu_overrides,
    )
    if max_length is None:
      return self._output(result), None
    attended, state = result
    return self._output(attended), {"state": state}

  def decode(self, x, cache, *, positions, layer_inputs, context):
    del positions, context
    q, k, v, log_decay = self._project(x, layer_inputs)
    attended, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], cache["state"], log_decay[:, 0])
    return self._output(attended[:, None]), {"state": state}
