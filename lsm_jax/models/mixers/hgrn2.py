"""HGRN2 token mixer: gated linear RNN with outer-product state expansion (arXiv 2406.16690
Eqs. 12-13; code semantics of hgru2-pytorch and FLA).

  v, q, f = split(x W_in)                   one d -> 3d projection, in that order
  q = SiLU(q)
  λ = lb_l + (1 - lb_l) σ(f)                per key channel; lb_l from `layer_inputs["lower_bound"]`
  log λ = logaddexp(log lb_l, log1p(-lb_l) + logσ(f))   (stable; layer 0 has lb = 0 so log λ = logσ(f))
  k = 1 - λ
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


def hgrn2_log_forget_gate(forget_logits, lower_bound, layer_index):
  """log λ in fp32 for forget logits [..., H, D], lower bound [H, D] and the (possibly traced) layer index.
  Layer 0 takes logσ(f) exactly; the `where` on the bound keeps log(0) out of every gradient."""
  log_sigmoid = jax.nn.log_sigmoid(forget_logits)
  is_first = layer_index == 0
  safe_bound = jnp.where(is_first, 0.5, lower_bound)
  bounded = jnp.logaddexp(jnp.log(safe_bound), jnp.log1p(-safe_bound) + log_sigmoid)
  return jnp.where(is_first, log_sigmoid, bounded)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def hgrn2_gate(forget_logits, lower_bound, layer_index, dtype):
  """(k = 1 - λ in `dtype`, log λ in fp32) for forget logits [..., H, D] in any float dtype.

  The custom VJP keeps the backward to one elementwise pass over the logits: autodiff of the log-space formula
  above saves several fp32 intermediates per element and splits the gradient over four memory-bound fusions.
  With g = ∂L/∂log λ - λ ∂L/∂k (k = -expm1(log λ)), s = σ(f) and λ = lb + (1 - lb) s:
    ∂L/∂f = g (1 - lb) s (1 - s) / λ,   ∂L/∂lb = Σ g (1 - s) / λ,
  both formed as exponentials of log-space sums, so no factor underflows or divides by zero.
  """
  log_decay = hgrn2_log_forget_gate(forget_logits.astype(jnp.float32), lower_bound, layer_index)
  return (-jnp.expm1(log_decay)).astype(dtype), log_decay


def _hgrn2_gate_fwd(forget_logits, lower_bound, layer_index, dtype):
  return hgrn2_gate(forget_logits, lower_bound, layer_index, dtype), (forget_logits, lower_bound, layer_index)


def _hgrn2_gate_bwd(dtype, residuals, cotangents):
  del dtype
  forget_logits, lower_bound, layer_index = residuals
  d_k, d_log_decay = cotangents
  forget = forget_logits.astype(jnp.float32)
  log_decay = hgrn2_log_forget_gate(forget, lower_bound, layer_index)
  g = d_log_decay - d_k.astype(jnp.float32) * jnp.exp(log_decay)
  is_first = layer_index == 0
  safe_bound = jnp.where(is_first, 0.5, lower_bound)
  log_one_minus_s = jax.nn.log_sigmoid(-forget)
  # Layer 0 (lb = 0): λ = s, so ∂log λ/∂f = 1 - s; its bound is the constant 0 and gets no gradient.
  log_bounded_share = jnp.where(is_first, 0.0, jnp.log1p(-safe_bound) + jax.nn.log_sigmoid(forget) - log_decay)
  d_forget = g * jnp.exp(log_bounded_share + log_one_minus_s)
  d_bound = jnp.where(is_first, 0.0, g * jnp.exp(log_one_minus_s - log_decay))
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
    normed = layers.simple_rms_norm(attended.reshape(*attended.shape[:-2], -1), self.config.norm_eps)
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
