"""Flash attention (FlashAttention-2, arXiv 2307.08691) as Pallas GPU (Triton) kernels: causal masking and packed
documents by segment ids, without forming a [T, T] array.

A query attends to the keys at or before it (causal) whose segment id equals its own. The softmax runs in base 2
(logits scaled by log2(e), exp2 on the GPU's fast path); the forward saves the base-2 logsumexp per row for the
backward. Key blocks that no query of a block can see are never visited: each kernel loops over a contiguous
range of blocks [first, end) computed outside the kernels from the causal diagonal and each block's segment-id
min and max (a key block is hidden from a query block when its ids all precede, or all follow, the query
block's). The range covers every visible block whatever the ids; with non-decreasing ids (packed documents) it
holds no invisible block either, so a row of short documents costs about the sum of the documents' squares.
Blocks inside the range are masked element by element.

Backward (custom_vjp): D = rowsum(dO ∘ O) in XLA, then a dk/dv kernel per key block looping over query blocks
and a dq kernel per query block looping over key blocks. Keys and values may have fewer heads than the queries
(grouped-query attention): query head h reads key head h // (H / H_kv); dk and dv are computed per query head
(fp32) and summed over each group.

T not a multiple of the blocks is padded (config.multiple) and the padding cut from the result: padded keys
sit after every real query, behind the causal mask, and get a segment id of their own (max id + 1) when
documents are given or attention is not causal.

Off the GPU the kernels run in Pallas interpret mode (tests on CPU).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.attention.config import FlashConfig, default_config

HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
LOG2E = math.log2(math.e)
# Running max before any visible key: finite, so a fully masked block gives exp2(-inf - floor) = 0, not NaN,
# and far below every real logit, so the first visible block's correction exp2(floor - m) is 0.
LOGIT_FLOOR = -1e30


def interpret_mode():
  """Off the GPU the kernels run in Pallas interpret mode (tests on CPU)."""
  return jax.default_backend() != "gpu"


def _matmul(a, b, contract):
  """2-D matmul with fp32 accumulation; fp32 operands keep fp32 accuracy (three TF32 passes on the GPU)."""
  precision = None
  if a.dtype == jnp.float32:
    precision = lax.Precision.HIGHEST if interpret_mode() else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


NN, NT, TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))  # a·b, a·bᵀ, aᵀ·b


def _load_scalar(ref, index):
  # Triton loads need a power-of-two shape: load one element and sum it to a 0-d value.
  return jnp.sum(ref[pl.ds(index, 1)])


def _logits(q, k, q_start, k_start, q_ids, k_ids, scale, causal):
  """Base-2 logits (q·kᵀ)·scale·log2(e) of a [rows, cols] block, -inf where masked."""
  s = _matmul(q, k, NT) * (scale * LOG2E)
  keep = None
  if causal:
    rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    keep = rows >= cols
  if q_ids is not None:
    same = q_ids[:, None] == k_ids[None, :]
    keep = same if keep is None else keep & same
  return s if keep is None else jnp.where(keep, s, -jnp.inf)


def _forward_kernel(first_ref, end_ref, q_ref, k_ref, v_ref, *refs, scale, causal, block_q, block_k):
  ids_ref, o_ref, lse_ref = refs if len(refs) == 3 else (None, *refs)
  index = pl.program_id(0)
  q_start = index * block_q
  q = q_ref[...]
  q_ids = None if ids_ref is None else ids_ref[pl.ds(q_start, block_q)]

  def step(block, carry):
    acc, m, total = carry
    k_start = pl.multiple_of(block * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    k_ids = None if ids_ref is None else ids_ref[keys]
    s = _logits(q, k_ref[keys, :], q_start, k_start, q_ids, k_ids, scale, causal)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_next[:, None])
    correction = jnp.exp2(m - m_next)
    acc = acc * correction[:, None] + _matmul(p.astype(v_ref.dtype), v_ref[keys, :], NN)
    return acc, m_next, total * correction + jnp.sum(p, axis=1)

  init = (
    jnp.zeros(q.shape, jnp.float32),
    jnp.full((block_q,), LOGIT_FLOOR, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  acc, m, total = lax.fori_loop(_load_scalar(first_ref, index), _load_scalar(end_ref, index), step, init)
  # Every row sees at least its own key (total >= 1), so the division is safe.
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(total)


def _dkv_kernel(
  first_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, causal, block_q, block_k
):
  ids_ref, dk_ref, dv_ref = refs if len(refs) == 3 else (None, *refs)
  index = pl.program_id(0)
  k_start = index * block_k
  k, v = k_ref[...], v_ref[...]
  k_ids = None if ids_ref is None else ids_ref[pl.ds(k_start, block_k)]

  def step(block, carry):
    dk, dv = carry
    q_start = pl.multiple_of(block * block_q, block_q)
    rows = pl.ds(q_start, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_ids = None if ids_ref is None else ids_ref[rows]
    p = jnp.exp2(_logits(q, k, q_start, k_start, q_ids, k_ids, scale, causal) - lse_ref[rows][:, None])
    dv = dv + _matmul(p.astype(do.dtype), do, TN)
    ds = p * (_matmul(do, v, NT) - delta_ref[rows][:, None])
    return dk + _matmul(ds.astype(q.dtype), q, TN), dv

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(_load_scalar(first_ref, index), _load_scalar(end_ref, index), step, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
  first_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, causal, block_q, block_k
):
  ids_ref, dq_ref = refs if len(refs) == 2 else (None, *refs)
  index = pl.program_id(0)
  q_start = index * block_q
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_ids = None if ids_ref is None else ids_ref[pl.ds(q_start, block_q)]

  def step(block, dq):
    k_start = pl.multiple_of(block * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    k = k_ref[keys, :]
    k_ids = None if ids_ref is None else ids_ref[keys]
    p = jnp.exp2(_logits(q, k, q_start, k_start, q_ids, k_ids, scale, causal) - lse[:, None])
    ds = p * (_matmul(do, v_ref[keys, :], NT) - delta[:, None])
    return dq + _matmul(ds.astype(k.dtype), k, NN)

  dq = lax.fori_loop(
    _load_scalar(first_ref, index), _load_scalar(end_ref, index), step, jnp.zeros(q.shape, jnp.float32)
  )
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def block_ranges(segment_ids, length, block_q, block_k, causal, per_key_block=False):
  """(first, end) [B or 1, n] int32: the contiguous range of key blocks each query block visits (per_key_block:
  of query blocks each key block visits). A pair of blocks is hidden when the key block lies wholly after the
  query block (causal) or the ids of one wholly precede the other's (segment_ids [B, T] given)."""
  q_blocks, k_blocks = length // block_q, length // block_k
  q_index = jnp.arange(q_blocks)[:, None]
  k_index = jnp.arange(k_blocks)[None, :]
  visible = jnp.ones((1, q_blocks, k_blocks), bool)
  if causal:
    visible = visible & (k_index * block_k < (q_index + 1) * block_q)[None]
  if segment_ids is not None:
    q_ids = segment_ids.reshape(-1, q_blocks, block_q)
    k_ids = segment_ids.reshape(-1, k_blocks, block_k)
    visible = visible & (jnp.max(k_ids, -1)[:, None, :] >= jnp.min(q_ids, -1)[:, :, None])
    visible = visible & (jnp.min(k_ids, -1)[:, None, :] <= jnp.max(q_ids, -1)[:, :, None])
  if per_key_block:
    visible = jnp.swapaxes(visible, 1, 2)
  count = visible.shape[-1]
  seen = jnp.any(visible, axis=-1)
  first = jnp.where(seen, jnp.argmax(visible, axis=-1), 0)
  end = jnp.where(seen, count - jnp.argmax(visible[..., ::-1], axis=-1), 0)
  return first.astype(jnp.int32), end.astype(jnp.int32)


def _specs(length, block, ranges, groups):
  """BlockSpecs on a (blocks, batch, heads) grid: ranges rows, a [block, D] tile of a [B, T, H, D] operand, the
  whole [T, D] sequence of one (query or key) head, [block] / [T] rows of a [B, H, T] statistic, [T] ids."""
  count = ranges[0].shape[-1]
  ranges_spec = pl.BlockSpec((None, count), lambda i, b, h: (b if ranges[0].shape[0] > 1 else 0, 0))

  def tile(dim, kv=False):
    return pl.BlockSpec((None, block, None, dim), lambda i, b, h: (b, i, h // groups if kv else h, 0))

  def whole(dim, kv=False):
    return pl.BlockSpec((None, length, None, dim), lambda i, b, h: (b, 0, h // groups if kv else h, 0))

  row_tile = pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
  row_whole = pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))
  ids = pl.BlockSpec((None, length), lambda i, b, h: (b, 0))
  return ranges_spec, tile, whole, row_tile, row_whole, ids


def _call(kernel, name, grid, in_specs, out_specs, out_shape, num_warps, num_stages):
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret_mode(),
    name=name,
  )


def _forward(q, k, v, segment_ids, scale, causal, config):
  batch, length, heads, dim = q.shape
  groups = heads // k.shape[2]
  block_q, block_k = config.block_q, config.block_k
  ranges = block_ranges(segment_ids, length, block_q, block_k, causal)
  ranges_spec, tile, whole, row_tile, _, ids = _specs(length, block_q, ranges, groups)
  in_specs = [ranges_spec, ranges_spec, tile(dim), whole(dim, kv=True), whole(dim, kv=True)]
  operands = [*ranges, q, k, v]
  if segment_ids is not None:
    in_specs.append(ids)
    operands.append(segment_ids)
  kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k)
  out, lse = _call(
    kernel,
    "flash_attention_forward",
    (length // block_q, batch, heads),
    in_specs,
    [tile(dim), row_tile],
    [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
    config.num_warps,
    config.num_stages,
  )(*operands)
  return out, lse


def _backward(q, k, v, segment_ids, out, lse, d_out, scale, causal, config):
  batch, length, heads, dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
  with_ids = segment_ids is not None
  warps, stages = config.num_warps_backward, config.num_stages_backward

  # dk, dv: one program per (key block, batch, query head); per query head when heads share keys, summed below.
  block_q, block_k = config.block_q_dkv, config.block_k_dkv
  ranges = block_ranges(segment_ids, length, block_q, block_k, causal, per_key_block=True)
  ranges_spec, tile, whole, _, row_whole, ids = _specs(length, block_k, ranges, groups)
  in_specs = [ranges_spec, ranges_spec, whole(dim), tile(dim, kv=True), tile(dim, kv=True), whole(dim)]
  in_specs += [row_whole, row_whole] + ([ids] if with_ids else [])
  dkv_dtype = k.dtype if groups == 1 else jnp.float32
  dkv_shape = jax.ShapeDtypeStruct((batch, length, heads, dim), dkv_dtype)
  kernel = functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k)
  operands = [*ranges, q, k, v, d_out, lse, delta] + ([segment_ids] if with_ids else [])
  dk, dv = _call(
    kernel,
    "flash_attention_dkv",
    (length // block_k, batch, heads),
    in_specs,
    [tile(dim), tile(dim)],
    [dkv_shape, dkv_shape],
    warps,
    stages,
  )(*operands)
  if groups > 1:
    dk = dk.reshape(batch, length, kv_heads, groups, dim).sum(3).astype(k.dtype)
    dv = dv.reshape(batch, length, kv_heads, groups, dim).sum(3).astype(v.dtype)

  # dq: one program per (query block, batch, query head).
  block_q, block_k = config.block_q_dq, config.block_k_dq
  ranges = block_ranges(segment_ids, length, block_q, block_k, causal)
  ranges_spec, tile, whole, row_tile, _, ids = _specs(length, block_q, ranges, groups)
  in_specs = [ranges_spec, ranges_spec, tile(dim), whole(dim, kv=True), whole(dim, kv=True), tile(dim)]
  in_specs += [row_tile, row_tile] + ([ids] if with_ids else [])
  kernel = functools.partial(_dq_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k)
  operands = [*ranges, *operands[2:]]
  (dq,) = _call(
    kernel,
    "flash_attention_dq",
    (length // block_q, batch, heads),
    in_specs,
    [tile(dim)],
    [jax.ShapeDtypeStruct(q.shape, q.dtype)],
    warps,
    stages,
  )(*operands)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, segment_ids, scale, causal, config):
  return _forward(q, k, v, segment_ids, scale, causal, config)[0]


def _flash_fwd(q, k, v, segment_ids, scale, causal, config):
  out, lse = _forward(q, k, v, segment_ids, scale, causal, config)
  return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(scale, causal, config, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, d_out.astype(q.dtype), scale, causal, config)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_inputs(q, k, v, segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"flash_attention takes q, k, v as [batch, time, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}."
    )
  if k.shape != v.shape:
    raise ValueError(f"flash_attention needs k and v of one shape; got {k.shape} and {v.shape}.")
  batch, length, heads, dim = q.shape
  if k.shape[:2] != (batch, length) or k.shape[3] != dim:
    raise ValueError(
      f"flash_attention is self-attention: k and v need q's batch, time and head_dim; got q {q.shape}, k {k.shape}."
    )
  if heads % k.shape[2]:
    raise ValueError(f"flash_attention needs q's heads ({heads}) a multiple of k and v's heads ({k.shape[2]}).")
  if dim not in HEAD_DIMS:
    raise ValueError(f"flash_attention supports head_dim {' or '.join(map(str, HEAD_DIMS))}; got {dim}.")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in [jnp.dtype(d) for d in DTYPES]:
    raise ValueError(
      f"flash_attention needs q, k, v of one dtype among bfloat16, float16, float32; got {q.dtype}, {k.dtype}, "
      f"{v.dtype}."
    )
  if segment_ids is not None and (
    segment_ids.shape != (batch, length) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
  ):
    raise ValueError(
      f"flash_attention needs integer segment_ids of shape {(batch, length)}; got {segment_ids.dtype} "
      f"{segment_ids.shape}."
    )


def flash_attention(q, k, v, segment_ids=None, *, causal=True, sm_scale=None, config: FlashConfig | None = None):
  """Softmax attention of q [B, T, H, D] over k, v [B, T, H_kv, D] (H a multiple of H_kv) -> [B, T, H, D].

  segment_ids [B, T] (integers; non-decreasing along each row, as packed documents are, for the block skipping
  to be tight): a query sees only keys of its own segment. causal: and only keys at or before it. sm_scale:
  logit scale, 1/sqrt(D) when None. config: FlashConfig, default_config(D, dtype) when None (blocks are capped
  at T rounded up to a power of two). bfloat16, float16 or float32; D = 64 or 128. Differentiable in q, k, v."""
  _check_inputs(q, k, v, segment_ids)
  batch, length, _, dim = q.shape
  scale = dim**-0.5 if sm_scale is None else float(sm_scale)
  config = (config or default_config(dim, q.dtype)).fitted(length)
  padded = -(-length // config.multiple) * config.multiple
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  if padded != length:
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    if segment_ids is None and not causal:
      segment_ids = jnp.zeros((batch, length), jnp.int32)
    if segment_ids is not None:
      fill = jnp.max(segment_ids, axis=1, keepdims=True) + 1
      segment_ids = jnp.concatenate([segment_ids, jnp.broadcast_to(fill, (batch, padded - length))], axis=1)
  out = _flash(q, k, v, segment_ids, scale, bool(causal), config)
  return out[:, :length]
