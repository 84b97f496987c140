"""Public API of decay-scan linear attention and its backend dispatch (recurrentgemma-style).

Layout: q, k [batch, time, heads, dim_k]; v [batch, time, heads, dim_v]. Four decay modes, chosen by
the shape of `log_decay` (natural-log decay per step, every value <= 0):
  * None                       no decay (cosFormer2)
  * [heads]                    fixed scalar decay per head (TNL)
  * [batch, time, heads]       data-dependent scalar decay per head and token (Mamba-2, simple GLA)
  * [batch, time, heads, dim_k] data-dependent decay per key channel (HGRN2)
States are [batch, heads, dim_k, dim_v] float32. `segment_ids` [batch, time] marks packed documents: the
state is reset wherever the id changes, so documents never share state. `initial_state` feeds the first
document of each row. No query scaling is applied: callers scale q themselves.

Backends compute the same function:
  "reference"   naive recurrent scan (ground truth, slow)
  "xla"         chunked two-level algorithm in plain JAX (portable; any T)
  "pallas_tpu"  Mosaic TPU kernels
  "pallas_gpu"  Pallas GPU kernels for Hopper
  "auto"        Pallas on TPU and GPU, "xla" elsewhere
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import common, reference

BACKENDS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")
# Module (inside this package) and function implementing each concrete backend. Each function has the
# signature fn(q, k, v, log_decay, initial_state, segment_ids, chunk_size) -> (o, final_state).
_BACKEND_IMPLS = {
  "reference": ("reference", "linear_attention_recurrent_with_chunk"),
  "xla": ("chunked", "linear_attention_chunked"),
  "pallas_tpu": ("tpu", "linear_attention_tpu"),
  "pallas_gpu": ("gpu", "linear_attention_gpu"),
}
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps "auto" to the best backend for `platform` ("tpu", "gpu", "cpu"; None: the default device's).

  Pass the platform when compiling ahead of time for another target (e.g. a TPU topology from a CPU host,
  where jax.default_backend() is still "cpu").
  """
  if backend not in BACKENDS:
    raise ValueError(f"Unknown linear-attention backend {backend!r}; valid: {', '.join(BACKENDS)}.")
  if backend != "auto":
    return backend
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "pallas_tpu"
  if platform == "gpu":
    return "pallas_gpu"
  return "xla"


def _impl(backend: str):
  module_name, fn_name = _BACKEND_IMPLS[backend]
  module = importlib.import_module(f"pallas_kernels.linear_attention.{module_name}")
  return getattr(module, fn_name)


def check_inputs(q, k, v, log_decay=None, initial_state=None, segment_ids=None):
  """Raises a ValueError or TypeError naming the first argument of `linear_attention` with a bad shape or dtype."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      "linear_attention expects q, k, v of rank 4 [batch, time, heads, dim]; got shapes "
      f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}."
    )
  if q.shape != k.shape:
    raise ValueError(
      f"q and k must have the same shape [batch, time, heads, dim_k]; got q{tuple(q.shape)} and k{tuple(k.shape)}."
    )
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must share [batch, time, heads] with q; got v{tuple(v.shape)} and q{tuple(q.shape)}.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in _FLOAT_DTYPES:
      raise TypeError(f"{name} has dtype {x.dtype}; valid: float32, bfloat16, float16, float64.")
  batch, time, heads, dim_k = q.shape
  if log_decay is not None:
    valid = ((heads,), (batch, time, heads), (batch, time, heads, dim_k))
    if tuple(log_decay.shape) not in valid:
      raise ValueError(
        f"log_decay has shape {tuple(log_decay.shape)}; valid: None (no decay), [heads]={valid[0]} "
        f"(fixed per head), [batch, time, heads]={valid[1]} (per head and token) or "
        f"[batch, time, heads, dim_k]={valid[2]} (per key channel)."
      )
    if log_decay.dtype not in _FLOAT_DTYPES:
      raise TypeError(f"log_decay has dtype {log_decay.dtype}; valid: a floating dtype (float32 recommended).")
  if initial_state is not None:
    expected = (batch, heads, dim_k, v.shape[-1])
    if tuple(initial_state.shape) != expected:
      raise ValueError(
        f"initial_state has shape {tuple(initial_state.shape)}; expected [batch, heads, dim_k, dim_v]={expected}."
      )
  if segment_ids is not None:
    if tuple(segment_ids.shape) != (batch, time):
      raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected [batch, time]={(batch, time)}.")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise TypeError(f"segment_ids has dtype {segment_ids.dtype}; valid: an integer dtype.")


def linear_attention(
  q,
  k,
  v,
  log_decay=None,
  *,
  initial_state=None,
  segment_ids=None,
  return_final_state=False,
  backend="auto",
  chunk_size=None,
  gpu_overrides=None,
):
  """Causal decay-scan linear attention. Returns o [B,T,H,Dv] (v.dtype), plus the final state if asked.

  gpu_overrides: {knob: value} of `gpu.GpuKernelConfig` that replace the tuned defaults of the "pallas_gpu" kernels
  (checked on every backend; the others have no such knobs)."""
  check_inputs(q, k, v, log_decay, initial_state, segment_ids)
  gpu_overrides = checked_gpu_overrides(gpu_overrides)
  resolved = resolve_backend(backend)
  if backend == "auto" and resolved == "pallas_gpu":
    from pallas_kernels.linear_attention import gpu

    if not gpu.fits_shared_memory(q.dtype, q.shape[-1], v.shape[-1]):
      resolved = "xla"  # e.g. float32 cosFormer2 (Dk = 256): the GPU kernels' blocks would not fit
  impl = _impl(resolved)
  extra = {"overrides": gpu_overrides} if resolved == "pallas_gpu" else {}
  out, final_state = impl(q, k, v, log_decay, initial_state, segment_ids, chunk_size, **extra)
  return (out, final_state) if return_final_state else out


def checked_gpu_overrides(overrides):
  """`gpu.checked_overrides`: the overrides as sorted (knob, value) pairs, each checked; () for None or empty."""
  if not overrides:
    return ()
  from pallas_kernels.linear_attention.gpu import config as gpu_config

  return gpu_config.checked_overrides(overrides)


def linear_attention_qkv(
  qkv,
  log_decay=None,
  *,
  feature_map=None,
  initial_state=None,
  segment_ids=None,
  return_final_state=False,
  backend="auto",
  chunk_size=None,
  gpu_overrides=None,
):
  """`linear_attention(φ(q), φ(k), v, ...)` of a packed projection qkv [batch, time, 3, heads, dim] whose slots
  0, 1, 2 are q, k, v (dim_k = dim_v), φ the feature map `feature_map` (None: none; "silu": TNL's). The
  "pallas_gpu" backend can read the slots in place and apply φ as its kernels load q and k, its gradient one packed
  array (GpuKernelConfig.packed_operands); the others slice q, k, v out. gpu_overrides: as in `linear_attention`."""
  if qkv.ndim != 5 or qkv.shape[2] != 3:
    raise ValueError(f"qkv has shape {tuple(qkv.shape)}; expected [batch, time, 3, heads, dim] (q, k, v packed).")
  if feature_map is not None and feature_map not in common.FEATURE_MAPS:
    raise ValueError(f"Unknown feature map {feature_map!r}; valid: None, {', '.join(map(repr, common.FEATURE_MAPS))}.")
  # the slices are only checked here (and never computed under jit) when the packed kernels take qkv whole
  check_inputs(*common.mapped_slices(qkv, None), log_decay, initial_state, segment_ids)
  gpu_overrides = checked_gpu_overrides(gpu_overrides)
  resolved = resolve_backend(backend)
  if resolved == "pallas_gpu":
    from pallas_kernels.linear_attention import gpu

    if gpu.fits_shared_memory(qkv.dtype, qkv.shape[-1], qkv.shape[-1]) or backend == "pallas_gpu":
      out, final_state = gpu.linear_attention_gpu_qkv(
        qkv, log_decay, initial_state, segment_ids, chunk_size, feature_map, overrides=gpu_overrides
      )
      return (out, final_state) if return_final_state else out
  q, k, v = common.mapped_slices(qkv, feature_map)
  return linear_attention(
    q,
    k,
    v,
    log_decay,
    initial_state=initial_state,
    segment_ids=segment_ids,
    return_final_state=return_final_state,
    backend=backend,
    chunk_size=chunk_size,
    gpu_overrides=gpu_overrides,
  )


def linear_attention_step(q, k, v, state, log_decay=None):
  """One decoding step with an O(1) state: q,k [B,H,Dk], v [B,H,Dv], state [B,H,Dk,Dv] float32,
  log_decay None / [H] (fixed per head) / [B,H] (this token's decay per head) / [B,H,Dk] (per key channel).
  Returns (o [B,H,Dv] in v.dtype, new state)."""
  batch, heads, dim_k = q.shape
  dtype = reference.compute_dtype(q, k, v, state)
  if log_decay is None:
    decay = jnp.zeros((batch, heads, dim_k), dtype)
  elif log_decay.ndim == 1:
    decay = jnp.broadcast_to(log_decay.astype(dtype)[None, :, None], (batch, heads, dim_k))
  elif log_decay.ndim == 2:
    decay = jnp.broadcast_to(log_decay.astype(dtype)[:, :, None], (batch, heads, dim_k))
  else:
    decay = log_decay.astype(dtype)
  with jax.default_matmul_precision("highest"):
    out, state = reference.recurrent_step(q.astype(dtype), k.astype(dtype), v.astype(dtype), decay, state.astype(dtype))
  return out.astype(v.dtype), state
