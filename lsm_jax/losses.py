"""The language-model loss: masked token cross-entropy through the vocabulary head, chunked over time with a
fused gradient (custom VJP), so the full [batch, length, vocab] logits are never alive at once."""

import functools

import jax
import jax.numpy as jnp
from flax import linen

from lsm_jax.models import layers
from pallas_kernels import cross_entropy
from pallas_kernels.cross_entropy import api as cross_entropy_api

LOGITS_DTYPES = ("float32", "bfloat16")


def masked_cross_entropy_sums(
  model,
  hidden: jax.Array,
  targets: jax.Array,
  loss_mask: jax.Array,
  loss_chunk_length: int | None,
  logits_dtype: str = "float32",
  backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token losses, sum of the mask), in fp32, through the model's vocabulary head
  (`model.head()`: logits = hidden·Wᵀ with fp32 accumulation).

  `logits_dtype`: what the head's matmul writes its logits in (one of LOGITS_DTYPES). 'bfloat16' halves the
  traffic of the 100K-wide logits, as PyTorch autocast and fla's fused loss do; the log-softmax and its gradient
  are computed in fp32 from them either way.

  With `loss_chunk_length`, the head and the softmax run over time chunks, so the full [batch, length, vocab]
  logits (100K wide) are never alive at once. Under differentiation each chunk's gradient is formed right away in
  the forward pass (the softmax minus the one-hot target, times W and times the hidden states), so the backward
  only scales it: the logits are computed once, not again in the backward as remat would (three matmuls against
  the vocabulary per token instead of four, one softmax instead of two).
  """
  weight, dtype = model.head()
  length = hidden.shape[1]
  chunk = length if loss_chunk_length is None or loss_chunk_length >= length else loss_chunk_length
  if logits_dtype not in LOGITS_DTYPES:
    raise ValueError(f"logits_dtype {logits_dtype!r} is not one of {LOGITS_DTYPES}")
  return _head_cross_entropy_sums(
    hidden,
    weight,
    targets,
    loss_mask.astype(jnp.float32),
    chunk,
    jnp.dtype(dtype),
    jnp.dtype(logits_dtype),
    (
      cross_entropy.resolve_backend(backend),
      cross_entropy.resolve_backend(backend, gpu_default=cross_entropy_api.GPU_GRADIENT_DEFAULT),
    ),
  )


def _time_chunks(x, chunk):
  """[B, T, ...] -> [T / chunk, B, chunk, ...] (the scan axis first)."""
  x = x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _from_time_chunks(x):
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _per_row_shards(fn, backend, logits, rows, outputs):
  """fn(logits [B, c, V], *rows [B, c], backend=...) under the active mesh; `outputs` names each output's layout,
  "rows" or "logits". A Pallas kernel cannot be partitioned by XLA, so it runs per shard of batch and length (rows
  are independent); with the vocabulary split over a mesh axis a row needs a collective, and XLA's form runs."""
  mesh = jax.sharding.get_abstract_mesh()
  if backend == "xla" or mesh.empty or mesh.size == 1:
    return fn(logits, *rows, backend=backend)
  (vocab_axes,) = linen.logical_to_mesh_axes(("vocab",))
  vocab_axes = (vocab_axes,) if isinstance(vocab_axes, str) else tuple(vocab_axes or ())
  if any(mesh.shape.get(axis, 1) > 1 for axis in vocab_axes):
    return fn(logits, *rows, backend="xla")
  shards = layers.KernelShards(jax.ShapeDtypeStruct((*logits.shape[:2], 1, logits.shape[-1]), logits.dtype))
  specs = {
    "rows": jax.sharding.PartitionSpec(shards.batch, shards.length),
    "logits": jax.sharding.PartitionSpec(shards.batch, shards.length, None),
  }
  out_specs = tuple(specs[name] for name in outputs)

  def per_shard(logits, *rows):
    return fn(logits, *rows, backend=backend)

  in_specs = (specs["logits"], *[specs["rows"]] * len(rows))
  return shards.per_shard(per_shard, in_specs, out_specs if len(outputs) > 1 else out_specs[0])(logits, *rows)


def _row_statistics(logits, targets, backend):
  """(log-normaliser, target logit) of [B, c, V] logits, per shard under the active mesh."""
  return _per_row_shards(cross_entropy.row_log_normalizer_and_pick, backend, logits, (targets,), ("rows", "rows"))


def _softmax_gradient(logits, log_normalizer, targets, mask, dtype, backend):
  """d Σ mask · loss / d logits [B, c, V] in dtype, per shard under the active mesh."""

  def gradient(logits, log_normalizer, targets, mask, backend):
    return cross_entropy.softmax_gradient(logits, log_normalizer, targets, mask, dtype, backend=backend)

  return _per_row_shards(gradient, backend, logits, (log_normalizer, targets, mask), ("logits",))


def _chunk_logits(hidden_chunk, weight, target_chunk, logits_dtype, backend):
  """(logits [B, c, V] in logits_dtype, fp32 log-normaliser, fp32 per-token loss) of one chunk; weight already in
  compute dtype. The matmul accumulates in fp32 and rounds once to logits_dtype."""
  logits = jnp.einsum("...d,vd->...v", hidden_chunk, weight, preferred_element_type=logits_dtype)
  log_normalizer, target_logits = _row_statistics(logits, target_chunk, backend)
  return logits, log_normalizer, log_normalizer - target_logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_cross_entropy_sums(hidden, weight, targets, mask, chunk, dtype, logits_dtype, backends):
  """backends: (the row statistics', the softmax gradient's)."""

  def body(total, xs):
    hidden_chunk, target_chunk, mask_chunk = xs
    hidden_chunk, compute_weight = hidden_chunk.astype(dtype), weight.astype(dtype)
    _, _, losses = _chunk_logits(hidden_chunk, compute_weight, target_chunk, logits_dtype, backends[0])
    return total + jnp.sum(losses * mask_chunk), None

  chunks = [_time_chunks(x, chunk) for x in (hidden, targets, mask)]
  loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
  return loss_sum, jnp.sum(mask)


def _head_cross_entropy_sums_fwd(hidden, weight, targets, mask, chunk, dtype, logits_dtype, backends):
  compute_weight = weight.astype(dtype)

  def body(carry, xs):
    total, d_weight = carry
    hidden_chunk, target_chunk, mask_chunk = xs
    hidden_chunk = hidden_chunk.astype(dtype)
    logits, log_normalizer, losses = _chunk_logits(
      hidden_chunk, compute_weight, target_chunk, logits_dtype, backends[0]
    )
    # d loss / d logits = softmax − one-hot(target), on the tokens the mask keeps.
    d_logits = _softmax_gradient(logits, log_normalizer, target_chunk, mask_chunk, dtype, backends[1])
    d_hidden = jnp.einsum("...v,vd->...d", d_logits, compute_weight, preferred_element_type=jnp.float32)
    d_weight = d_weight + jnp.einsum("...v,...d->vd", d_logits, hidden_chunk, preferred_element_type=jnp.float32)
    return (total + jnp.sum(losses * mask_chunk), d_weight), d_hidden.astype(hidden.dtype)

  chunks = [_time_chunks(x, chunk) for x in (hidden, targets, mask)]
  init = (jnp.zeros((), jnp.float32), jnp.zeros(weight.shape, jnp.float32))
  (loss_sum, d_weight), d_hidden = jax.lax.scan(body, init, chunks)
  return (loss_sum, jnp.sum(mask)), (_from_time_chunks(d_hidden), d_weight.astype(weight.dtype))


def _head_cross_entropy_sums_bwd(chunk, dtype, logits_dtype, backends, residuals, cotangents):
  d_hidden, d_weight = residuals
  scale = cotangents[0].astype(jnp.float32)  # the mask sum depends on no input that has a gradient
  # Scaled in fp32: the scale (e.g. 1 / tokens) rounded to bf16 would shift every gradient by up to 0.4%.
  return (
    (d_hidden.astype(jnp.float32) * scale).astype(d_hidden.dtype),
    (d_weight * scale).astype(d_weight.dtype),
    None,
    None,
  )


_head_cross_entropy_sums.defvjp(_head_cross_entropy_sums_fwd, _head_cross_entropy_sums_bwd)
