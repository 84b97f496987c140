"""Helpers shared by the backend tests: random inputs, the float64 ground truth and the error metric."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.linear_attention import common, reference

# Per-step log-decay ranges, drawn as -exp(U(log lo, log hi)): weak (TNL's last layers), strong (HGRN2 gates
# near 0, down to e^-10 per step).
DECAY_RANGES = {"weak": (1e-3, 0.1), "strong": (0.5, 10.0)}


def relative_rms_error(actual, expected):
  """‖actual − expected‖₂ / ‖expected‖₂ in float64; NaN/inf never pass."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  if not np.all(np.isfinite(actual)):
    return np.inf
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def random_inputs(
  seed,
  *,
  batch,
  time,
  heads,
  dim_k,
  dim_v,
  decay_mode,
  strength="weak",
  dtype=jnp.float32,
  segments=True,
  initial_state=True,
  document_start_rate=0.06,
):
  """Fresh random q, k, v, log_decay (None / [H] / [B,T,H] / [B,T,H,Dk]), initial state and segment ids.

  Segment ids repeat (0,1,0,...) so a backend that matches ids instead of detecting changes fails, and one
  reset sits exactly on t=64, a common chunk boundary (on t=T/2 in shorter rows). A document starts at each token
  with probability document_start_rate (short documents by default: most chunks hold several)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q = normal(batch, time, heads, dim_k) / np.sqrt(dim_k)
  k = normal(batch, time, heads, dim_k)
  v = normal(batch, time, heads, dim_v)
  low, high = DECAY_RANGES[strength]
  draw_decay = lambda *shape: -np.exp(rng.uniform(np.log(low), np.log(high), size=shape)).astype(np.float32)
  log_decay = {
    "none": None,
    "scalar": lambda: draw_decay(heads),
    "token": lambda: draw_decay(batch, time, heads),
    "vector": lambda: draw_decay(batch, time, heads, dim_k),
  }[decay_mode]
  log_decay = None if log_decay is None else jnp.asarray(log_decay())
  state = jnp.asarray(normal(batch, heads, dim_k, dim_v)) if initial_state else None
  segment_ids = None
  if segments:
    starts = rng.random((batch, time)) < document_start_rate
    starts[:, min(64, time // 2)] = True
    starts[:, 0] = False
    segment_ids = jnp.asarray(np.cumsum(starts, axis=1) % 2, jnp.int32)
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), log_decay, state, segment_ids


def _run_with_vjp(fn, chunk_size, diff_args, segment_ids, output_cotangent, state_cotangent):
  """Outputs, final state and input gradients of Σ o·do + Σ S_T·dS_T for fn(q, k, v, log_decay,
  initial_state, segment_ids, chunk_size); `diff_args` holds the present (not None) array arguments."""

  def run(diff_args):
    full = {"log_decay": None, "initial_state": None, **diff_args}
    return fn(full["q"], full["k"], full["v"], full["log_decay"], full["initial_state"], segment_ids, chunk_size)

  (out, final_state), vjp = jax.vjp(run, diff_args)
  (grads,) = vjp((output_cotangent.astype(out.dtype), state_cotangent.astype(final_state.dtype)))
  return out, final_state, grads


# Module-level jit: cases with equal shapes (e.g. weak and strong decays) compile once.
_jitted_run_with_vjp = jax.jit(_run_with_vjp, static_argnums=(0, 1))


def _present(**arrays):
  return {name: x for name, x in arrays.items() if x is not None}


@functools.cache
def _reference_with_feature_map(feature_map):
  """The recurrence of (φ(q), φ(k), v), one function object per feature map (a static jit argument)."""
  if feature_map is None:
    return reference.linear_attention_recurrent_with_chunk

  def mapped(q, k, v, *rest):
    q, k = common.apply_feature_map(feature_map, q), common.apply_feature_map(feature_map, k)
    return reference.linear_attention_recurrent_with_chunk(q, k, v, *rest)

  return mapped


def reference_float64(
  q, k, v, log_decay, initial_state, segment_ids, output_cotangent, state_cotangent, feature_map=None
):
  """Float64 recurrent outputs, final state and gradients of Σ o·do + Σ S_T·dS_T, as numpy arrays; with a
  feature map φ (common.FEATURE_MAPS), those of the attention of φ(q), φ(k), v, differentiated through φ.

  Returns (out, final_state, grads) with grads a dict over q, k, v, log_decay, initial_state (present ones)."""
  with jax.enable_x64(True):
    to64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    diff_args = _present(q=to64(q), k=to64(k), v=to64(v), log_decay=to64(log_decay), initial_state=to64(initial_state))
    out, final_state, grads = _jitted_run_with_vjp(
      _reference_with_feature_map(feature_map),
      None,
      diff_args,
      segment_ids,
      to64(output_cotangent),
      to64(state_cotangent),
    )
    return np.asarray(out), np.asarray(final_state), {name: np.asarray(g) for name, g in grads.items()}


def backend_with_grads(
  fn, chunk_size, q, k, v, log_decay, initial_state, segment_ids, output_cotangent, state_cotangent
):
  """Runs a backend fn(q, k, v, log_decay, initial_state, segment_ids, chunk_size) and its VJP for the same
  loss as `reference_float64`, jitted (fn and chunk_size static)."""
  diff_args = _present(q=q, k=k, v=v, log_decay=log_decay, initial_state=initial_state)
  return _jitted_run_with_vjp(fn, chunk_size, diff_args, segment_ids, output_cotangent, state_cotangent)
