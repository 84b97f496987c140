"""Batched scoring and greedy generation on an lsm_jax LanguageModel, with fixed padded shapes.

Both entry points pad the batch to `batch_size` rows and the time axis to a length bucket (powers of two from
`min_bucket`, capped at the context limit), so a whole evaluation compiles a handful of programs rather than
one per request.

- `score`: per-token log-probabilities of right-padded sequences through the full forward pass; the vocabulary
  projection and log-softmax run over time chunks so [batch, time, vocab] logits never exist at once.
- `generate`: left-padded prompts (padding segment id 0, prompt id 1, positions from 0 at the prompt, as
  `LanguageModel.prefill` wants) minus their last token go through `prefill`, whose full logits are discarded
  (XLA drops them: 16K prompts would otherwise need [batch, 16K, 100K] float32); the last prompt token and
  each generated one go through `decode_step`: the recurrent state for the linear models, the KV cache for
  LLaMA. Prompts shorter than two tokens get EOS in front. Generation stops at EOS, a stop string, or
  `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_MIN_BUCKET = 64
_SCORE_CHUNK = 512


def length_bucket(length: int, limit: int, min_bucket: int = DEFAULT_MIN_BUCKET) -> int:
  """The smallest power of two ≥ `length` (at least `min_bucket`), capped at `limit`."""
  if length > limit:
    raise ValueError(f"sequence of {length} tokens exceeds the limit of {limit}")
  bucket = max(min_bucket, 1 << max(0, length - 1).bit_length())
  return min(bucket, limit)


@dataclasses.dataclass(frozen=True)
class ScoredSequence:
  log_probs: np.ndarray  # [n - 1] log p(token_i | tokens_<i) for i = 1..n-1
  is_greedy: np.ndarray  # [n - 1] whether token_i is the argmax


class InferenceEngine:
  """Wraps a LanguageModel (split into graph + params once) with jitted, shape-bucketed score/generate."""

  def __init__(self, model, tokenizer, *, max_length: int, batch_size: int = 8, min_bucket: int = DEFAULT_MIN_BUCKET):
    if max_length < 2 or batch_size < 1:
      raise ValueError(f"need max_length >= 2 and batch_size >= 1, got {max_length} and {batch_size}")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.batch_size = batch_size
    self.min_bucket = min_bucket
    self._graphdef, self._params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("the model carries non-parameter state; the engine only handles nnx.Param state")

  # ------------------------------------------------------------------ scoring

  def score(
    self, sequences: Sequence[Sequence[int]], progress: Callable[[int], object] | None = None
  ) -> list[ScoredSequence]:
    """Log-probabilities of every token after the first, for sequences of 2..max_length + 1 tokens.

    `progress`, if given, is called with the number of sequences each finished batch scored.
    """
    results: list[ScoredSequence | None] = [None] * len(sequences)
    for index, sequence in enumerate(sequences):
      if not 2 <= len(sequence) <= self.max_length + 1:
        raise ValueError(f"sequence {index} has {len(sequence)} tokens; scoring needs 2..{self.max_length + 1}")
    # Longest first, so each batch shares one bucket and the first compile is the largest.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), self.batch_size):
      rows = order[start : start + self.batch_size]
      bucket = length_bucket(len(sequences[rows[0]]) - 1, self.max_length, self.min_bucket)
      inputs = np.zeros((self.batch_size, bucket), np.int32)
      targets = np.zeros((self.batch_size, bucket), np.int32)
      for slot, row in enumerate(rows):
        sequence = np.asarray(sequences[row], np.int32)
        inputs[slot, : len(sequence) - 1] = sequence[:-1]
        targets[slot, : len(sequence) - 1] = sequence[1:]
      log_probs, is_greedy = jax.device_get(_score_batch(self._graphdef, self._params, inputs, targets))
      for slot, row in enumerate(rows):
        length = len(sequences[row]) - 1
        results[row] = ScoredSequence(log_probs[slot, :length].astype(np.float64), is_greedy[slot, :length])
      if progress is not None:
        progress(len(rows))
    return results

  def batch_log_probs(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[B, T] log p(targets) of a loader batch (inputs, targets, segment_ids, positions) of any shape."""
    return np.asarray(
      jax.device_get(
        _score_batch(
          self._graphdef, self._params, batch["inputs"], batch["targets"], batch["segment_ids"], batch["positions"]
        )[0]
      )
    )

  def loglikelihoods(
    self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: Callable[[int], object] | None = None
  ) -> list[tuple[float, bool]]:
    """lm-eval semantics: context + continuation is cut from the left to max_length + 1 tokens; an empty
    context is replaced by EOS; the continuation's tokens are summed. `progress` as in `score`."""
    sequences, lengths = [], []
    for context, continuation in requests:
      if not continuation:
        raise ValueError("a continuation must contain at least one token")
      if len(continuation) > self.max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the context of {self.max_length}")
      context = list(context) or [self.tokenizer.eos_id]
      sequences.append((context + list(continuation))[-(self.max_length + 1) :])
      lengths.append(len(continuation))
    results = []
    for scored, length in zip(self.score(sequences, progress), lengths):
      results.append((float(scored.log_probs[-length:].sum()), bool(scored.is_greedy[-length:].all())))
    return results

  # ---------------------------------------------------------------- generation

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_sequences: Sequence[str] = (),
    max_context: int | None = None,
    progress: Callable[[int], object] | None = None,
  ) -> list[str]:
    """Greedy continuations (text) of token prompts. Prompts are cut from the left so prompt + generation fits
    `max_context` (default: the engine's max_length); text is cut before the first stop string. `progress`, if
    given, is called with the number of prompts each finished batch completed."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_context = max_context or self.max_length
    if max_new_tokens >= max_context:
      raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {max_context} tokens")
    prompt_limit = max_context - max_new_tokens
    # Every prompt needs two tokens (see _generate_batch); a document starts after EOS, so that is the prefix.
    prompts = [
      ([self.tokenizer.eos_id, self.tokenizer.eos_id] + list(prompt))[-max(2, min(len(prompt), prompt_limit)) :]
      for prompt in prompts
    ]
    results: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), self.batch_size):
      rows = order[start : start + self.batch_size]
      texts = self._generate_batch([prompts[row] for row in rows], max_new_tokens, stop_sequences, max_context)
      for row, text in zip(rows, texts):
        results[row] = text
      if progress is not None:
        progress(len(rows))
    return results

  def _generate_batch(self, prompts, max_new_tokens, stop_sequences, max_context) -> list[str]:
    # All but the last prompt token go through prefill, whose [B, T, V] logits are then unused and compiled
    # away; the last token goes through decode_step, whose logits give the first generated token.
    # Left padding takes no positions, so the bucket may exceed max_context - max_new_tokens; capping it at
    # max_context keeps it independent of max_new_tokens.
    bucket = length_bucket(len(prompts[0]) - 1, max_context, self.min_bucket)
    tokens = np.zeros((self.batch_size, bucket), np.int32)
    segment_ids = np.zeros((self.batch_size, bucket), np.int32)
    positions = np.zeros((self.batch_size, bucket), np.int32)
    last_tokens = np.zeros(self.batch_size, np.int32)
    # Unused rows repeat the first prompt: real tokens keep every row's arithmetic ordinary.
    for slot in range(self.batch_size):
      prompt = prompts[slot] if slot < len(prompts) else prompts[0]
      head = prompt[:-1]
      tokens[slot, bucket - len(head) :] = head
      segment_ids[slot, bucket - len(head) :] = 1
      positions[slot, bucket - len(head) :] = np.arange(len(head))
      last_tokens[slot] = prompt[-1]
    # The KV cache size is bucketed too, so generation lengths share compiled programs.
    cache_length = bucket + length_bucket(max_new_tokens + 1, max_new_tokens + 1 + self.min_bucket, self.min_bucket)
    state = _prefill_state(self._graphdef, self._params, tokens, segment_ids, positions, max_length=cache_length)
    next_tokens, state = _decode(self._graphdef, self._params, last_tokens, state)
    generated = np.zeros((len(prompts), max_new_tokens), np.int32)
    finished = np.zeros(len(prompts), bool)
    lengths = np.full(len(prompts), max_new_tokens)
    for step in range(max_new_tokens):
      step_tokens = np.asarray(jax.device_get(next_tokens))[: len(prompts)]
      generated[:, step] = step_tokens
      for slot in np.flatnonzero(~finished):
        if step_tokens[slot] == self.tokenizer.eos_id:
          finished[slot], lengths[slot] = True, step
        elif stop_sequences and _contains_stop(self.tokenizer.decode(generated[slot, : step + 1]), stop_sequences):
          finished[slot], lengths[slot] = True, step + 1
      if finished.all() or step == max_new_tokens - 1:
        break
      next_tokens, state = _decode(self._graphdef, self._params, next_tokens, state)
    return [
      _cut_at_stop(self.tokenizer.decode(generated[slot, : lengths[slot]]), stop_sequences)
      for slot in range(len(prompts))
    ]


def _contains_stop(text: str, stop_sequences: Sequence[str]) -> bool:
  return any(stop in text for stop in stop_sequences)


def _cut_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
  cut = min((text.find(stop) for stop in stop_sequences if stop in text), default=len(text))
  return text[:cut]


# Jitted at module level with the graph as a static argument: engines of equal models (e.g. the milestones
# of one run) share compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def _score_batch(graphdef, params, inputs, targets, segment_ids=None, positions=None):
  """log p(targets | inputs) and argmax == target, [B, T] each; the head runs over time chunks."""
  model = nnx.merge(graphdef, params)
  hidden = model.hidden_states(inputs, segment_ids=segment_ids, positions=positions)
  batch, length, width = hidden.shape
  chunk = min(length, _SCORE_CHUNK)
  if length % chunk:
    chunk = length  # buckets below the chunk size or not divisible: one chunk
  hidden_chunks = hidden.reshape(batch, length // chunk, chunk, width).swapaxes(0, 1)
  target_chunks = targets.reshape(batch, length // chunk, chunk).swapaxes(0, 1)

  def chunk_scores(args):
    hidden_chunk, target_chunk = args
    logits = model.logits_from_hidden(hidden_chunk)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, target_chunk[..., None], axis=-1)[..., 0]
    return target_log_probs, jnp.argmax(logits, axis=-1) == target_chunk

  log_probs, is_greedy = jax.lax.map(chunk_scores, (hidden_chunks, target_chunks))
  return log_probs.swapaxes(0, 1).reshape(batch, length), is_greedy.swapaxes(0, 1).reshape(batch, length)


@functools.partial(jax.jit, static_argnums=0, static_argnames="max_length")
def _prefill_state(graphdef, params, tokens, segment_ids, positions, *, max_length):
  _, state = nnx.merge(graphdef, params).prefill(
    tokens, segment_ids=segment_ids, positions=positions, max_length=max_length
  )
  return state


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, params, tokens, state):
  logits, state = nnx.merge(graphdef, params).decode_step(tokens, state)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), state


def load_model(run_dir: str, step: int | None = None, *, dtype: str | None = None, **config_overrides):
  """(model, tokenizer, run_metadata, checkpoint_metadata) of milestone `step` (default: the latest) of a run.

  config_overrides replace ModelConfig fields for inference (e.g. dtype="float32", linear_attention_backend).
  """
  from lsm_jax import checkpoint
  from lsm_jax.data import tokenizer as tokenizer_lib
  from lsm_jax.models import ModelConfig, build_model

  run_metadata = checkpoint.read_run_metadata(run_dir)
  if step is None:
    steps = checkpoint.list_milestones(run_dir)
    if not steps:
      raise ValueError(f"run {run_dir} has no complete milestone checkpoint")
    step = steps[-1]
  params, checkpoint_metadata = checkpoint.load_milestone(run_dir, step, dtype=dtype)
  config = ModelConfig(**{**run_metadata["model_config"], **config_overrides})
  abstract_model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  nnx.replace_by_pure_dict(abstract_params, params)
  model = nnx.merge(graphdef, abstract_params)
  return model, tokenizer_lib.get_tokenizer(run_metadata["tokenizer"]), run_metadata, checkpoint_metadata
