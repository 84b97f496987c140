"""The token-mixer interface and its architecture-level hooks.

A mixer runs inside every layer:
  __call__(x [B,T,d], *, segment_ids, positions, layer_inputs, max_length=None) -> (y, cache | None)
      (the decoding cache is returned only for a prefill, i.e. when max_length is given)
  decode(x [B,1,d], cache, *, positions [B,1], layer_inputs, context) -> (y, cache)

Its classmethods are the hooks the shared LanguageModel calls once per model (and per mixer of a hybrid's layer
pattern, which counts and indexes each mixer's layers by themselves), so that everything one architecture
needs beyond its layers (parameters of its own, per-layer constants, a transform of the embeddings, model-level
decoding state) lives in its mixer module and the model never branches on the architecture. The defaults do
nothing. `model` is the LanguageModel: a hook reads its `config` and the attributes its own `model_parameters`
created.
"""

from __future__ import annotations

import jax
from flax import nnx


class TokenMixer(nnx.Module):
  """Base of the token mixers: the architecture-level hooks with their do-nothing defaults."""

  @classmethod
  def model_parameters(cls, config, num_layers: int, *, rngs: nnx.Rngs) -> dict:
    """Model-level modules or parameters for this mixer's `num_layers` layers, set on the LanguageModel under
    these names right after the embedding (and so drawn from the parameter keys in that order)."""
    del config, num_layers, rngs
    return {}

  @classmethod
  def layer_inputs(cls, model, num_layers: int) -> dict[str, jax.Array]:
    """Per-layer constants of this mixer's `num_layers` layers, with that leading axis, scanned in with the
    layer beside "index" (the layer's rank among them)."""
    del model, num_layers
    return {}

  @classmethod
  def embed(cls, model, x, segment_ids) -> tuple[jax.Array, dict]:
    """Transforms the embeddings x [B,T,d] once before the layers (segment_ids [B,T] or None). Returns (x,
    entries of the decoding state that `embed_step` continues from)."""
    del model, segment_ids
    return x, {}

  @classmethod
  def embed_step(cls, model, x, decode_state) -> tuple[jax.Array, dict]:
    """`embed` for one decoded token x [B,1,d]. Returns (x, the decoding-state entries it updated)."""
    del model, decode_state
    return x, {}

  @classmethod
  def prefill_state(cls, segment_ids, max_length: int) -> dict:
    """Model-level decoding-state entries beyond the layers' caches, from the prompt's segment_ids [B,T]."""
    del segment_ids, max_length
    return {}

  @classmethod
  def decode_context(cls, decode_state) -> tuple[dict, dict]:
    """Before a decoding step: (updated decoding-state entries, entries added to every layer's `context`,
    which holds the step's "index" and "segment" [B])."""
    del decode_state
    return {}, {}
