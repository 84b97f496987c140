"""The "pallas_gpu" op: input checks, the plan of one call and the custom_vjp tying the forward to the backward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention.common import apply_feature_map, mapped_slices
from pallas_kernels.linear_attention.gpu.backward import backward, backward_packed
from pallas_kernels.linear_attention.gpu.blocks import KERNEL_FEATURE_MAPS
from pallas_kernels.linear_attention.gpu.config import (
  GpuKernelConfig,
  checked_overrides,
  default_config,
  effective_chunk,
)
from pallas_kernels.linear_attention.gpu.forward import forward
from pallas_kernels.linear_attention.gpu.planning import Plan, packed_slots

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_WIDE_DIM = 128  # largest Dk/Dv the kernels take with 32-bit inputs


def fits_shared_memory(dtype, dim_k, dim_v) -> bool:
  """Whether the kernels' blocks fit the 227 KB of shared memory of an H100/H200 block: 32-bit inputs with a
  256-wide head would need 256-320 KB."""
  return jnp.dtype(dtype).itemsize < 4 or max(dim_k, dim_v) <= MAX_WIDE_DIM


def decay_mode(log_decay) -> str:
  """ "none", "scalar" (log_decay [H]), "token" (log_decay [B,T,H]) or "vector" (log_decay [B,T,H,Dk])."""
  return "none" if log_decay is None else {1: "scalar", 3: "token", 4: "vector"}[log_decay.ndim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _linear_attention(q, k, v, log_decay, initial_state, segment_ids, plan):
  return forward(plan, q, k, v, log_decay, initial_state, segment_ids)[0]


def _forward_with_residuals(plan, q, k, v, log_decay, initial_state, segment_ids):
  """(the outputs, the residuals the backward needs: (initial_state, segment_ids, saved, marker)) from the
  custom_vjp's wrapped primals (q, k, v: Slots of a packed projection, or arrays)."""
  # symbolic_zeros: the primals arrive wrapped, telling whether a decay gradient is wanted at all (TNL's decay
  # is a fixed buffer); only then does the backward pay for its terms (and fp32 dq/dk operands for a decay per token or
  # per key channel).
  wants_decay_grad = log_decay is not None and log_decay.perturbed
  # The backward takes the forward's chunk-local gates (fla saves its g_cumsum too) and, from the unfused forward
  # (or the fused one with config.fused_forward_states), its per-chunk states: O((T/C)·Dk·Dv) more memory than
  # fla keeps, one state scan less than it runs.
  # log_decay's value is not needed: a zero-size marker of its dtype says that its gradient is wanted.
  log_decay, initial_state, segment_ids = (
    None if x is None else x.value for x in (log_decay, initial_state, segment_ids)
  )
  outputs, saved = forward(plan, q, k, v, log_decay, initial_state, segment_ids)
  marker = jnp.zeros((0,), log_decay.dtype) if wants_decay_grad else None
  return outputs, (initial_state, segment_ids, saved, marker)


def _linear_attention_fwd(q, k, v, log_decay, initial_state, segment_ids, plan):
  q, k, v = (x.value for x in (q, k, v))
  outputs, residuals = _forward_with_residuals(plan, q, k, v, log_decay, initial_state, segment_ids)
  return outputs, (q, k, v, *residuals)


_linear_attention.defvjp(_linear_attention_fwd, backward, symbolic_zeros=True)


def _mapped_queries_keys(plan, qkv):
  """φ(q), φ(k) [B,T,2,H,D] in one XLA pass over the projection, None without a feature map: the kernels read them
  as they read the projection (the map applied as the kernels load their rows spilled their registers)."""
  return None if plan.feature_map is None else apply_feature_map(plan.feature_map, qkv[:, :, :2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _packed_linear_attention(qkv, log_decay, initial_state, segment_ids, plan):
  slots = packed_slots(qkv, _mapped_queries_keys(plan, qkv))
  return forward(plan, *slots, log_decay, initial_state, segment_ids)[0]


def _packed_linear_attention_fwd(qkv, log_decay, initial_state, segment_ids, plan):
  qkv = qkv.value
  mapped = _mapped_queries_keys(plan, qkv)
  outputs, residuals = _forward_with_residuals(plan, *packed_slots(qkv, mapped), log_decay, initial_state, segment_ids)
  return outputs, (qkv, mapped, *residuals)


_packed_linear_attention.defvjp(_packed_linear_attention_fwd, backward_packed, symbolic_zeros=True)


def _resolved_config(config, mode, shape, dtype, chunk_size, overrides):
  if config is not None and not isinstance(config, GpuKernelConfig):
    raise TypeError(f"pallas_gpu: config is a {type(config).__name__}; valid: None or a GpuKernelConfig.")
  config = default_config(mode, shape, dtype) if config is None else config
  config = dataclasses.replace(config, **dict(checked_overrides(overrides)))
  return config if chunk_size is None else dataclasses.replace(config, chunk_size=chunk_size)


def _check_operands(dtypes, dim_k, dim_v):
  for name, dtype in dtypes.items():
    if dtype not in _SUPPORTED_DTYPES:
      raise TypeError(f"pallas_gpu: {name} has dtype {dtype}; valid: float32, bfloat16, float16.")
  if len(set(dtypes.values())) > 1:
    raise TypeError(f"pallas_gpu: q, k, v must share one dtype; got {', '.join(map(str, dtypes.values()))}.")
  for name, dim in (("dim_k", dim_k), ("dim_v", dim_v)):
    if dim < 16 or dim & (dim - 1):
      raise ValueError(f"pallas_gpu: {name}={dim}; valid: a power of two >= 16 (Triton block rule).")
  dtype = next(iter(dtypes.values()))
  if not fits_shared_memory(dtype, dim_k, dim_v):
    raise ValueError(
      f"pallas_gpu: {jnp.dtype(dtype).name} inputs with dim_k={dim_k}, dim_v={dim_v} need more "
      f"shared memory than an H100/H200 block has (227 KB); valid: dims <= {MAX_WIDE_DIM} for "
      "32-bit inputs, or bfloat16/float16 inputs (backend='xla' takes any)."
    )


def linear_attention_gpu(
  q,
  k,
  v,
  log_decay,
  initial_state,
  segment_ids,
  chunk_size=None,
  config: GpuKernelConfig | None = None,
  overrides=None,
):
  """The "pallas_gpu" backend of `linear_attention` (api.py), with the same arguments.

  Args:
    q, k, v, log_decay, initial_state, segment_ids: as in `linear_attention`.
    chunk_size: tokens per chunk; None: config.chunk_size. Replaces config.chunk_size when given.
    config: the kernels' tuning; None: default_config for this call's decay mode, shape and dtype.
    overrides: GpuKernelConfig knobs to change in that configuration, {knob: value} (checked_overrides).

  Returns:
    (o [B,T,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] float32).
  """
  time = q.shape[1]
  _check_operands({"q": q.dtype, "k": k.dtype, "v": v.dtype}, q.shape[-1], v.shape[-1])
  mode = decay_mode(log_decay)
  config = _resolved_config(config, mode, q.shape, q.dtype, chunk_size, overrides)
  plan = Plan(mode, segment_ids is not None, effective_chunk(config.chunk_size, time), config)
  return _linear_attention(q, k, v, log_decay, initial_state, segment_ids, plan)


def linear_attention_gpu_qkv(
  qkv,
  log_decay,
  initial_state,
  segment_ids,
  chunk_size=None,
  feature_map=None,
  config: GpuKernelConfig | None = None,
  overrides=None,
):
  """The "pallas_gpu" backend of `linear_attention_qkv` (api.py), with the same arguments, config and overrides as
  `linear_attention_gpu`. With config.packed_operands (not for a decay per key channel; a feature map of
  KERNEL_FEATURE_MAPS or none) the kernels read v in place from qkv [B,T,3,H,D] and q, k from it or from their
  feature map's output [B,T,2,H,D], and the dq/dk kernel writes the gradient of qkv whole, through the map's
  gradient; otherwise q, k, v are sliced out and mapped in XLA. Returns (o [B,T,H,D] in qkv's dtype, final_state
  [B,H,D,D] float32)."""
  batch, time, _, heads, dim = qkv.shape
  shape = (batch, time, heads, dim)
  mode = decay_mode(log_decay)
  config = _resolved_config(config, mode, shape, qkv.dtype, chunk_size, overrides)
  if not config.packed_operands or mode == "vector" or feature_map not in (None, *KERNEL_FEATURE_MAPS):
    q, k, v = mapped_slices(qkv, feature_map)
    return linear_attention_gpu(q, k, v, log_decay, initial_state, segment_ids, config=config)
  _check_operands({"qkv": qkv.dtype}, dim, dim)
  plan = Plan(mode, segment_ids is not None, effective_chunk(config.chunk_size, time), config, feature_map)
  return _packed_linear_attention(qkv, log_decay, initial_state, segment_ids, plan)
