"""Small helpers shared by the linear-attention backends and their callers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Feature maps that `linear_attention_qkv` applies to q and k (TNL's SiLU; None: none).
FEATURE_MAPS = {"silu": jax.nn.silu}


def apply_feature_map(name, x):
  return x if name is None else FEATURE_MAPS[name](x)


def mapped_slices(qkv, feature_map):
  """(φ(q), φ(k), v) sliced out of a packed projection [B, T, 3, H, D]."""
  q, k, v = (qkv[:, :, index] for index in range(3))
  return apply_feature_map(feature_map, q), apply_feature_map(feature_map, k), v


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `value`."""
  return -(-value // multiple) * multiple


def segment_starts(segment_ids, batch: int, time: int):
  """[B,T] bool: true where position t begins a new document (never at t=0); all false without segment_ids."""
  if segment_ids is None:
    return jnp.zeros((batch, time), bool)
  starts = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), bool), starts], axis=1)
