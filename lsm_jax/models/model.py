"""The language model shared by the four architectures (arXiv 2406.16690 Appendices A.1 and C):

  x = Embed(tokens)                     no embedding scaling (HGRN2 `no_scale_embedding=True`)
  [x = mixer.embed(x)]                  once, after the embedding (cosFormer2's TPE)
  for each layer: x = x + Mixer(Norm(x)); x = x + GLU(Norm(x))
  logits = Norm(x) @ Embedᵀ             tied head, fp32 logits

Norm is RMSNorm with a gain for LLaMA and the gain-free SRMSNorm for the linear models; the GLU is SwiGLU for
LLaMA and SGLU for the others. Parameters are fp32, compute runs in `config.dtype`.

Each architecture is an entry of `mixers.ARCHITECTURES`: its token mixer and its norm and GLU flavours. What an
architecture needs beyond its layers (cosFormer2's TPE, HGRN2's lower bounds, TNL's decays, LLaMA's key segment
ids while decoding) comes from its mixer's hooks (mixers/base.py), so the model never branches on the architecture.

Layers are either an `nnx.List` of blocks or, with `config.scan_layers`, one block whose parameters are
stacked on a leading "layers" axis (built with nnx.vmap) and applied with `lax.scan`, so one layer is
compiled instead of L. Per-layer constants (the layer index and those of the mixer's `layer_inputs` hook: TNL
decays, HGRN2 lower bounds) are scanned inputs. Both layouts draw layer l's parameters from the same key, so they
initialise identically.
`config.remat_policy` wraps the per-layer function in `jax.checkpoint` in both layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lsm_jax.models import layers
from lsm_jax.models.configs import ModelConfig
from lsm_jax.models.mixers import ARCHITECTURES

# Primitives of the token mixers' fused kernels: the Pallas linear-attention kernels and cuDNN flash attention's
# forward (its output and softmax statistics). jax 0.10 and 0.11 name them so.
_MIXER_KERNEL_PRIMITIVES = frozenset({"pallas_call", "dot_product_attention_fwd_wrapper"})
# HGRN2's per-chunk states and chunk-local gates are residuals of its GPU op (its backward then runs no forward
# state scan), but kept for every layer they cost more than they save: H200, 1B at 8K, 72.4 GiB and 51,262
# tokens/s kept, 54.4 GiB and 53,249 tokens/s recomputed under remat (docs/performance.md).
_UNSAVED_KERNELS = frozenset({"linear_attention_state_scan", "linear_attention_chunk_sums"})


def pallas_kernel_name(params) -> str:
  """A pallas_call's kernel name from its equation params (jax 0.10 passes it as "name", later versions in
  name_and_src_info)."""
  info = params.get("name_and_src_info")
  return params.get("name", "") if info is None else info.name


def _mixer_kernel_outputs(prim, *_, **params):
  """Under dots_saveable alone the backward re-runs every layer's attention forward (its outputs are not dots):
  a third of HGRN2's kernel time per layer. Only the kernels' values the backward reads are kept (the output and
  the op's residuals such as HGRN2's intra-chunk scores), not the per-chunk states (_UNSAVED_KERNELS)."""
  if prim.name != "pallas_call":
    return prim.name in _MIXER_KERNEL_PRIMITIVES
  return pallas_kernel_name(params) not in _UNSAVED_KERNELS


_REMAT_POLICIES = {
  "full": None,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_and_mixer_kernels_saveable": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable, _mixer_kernel_outputs
  ),
}


def _norm(config: ModelConfig, *, rngs: nnx.Rngs):
  if ARCHITECTURES[config.arch].norm_gain:
    return layers.RMSNorm(config.d_model, config.norm_eps, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
  return layers.SRMSNorm(config.norm_eps)


class Block(nnx.Module):
  """Pre-norm residual block: token mixer then channel mixer."""

  def __init__(self, config: ModelConfig, mixer_type, *, rngs: nnx.Rngs):
    self.config = config
    self.mixer_norm = _norm(config, rngs=rngs)
    self.mlp_norm = _norm(config, rngs=rngs)
    self.mixer = mixer_type(config, rngs=rngs)
    self.mlp = layers.GatedMLP(
      config.d_model,
      config.ffn_dim,
      swish=ARCHITECTURES[config.arch].swish_glu,
      std=config.init_std,
      param_dtype=jnp.dtype(config.param_dtype),
      rngs=rngs,
    )

  def _channel_mix(self, x):
    x = x + self.mlp(self.mlp_norm(x), jnp.dtype(self.config.dtype))
    return layers.constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def __call__(self, x, *, segment_ids, positions, layer_inputs, max_length=None):
    mixed, cache = self.mixer(
      self.mixer_norm(x), segment_ids=segment_ids, positions=positions, layer_inputs=layer_inputs, max_length=max_length
    )
    return self._channel_mix(x + mixed), cache

  def decode(self, x, cache, *, positions, layer_inputs, context):
    mixed, cache = self.mixer.decode(
      self.mixer_norm(x), cache, positions=positions, layer_inputs=layer_inputs, context=context
    )
    return self._channel_mix(x + mixed), cache


class LanguageModel(nnx.Module):
  """Decoder-only LM. See the module docstring and docs/interfaces.md (lsm_jax.models)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise TypeError(f"config must be a lsm_jax.models.configs.ModelConfig; got {type(config).__name__}.")
    self.config = config
    param_dtype = jnp.dtype(config.param_dtype)
    self.embedding = layers.make_param(
      rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), std=config.init_std, dtype=param_dtype
    )
    mixer_type = ARCHITECTURES[config.arch].mixer
    for name, value in mixer_type.model_parameters(config, rngs=rngs).items():
      setattr(self, name, value)
    layer_keys = jax.random.split(rngs.params(), config.num_layers)
    if config.scan_layers:
      make_block = nnx.vmap(
        lambda key: Block(config, mixer_type, rngs=nnx.Rngs(params=key)),
        transform_metadata={nnx.PARTITION_NAME: "layers"},
      )
      self.layers = make_block(layer_keys)
    else:
      self.layers = nnx.List([Block(config, mixer_type, rngs=nnx.Rngs(params=key)) for key in layer_keys])
    self.final_norm = _norm(config, rngs=rngs)

  # ---------------------------------------------------------------- helpers

  @property
  def _dtype(self):
    return jnp.dtype(self.config.dtype)

  @property
  def _mixer_type(self):
    return ARCHITECTURES[self.config.arch].mixer

  def _layer_inputs(self):
    """Per-layer constants with a leading [L] axis (scanned inputs)."""
    return {"index": jnp.arange(self.config.num_layers, dtype=jnp.int32), **self._mixer_type.layer_inputs(self)}

  def _run_layers(self, layer_fn, x, per_layer):
    """x <- layer_fn(block, x, per_layer[l]) for every layer; returns (x, per-layer outputs stacked on [L])."""
    policy = self.config.remat_policy

    def apply(graphdef, block_state, x, layer_input):
      return layer_fn(nnx.merge(graphdef, block_state), x, layer_input)

    if policy != "none":
      apply = jax.checkpoint(apply, policy=_REMAT_POLICIES[policy], static_argnums=(0,))
    if self.config.scan_layers:
      graphdef, stacked_state = nnx.split(self.layers)
      return jax.lax.scan(lambda x, xs: apply(graphdef, xs[0], x, xs[1]), x, (stacked_state, per_layer))
    outputs = []
    for index, block in enumerate(self.layers):
      graphdef, block_state = nnx.split(block)
      x, output = apply(graphdef, block_state, x, jax.tree.map(lambda a, i=index: a[i], per_layer))
      outputs.append(output)
    return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)

  def _check_tokens(self, tokens, segment_ids, positions, *, require_segments=False):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [batch, time]; got shape {tuple(tokens.shape)}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens must have an integer dtype (int32); got {tokens.dtype}.")
    if require_segments and (segment_ids is None or positions is None):
      raise ValueError("prefill needs segment_ids and positions (padding id 0, prompt id 1, positions from 0).")
    for name, value in (("segment_ids", segment_ids), ("positions", positions)):
      if value is None:
        continue
      if tuple(value.shape) != tuple(tokens.shape):
        raise ValueError(f"{name} must have the shape of tokens {tuple(tokens.shape)}; got {tuple(value.shape)}.")
      if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype (int32); got {value.dtype}.")
    if positions is None:
      positions = (
        layers.positions_from_segments(segment_ids)
        if segment_ids is not None
        else jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
      )
    return positions

  def _embed(self, tokens):
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self._dtype)
    return layers.constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  # ---------------------------------------------------------------- public API

  def hidden_states(self, tokens, *, segment_ids=None, positions=None):
    """[B,T] tokens -> [B,T,d] final-normed hidden states in the compute dtype."""
    hidden, _ = self._forward(tokens, segment_ids, positions, max_length=None)
    return hidden

  def __call__(self, tokens, *, segment_ids=None, positions=None):
    """[B,T] int tokens -> [B,T,V] float32 logits. segment_ids [B,T] separate packed documents (state,
    attention and positions never cross a change of id); positions default to per-document offsets."""
    return self.logits_from_hidden(self.hidden_states(tokens, segment_ids=segment_ids, positions=positions))

  def head(self):
    """(W [V, d], compute dtype) of the vocabulary head: logits = hidden·Wᵀ in that dtype with fp32
    accumulation. W is the tied embedding (the trainer's fused loss takes it from here)."""
    return self.embedding[...], self._dtype

  def logits_from_hidden(self, hidden):
    """Tied head: hidden [..., d] @ Embedᵀ with fp32 accumulation -> [..., V] float32."""
    if hidden.shape[-1] != self.config.d_model:
      raise ValueError(f"hidden must end in d_model={self.config.d_model}; got shape {tuple(hidden.shape)}.")
    weight, dtype = self.head()
    return jnp.einsum("...d,vd->...v", hidden.astype(dtype), weight.astype(dtype), preferred_element_type=jnp.float32)

  def _forward(self, tokens, segment_ids, positions, max_length):
    positions = self._check_tokens(tokens, segment_ids, positions, require_segments=max_length is not None)
    x, embed_state = self._mixer_type.embed(self, self._embed(tokens), segment_ids)

    def layer_fn(block, x, layer_input):
      return block(x, segment_ids=segment_ids, positions=positions, layer_inputs=layer_input, max_length=max_length)

    x, caches = self._run_layers(layer_fn, x, self._layer_inputs())
    hidden = self.final_norm(x)
    if max_length is None:
      return hidden, None
    state = {
      "layers": caches,
      "positions": positions[:, -1] + 1,
      "segment": segment_ids[:, -1],
      "index": jnp.asarray(tokens.shape[1], jnp.int32),
      **embed_state,
      **self._mixer_type.prefill_state(segment_ids, max_length),
    }
    return hidden, state

  def prefill(self, tokens, *, segment_ids, positions, max_length):
    """Runs the prompt [B,T] and returns (logits [B,T,V] float32, decode_state). Left-padded prompts: padding
    has segment id 0, the prompt id 1, positions restart at 0 at the prompt. `max_length` bounds prompt plus
    generated tokens (the LLaMA KV cache size; the linear models' state is O(1) in it)."""
    if not isinstance(max_length, int) or max_length < tokens.shape[-1]:
      raise ValueError(f"max_length must be an int >= the prompt length {tokens.shape[-1]}; got {max_length!r}.")
    hidden, state = self._forward(tokens, segment_ids, positions, max_length=max_length)
    return self.logits_from_hidden(hidden), state

  def decode_step(self, tokens, decode_state):
    """One token per row: tokens [B] int -> (logits [B,V] float32, the updated decode_state). For LLaMA at
    most `max_length` tokens in all fit the cache; later writes are clamped by dynamic_update_slice."""
    if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
        f"decode_step tokens must be [batch] integers; got shape {tuple(tokens.shape)} dtype {tokens.dtype}."
      )
    state = dict(decode_state)
    x, updated = self._mixer_type.embed_step(self, self._embed(tokens[:, None]), state)
    state.update(updated)
    updated, mixer_context = self._mixer_type.decode_context(state)
    state.update(updated)
    context = {"index": state["index"], "segment": state["segment"], **mixer_context}
    positions = state["positions"][:, None]

    def layer_fn(block, x, layer_input):
      return block.decode(x, layer_input["cache"], positions=positions, layer_inputs=layer_input, context=context)

    x, state["layers"] = self._run_layers(layer_fn, x, {**self._layer_inputs(), "cache": state["layers"]})
    state["positions"] = state["positions"] + 1
    state["index"] = state["index"] + 1
    return self.logits_from_hidden(self.final_norm(x))[:, 0], state


def build_model(config: ModelConfig, *, rngs: nnx.Rngs) -> LanguageModel:
  """Instantiates the LanguageModel of `config` (use under nnx.eval_shape for shapes without memory)."""
  return LanguageModel(config, rngs=rngs)
