"""Small helpers shared by the linear-attention backends and their callers."""

from __future__ import annotations

import jax.numpy as jnp


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `value`."""
  return -(-value // multiple) * multiple


def segment_starts(segment_ids, batch: int, time: int):
  """[B,T] bool: true where position t begins a new document (never at t=0); all false without segment_ids."""
  if segment_ids is None:
    return jnp.zeros((batch, time), bool)
  starts = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), bool), starts], axis=1)
