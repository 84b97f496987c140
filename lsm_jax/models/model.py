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

Each layer's token mixer comes from the layer pattern (`config.layer_mixers`: the architecture's own mixer in
every layer, or a hybrid's mix of linear and softmax layers, lsm_jax/layer_pattern.py); norms and GLU are the
architecture's in every layer. The hooks run once per distinct mixer, each counting and indexing its own layers.

Layers are either an `nnx.List` of blocks or, with `config.scan_layers`, one stack of blocks per run of the
pattern's groups (`layer_pattern.layer_groups`), parameters stacked on a leading "layers" axis (built with
nnx.vmap) and applied with `lax.scan` over the repetitions of the block (and over the layers of a run longer than
one), so one layer per run is compiled instead of L; `config.unroll_layers` applies the stacks' layers one by one
instead (every layer compiled, the stacked layout kept). A pure model has a single run: `layers` is its stack. Per-layer
constants (the layer's rank among its mixer's layers and those of the mixer's `layer_inputs` hook: TNL decays,
HGRN2 lower bounds) are scanned inputs. Both layouts draw layer l's parameters from the same key, so they
initialise identically; decoding caches have one layout in both: per run, stacked on [layers of the run].
`config.remat_policy` wraps the per-layer function in `jax.checkpoint` in both layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lsm_jax import layer_pattern
from lsm_jax.models import layers
from lsm_jax.models.configs import ModelConfig
from lsm_jax.models.mixers import ARCHITECTURES, MIXERS
from pallas_kernels.linear_attention.gpu.forward import FUSED_FORWARD_STATES

# Primitives of the token mixers' fused kernels: the Pallas linear-attention kernels and cuDNN flash attention's
# forward (its output and softmax statistics). jax 0.10 and 0.11 name them so.
_MIXER_KERNEL_PRIMITIVES = frozenset({"pallas_call", "dot_product_attention_fwd_wrapper"})
# HGRN2's per-chunk states and chunk-local gates are residuals of its GPU op (its backward then runs no forward
# state scan), as are those of a fused forward that stores its states (GpuKernelConfig.fused_forward_states).
# dots_and_mixer_kernels_saveable recomputes them, dots_and_all_mixer_kernels_saveable keeps them:
# H200, HGRN2 1B at 8K, 60,386 tokens/s in 54.2 GiB recomputed, 61,373 in 66.2 GiB kept (docs/performance.md).
_STATE_KERNELS = frozenset({"linear_attention_state_scan", "linear_attention_chunk_sums", FUSED_FORWARD_STATES})


def pallas_kernel_name(params) -> str:
  """A pallas_call's kernel name from its equation params (jax 0.10 passes it as "name", later versions in
  name_and_src_info)."""
  info = params.get("name_and_src_info")
  return params.get("name", "") if info is None else info.name


def _mixer_kernel_outputs(keep_states):
  """Under dots_saveable alone the backward re-runs every layer's attention forward (its outputs are not dots):
  a third of HGRN2's kernel time per layer. The policy keeps the kernels' values the backward reads (the output
  and the op's residuals such as HGRN2's intra-chunk scores), the per-chunk states (_STATE_KERNELS) only with
  keep_states."""

  def saveable(prim, *_, **params):
    if prim.name != "pallas_call":
      return prim.name in _MIXER_KERNEL_PRIMITIVES
    return keep_states or pallas_kernel_name(params) not in _STATE_KERNELS

  return saveable


_REMAT_POLICIES = {
  "full": None,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_and_mixer_kernels_saveable": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable, _mixer_kernel_outputs(keep_states=False)
  ),
  "dots_and_all_mixer_kernels_saveable": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable, _mixer_kernel_outputs(keep_states=True)
  ),
}


def _norm(config: ModelConfig, *, rngs: nnx.Rngs):
  if ARCHITECTURES[config.arch].norm_gain:
    return layers.RMSNorm(config.d_model, config.norm_eps, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
  return layers.SRMSNorm(config.norm_eps, config.norm_backend)


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
      fused=config.fused_mlp,
      glu_backend=config.glu_backend,
    )

  # The norms take the residual stream and hand it back (norm.residual): the fused kernels add the mixer's output
  # into the stream as they normalize it, and add the stream's cotangent to the norm's in one backward pass.
  def _channel_mix(self, x, mixed):
    x, normed = self.mlp_norm.residual(x, mixed)
    x = x + self.mlp(normed, jnp.dtype(self.config.dtype))
    return layers.constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def __call__(self, x, *, segment_ids, positions, layer_inputs, max_length=None):
    x, normed = self.mixer_norm.residual(x)
    mixed, cache = self.mixer(
      normed, segment_ids=segment_ids, positions=positions, layer_inputs=layer_inputs, max_length=max_length
    )
    return self._channel_mix(x, mixed), cache

  def decode(self, x, cache, *, positions, layer_inputs, context):
    x, normed = self.mixer_norm.residual(x)
    mixed, cache = self.mixer.decode(normed, cache, positions=positions, layer_inputs=layer_inputs, context=context)
    return self._channel_mix(x, mixed), cache


@jax.custom_vjp
def _unstack_leaf(a):
  return tuple(a[i] for i in range(a.shape[0]))


def _unstack_leaf_fwd(a):
  return _unstack_leaf(a), None


def _unstack_leaf_bwd(_, grads):
  # One stack of the layers' gradients; slicing's own transpose would pad each to the whole stack and add them.
  return (jnp.stack(grads),)


_unstack_leaf.defvjp(_unstack_leaf_fwd, _unstack_leaf_bwd)


def unstack(tree, count: int) -> list:
  """A tree of [count, ...] leaves as `count` trees of one layer each."""
  leaves, treedef = jax.tree.flatten(tree)
  per_leaf = [_unstack_leaf(leaf) for leaf in leaves]
  return [jax.tree.unflatten(treedef, [slices[i] for slices in per_leaf]) for i in range(count)]


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
    for mixer, count in layer_pattern.mixer_counts(config.pattern, config.num_layers).items():
      for name, value in MIXERS[mixer].model_parameters(config, count, rngs=rngs).items():
        if hasattr(self, name):
          raise ValueError(f"mixer {mixer!r} sets model parameter {name!r}, which another mixer already set.")
        setattr(self, name, value)
    layer_keys = jax.random.split(rngs.params(), config.num_layers)
    if config.scan_layers:
      stacks = [self._block_stack(MIXERS[run.mixer], layer_keys[jnp.asarray(run.flat_layers)]) for run in self._runs]
      self.layers = stacks[0] if len(stacks) == 1 else nnx.List(stacks)
    else:
      self.layers = nnx.List(
        [Block(config, MIXERS[mixer], rngs=nnx.Rngs(params=key)) for mixer, key in zip(config.layer_mixers, layer_keys)]
      )
    self.final_norm = _norm(config, rngs=rngs)

  # ---------------------------------------------------------------- helpers

  def _block_stack(self, mixer_type, keys):
    """Blocks of one mixer, one per key, with parameters stacked on a leading "layers" axis."""
    config = self.config
    make_block = nnx.vmap(
      lambda key: Block(config, mixer_type, rngs=nnx.Rngs(params=key)),
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    return make_block(keys)

  @property
  def _dtype(self):
    return jnp.dtype(self.config.dtype)

  @property
  def _groups(self) -> tuple[tuple[layer_pattern.LayerRun, ...], ...]:
    return layer_pattern.layer_groups(self.config.pattern, self.config.num_layers)

  @property
  def _runs(self) -> list[layer_pattern.LayerRun]:
    return [run for group in self._groups for run in group]

  @property
  def _mixer_types(self):
    """The distinct token mixers of the layers, in the order they first appear."""
    return [MIXERS[mixer] for mixer in layer_pattern.mixer_counts(self.config.pattern, self.config.num_layers)]

  def _per_run(self, tree) -> list:
    """A layers-level tree (the `layers` module, decoding caches) as one entry per run: a single-run model keeps
    the entry itself, a hybrid a list of them."""
    return [tree] if len(self._runs) == 1 else list(tree)

  def _from_runs(self, entries: list):
    return entries[0] if len(self._runs) == 1 else list(entries)

  def _layer_inputs(self) -> list[dict]:
    """Per run: the constants of its layers stacked on a leading [layers of the run] axis (scanned inputs)."""
    counts = layer_pattern.mixer_counts(self.config.pattern, self.config.num_layers)
    per_mixer = {
      mixer: {"index": jnp.arange(count, dtype=jnp.int32), **MIXERS[mixer].layer_inputs(self, count)}
      for mixer, count in counts.items()
    }
    mixers = self.config.layer_mixers
    ranks = [mixers[:layer].count(mixer) for layer, mixer in enumerate(mixers)]
    inputs = []
    for run in self._runs:
      run_ranks = [ranks[layer] for layer in run.flat_layers]
      if run_ranks == list(range(counts[run.mixer])):
        inputs.append(per_mixer[run.mixer])  # a pure model: every layer, in order
      else:
        inputs.append(jax.tree.map(lambda a, rows=jnp.asarray(run_ranks): a[rows], per_mixer[run.mixer]))
    return inputs

  def _run_layers(self, layer_fn, x, per_run):
    """x <- layer_fn(block, x, inputs of layer l) for every layer l in order, where `per_run` holds one tree per
    run stacked on [layers of the run]; returns (x, the per-layer outputs stacked the same way)."""
    policy = self.config.remat_policy

    def apply(graphdef, block_state, x, layer_input):
      return layer_fn(nnx.merge(graphdef, block_state), x, layer_input)

    if policy != "none":
      apply = jax.checkpoint(apply, policy=_REMAT_POLICIES[policy], static_argnums=(0,))
    runs = self._runs
    if not self.config.scan_layers or self.config.unroll_layers:
      position = {layer: (k, j) for k, run in enumerate(runs) for j, layer in enumerate(run.flat_layers)}
      if self.config.scan_layers:  # stacked parameters, applied one layer at a time
        split = [nnx.split(stack) for stack in self._per_run(self.layers)]
        states = [unstack(state, len(run.flat_layers)) for (_, state), run in zip(split, runs)]
        layer_blocks = [(split[k][0], states[k][j]) for k, j in map(position.get, range(self.config.num_layers))]
      else:
        layer_blocks = [nnx.split(block) for block in self.layers]
      outputs = []
      for layer, (graphdef, block_state) in enumerate(layer_blocks):
        k, j = position[layer]
        x, output = apply(graphdef, block_state, x, jax.tree.map(lambda a, j=j: a[j], per_run[k]))
        outputs.append(output)
      stacked = [
        jax.tree.map(lambda *leaves: jnp.stack(leaves), *[outputs[i] for i in run.flat_layers]) for run in runs
      ]
      return x, stacked

    stacks = self._per_run(self.layers)
    results = []
    first = 0
    for group in self._groups:
      members = range(first, first + len(group))
      first += len(group)
      graphdefs, scanned = [], []
      for k, run in zip(members, group):
        graphdef, state = nnx.split(stacks[k])
        graphdefs.append(graphdef)
        # [repeats × length, ...] -> [repeats, length, ...]: the group's scan takes a repetition, the run's a layer.
        fold = lambda a, run=run: a if run.length == 1 else a.reshape(run.repeats, run.length, *a.shape[1:])  # noqa: E731
        scanned.append(jax.tree.map(fold, (state, per_run[k])))

      def repetition(x, scanned, group=group, graphdefs=graphdefs):
        outputs = []
        for run, graphdef, (state, inputs) in zip(group, graphdefs, scanned):
          if run.length == 1:
            x, output = apply(graphdef, state, x, inputs)
          else:
            x, output = jax.lax.scan(lambda x, xs, g=graphdef: apply(g, xs[0], x, xs[1]), x, (state, inputs))
          outputs.append(output)
        return x, outputs

      x, outputs = jax.lax.scan(repetition, x, scanned)
      results.extend(
        jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), output) if run.length > 1 else output
        for run, output in zip(group, outputs)
      )
    return x, results

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
    x, embed_state = self._embed(tokens), {}
    for mixer_type in self._mixer_types:
      x, entries = mixer_type.embed(self, x, segment_ids)
      embed_state.update(entries)

    def layer_fn(block, x, layer_input):
      return block(x, segment_ids=segment_ids, positions=positions, layer_inputs=layer_input, max_length=max_length)

    x, caches = self._run_layers(layer_fn, x, self._layer_inputs())
    hidden = self.final_norm(x)
    if max_length is None:
      return hidden, None
    state = {
      "layers": self._from_runs(caches),
      "positions": positions[:, -1] + 1,
      "segment": segment_ids[:, -1],
      "index": jnp.asarray(tokens.shape[1], jnp.int32),
      **embed_state,
    }
    for mixer_type in self._mixer_types:
      state.update(mixer_type.prefill_state(segment_ids, max_length))
    return hidden, state

  def prefill(self, tokens, *, segment_ids, positions, max_length):
    """Runs the prompt [B,T] and returns (logits [B,T,V] float32, decode_state). Left-padded prompts: padding
    has segment id 0, the prompt id 1, positions restart at 0 at the prompt. `max_length` bounds prompt plus
    generated tokens (the KV cache size of softmax layers; a linear layer's state is O(1) in it). The state's
    "layers" entry holds each layer's cache (KV for softmax layers, the recurrent state for linear ones), stacked
    per run of the layer pattern: one stack for a pure model, a list of them for a hybrid."""
    if not isinstance(max_length, int) or max_length < tokens.shape[-1]:
      raise ValueError(f"max_length must be an int >= the prompt length {tokens.shape[-1]}; got {max_length!r}.")
    hidden, state = self._forward(tokens, segment_ids, positions, max_length=max_length)
    return self.logits_from_hidden(hidden), state

  def decode_step(self, tokens, decode_state):
    """One token per row: tokens [B] int -> (logits [B,V] float32, the updated decode_state). With softmax
    layers at most `max_length` tokens in all fit the cache; later writes are clamped by dynamic_update_slice."""
    if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
        f"decode_step tokens must be [batch] integers; got shape {tuple(tokens.shape)} dtype {tokens.dtype}."
      )
    state = dict(decode_state)
    x = self._embed(tokens[:, None])
    for mixer_type in self._mixer_types:
      x, updated = mixer_type.embed_step(self, x, state)
      state.update(updated)
    context = {"index": state["index"], "segment": state["segment"]}
    for mixer_type in self._mixer_types:
      updated, mixer_context = mixer_type.decode_context(state)
      state.update(updated)
      context.update(mixer_context)
    positions = state["positions"][:, None]

    def layer_fn(block, x, layer_input):
      return block.decode(x, layer_input["cache"], positions=positions, layer_inputs=layer_input, context=context)

    per_run = [
      {**inputs, "cache": cache}
      for inputs, cache in zip(self._layer_inputs(), self._per_run(state["layers"]), strict=True)
    ]
    x, caches = self._run_layers(layer_fn, x, per_run)
    state["layers"] = self._from_runs(caches)
    state["positions"] = state["positions"] + 1
    state["index"] = state["index"] + 1
    return self.logits_from_hidden(self.final_norm(x))[:, 0], state


def build_model(config: ModelConfig, *, rngs: nnx.Rngs) -> LanguageModel:
  """Instantiates the LanguageModel of `config` (use under nnx.eval_shape for shapes without memory)."""
  return LanguageModel(config, rngs=rngs)
