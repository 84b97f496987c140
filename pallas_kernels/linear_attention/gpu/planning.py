"""Planning and layouts: what one call runs (decay mode, documents, chunk, tuning), its grids and BlockSpecs,
the choice of state tiles and time segments, and the inputs padded to whole chunks with their chunk-local
cumulative log-decays and document-reset counts."""

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention.common import round_up, segment_starts
from pallas_kernels.linear_attention.gpu.blocks import compiler_params, interpret_mode
from pallas_kernels.linear_attention.gpu.config import SUB_CHUNK, GpuKernelConfig


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static part of one call (hashable: a nondiff argument of the custom_vjp)."""

  mode: str  # "none", "scalar", "token" or "vector" (config.DECAY_MODES)
  has_segments: bool  # segment_ids given: states reset at document starts
  chunk: int  # the chunk this sequence runs with (config.effective_chunk)
  config: GpuKernelConfig
  # KERNEL_FEATURE_MAPS: the map q and k went through before the kernels (packed operands); the dq/dk kernel
  # applies its gradient, reading the raw rows.
  feature_map: str | None = None

  @property
  def row_gates(self):
    """One gate per row shared by all key channels (g [T, H] for "scalar", [B, T, H] for "token")."""
    return self.mode in ("scalar", "token")

  @property
  def sub_chunk(self):
    return min(SUB_CHUNK, self.chunk) if self.mode == "vector" else self.chunk

  @property
  def parts(self):
    """Programs per chunk of the sub-chunk kernels: one per sub-chunk, or one looping over them."""
    return self.chunk // self.sub_chunk if self.config.split_sub_chunks and self.mode == "vector" else 1


class Slot:
  """q, k or v read in place from slot `index` of a packed array [B, T, slots, H, D] (the projection, or q and k
  through their feature map): the kernels' BlockSpecs pick the slot, so no slice of it is ever copied."""

  def __init__(self, packed, index):
    self.packed, self.index = packed, index

  @property
  def shape(self):
    return (*self.packed.shape[:2], *self.packed.shape[3:])

  @property
  def dtype(self):
    return self.packed.dtype


def packed_slots(qkv, mapped=None):
  """(q, k, v) as Slots: q and k of `mapped` [B, T, 2, H, D] (their feature map's output) when given, else of
  the projection qkv [B, T, 3, H, D], and v of the projection."""
  queries_keys = qkv if mapped is None else mapped
  return Slot(queries_keys, 0), Slot(queries_keys, 1), Slot(qkv, 2)


def pad_operands(operands, padded_time):
  """Arrays and Slots padded to `padded_time` steps; each packed array once, however many Slots it backs."""
  padded = {}

  def pad(x):
    if not isinstance(x, Slot):
      return pad_time(x, padded_time)
    if id(x.packed) not in padded:
      padded[id(x.packed)] = pad_time(x.packed, padded_time)
    return Slot(padded[id(x.packed)], x.index)

  return [pad(x) for x in operands]


def operand(x):
  """The array a kernel call passes for x: the packed projection for a Slot."""
  return x.packed if isinstance(x, Slot) else x


def slot_of(x):
  return x.index if isinstance(x, Slot) else None


def in_slot(block, index_map, slot):
  """A [B, T, H, W] BlockSpec's block and index map, or (slot given) those of that slot of a [B, T, 3, H, W]
  array."""
  if slot is None:
    return pl.BlockSpec(block, index_map)

  def slot_index_map(*ids):
    batch, time, *rest = index_map(*ids)
    return (batch, time, slot, *rest)

  return pl.BlockSpec((*block[:2], None, *block[2:]), slot_index_map)


class Layout:
  """Shapes and BlockSpecs shared by the launches of one call."""

  def __init__(self, plan, batch, padded_time, heads, dim_k, dim_v, dtype):
    self.plan, self.batch, self.time, self.heads = plan, batch, padded_time, heads
    self.dim_k, self.dim_v = dim_k, dim_v
    self.wide_operands = jnp.dtype(dtype).itemsize >= 4
    self.num_chunks = padded_time // plan.chunk
    self.parts = plan.parts

  def whole_chunks(self):
    """This layout with one program per chunk (kernels that do not split sub-chunks)."""
    layout = copy.copy(self)
    layout.parts = 1
    return layout

  # Chunk-parallel grid (tile, chunk·parts, batch·head): `parts` programs per chunk each write 1/parts of its rows.
  # The first axis varies fastest in launch order, so the programs sharing a chunk's operands run together and
  # find them in L2 (tiles last: the dq/dk kernel re-read v and do from HBM once per Dk tile).
  def chunk_grid(self, tiles):
    return (tiles, self.num_chunks * self.parts, self.batch * self.heads)

  def chunk_spec(self, width, tiled=False, slot=None):
    heads, parts = self.heads, self.parts
    return in_slot(
      (None, self.plan.chunk, None, width),
      lambda t, n, bh: (bh // heads, n // parts, bh % heads, t if tiled else 0),
      slot,
    )

  def result_spec(self, width, tiled=False, slot=None):
    heads = self.heads
    return in_slot(
      (None, self.plan.chunk // self.parts, None, width),
      lambda t, n, bh: (bh // heads, n, bh % heads, t if tiled else 0),
      slot,
    )

  def query_key_result_spec(self, width):
    """Slots 0 and 1 (dq and dk) of a packed [B, T, 3, H, Dk] gradient: one [C, 2, width] block per program."""
    heads = self.heads
    return pl.BlockSpec((None, self.plan.chunk, 2, None, width), lambda t, n, bh: (bh // heads, n, 0, bh % heads, t))

  def chunk_g_spec(self, width=None, tiled=False):
    heads, parts = self.heads, self.parts
    if self.plan.mode == "scalar":
      return pl.BlockSpec((self.plan.chunk, None), lambda t, n, bh: (n // parts, bh % heads))
    if self.plan.mode == "token":
      return pl.BlockSpec((None, self.plan.chunk, None), lambda t, n, bh: (bh // heads, n // parts, bh % heads))
    return self.chunk_spec(width or self.dim_k, tiled)

  def chunk_resets_spec(self):
    heads, parts = self.heads, self.parts
    return pl.BlockSpec((None, self.plan.chunk), lambda t, n, bh: (bh // heads, n // parts))

  def chunk_state_spec(self, rows, columns, tile_rows):
    """The state [rows, columns] entering each chunk."""
    heads, parts = self.heads, self.parts
    return pl.BlockSpec(
      (None, None, None, rows, columns),
      lambda t, n, bh: (bh // heads, n // parts, bh % heads, t if tile_rows else 0, 0 if tile_rows else t),
    )

  def chunk_row_spec(self, width):
    """One [width] row per chunk and value tile: [B, N, H, tiles, width] (the decay gradient's state term)."""
    heads = self.heads
    return pl.BlockSpec((None, None, None, None, width), lambda t, n, bh: (bh // heads, n, bh % heads, t, 0))

  # Grid of the sequential kernels (Dk tile, Dv tile, segment·batch·head): each program walks one of `segments`
  # equal stretches of time (all of it when segments is 1). The tiles vary fastest in launch order, so the programs
  # reading the same rows run together and share them in L2 (on one H200 the HGRN2 forward scan at 8x2048 took
  # 137 µs, against 156 with batch·head fastest).
  def scan_grid(self, tile_k, tile_v, segments):
    return (self.dim_k // tile_k, self.dim_v // tile_v, segments * self.batch * self.heads)

  def _segment_index(self):
    rows, heads = self.batch * self.heads, self.heads
    return lambda i: (i % rows // heads, i // rows, i % heads)  # (batch, segment, head)

  def scan_spec(self, width, tile_axis, segments, slot=None):
    index = self._segment_index()
    return in_slot((None, self.time // segments, None, width), lambda ik, iv, i: (*index(i), (ik, iv)[tile_axis]), slot)

  def scan_g_spec(self, width, segments):
    index = self._segment_index()
    if self.plan.mode == "scalar":
      return pl.BlockSpec((self.time // segments, None), lambda ik, iv, i: index(i)[1:])
    if self.plan.mode == "token":
      return pl.BlockSpec((None, self.time // segments, None), lambda ik, iv, i: index(i))
    return self.scan_spec(width, 0, segments)

  def scan_resets_spec(self, segments):
    index = self._segment_index()
    return pl.BlockSpec((None, self.time // segments), lambda ik, iv, i: index(i)[:2])

  def scan_state_spec(self, tile_k, tile_v, segments, per_chunk):
    """Per chunk: [B,N,H,Dv,Dk], a segment's chunks per program; else one state per segment [B,S,H,Dv,Dk]."""
    index = self._segment_index()
    rows = self.num_chunks // segments if per_chunk else None
    return pl.BlockSpec((None, rows, None, tile_v, tile_k), lambda ik, iv, i: (*index(i), iv, ik))

  def extras(self, g, resets):
    return [x for x in (g, resets) if x is not None]


def state_tiles(layout, segmented):
  """(Dk tile, Dv tile) of the state scans; segmented 16-bit scans take segment_scan_tile-wide tiles."""
  plan = layout.plan
  width = plan.config.scan_tile
  if segmented and not layout.wide_operands:
    width = max(width, plan.config.segment_scan_tile)
  return min(width, layout.dim_k), min(width, layout.dim_v)


def segment_count(plan, num_chunks, programs, target):
  """Segments for a sequential kernel of `programs` programs over num_chunks chunks: doubled while the programs
  stay under `target` and each segment keeps plan.config.min_segment_chunks chunks (equal segments: a power of two
  dividing num_chunks). target 0: one segment."""
  segments = 1
  while (
    programs * segments < target
    and num_chunks % (2 * segments) == 0
    and num_chunks // (2 * segments) >= plan.config.min_segment_chunks
  ):
    segments *= 2
  return segments


def present(*arrays):
  return [x for x in arrays if x is not None]


def pad_time(x, padded_time):
  if x is None or x.shape[1] == padded_time:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, padded_time - x.shape[1])
  return jnp.pad(x, widths)


def _chunk_cumsum(x, chunk):
  """Inclusive cumulative sum along axis 1 (time), restarting at every chunk (small arrays: XLA)."""
  shape = x.shape
  return jnp.cumsum(x.reshape(shape[0], shape[1] // chunk, chunk, *shape[2:]), axis=2).reshape(shape)


def _chunk_sums_kernel(*refs, reverse):
  """One chunk's fp32 cumulative sums over its rows; reverse: suffix sums plus the chunk's row `offset_ref`."""
  x_ref, *offset_ref, out_ref = refs
  x = x_ref[...].astype(jnp.float32)
  prefix = jnp.cumsum(x, axis=0)  # Triton scans run forward only
  out = (jnp.sum(x, axis=0)[None, :] - prefix + x) if reverse else prefix
  if offset_ref:
    out = out + offset_ref[0][...][None, :]
  out_ref[...] = out


def chunk_sums(layout, x, reverse=False, offsets=None):
  """Per-chunk cumulative sums over time of x [B,T,H,W] (prefix sums, or suffix sums + offsets [B,N,H,W]), fp32,
  one program per chunk: the gates' chunk-local g and the decay gradient's suffix sums (faster than XLA's cumsum
  and than a triangular matmul)."""
  layout = layout.whole_chunks()
  width = x.shape[-1]
  heads = layout.heads
  in_specs = [layout.chunk_spec(width)]
  operands = [x]
  if offsets is not None:
    in_specs.append(pl.BlockSpec((None, None, None, width), lambda t, n, bh: (bh // heads, n, bh % heads, 0)))
    operands.append(offsets)
  return pl.pallas_call(
    functools.partial(_chunk_sums_kernel, reverse=reverse),
    grid=layout.chunk_grid(1),
    in_specs=in_specs,
    out_specs=layout.result_spec(width),
    out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
    compiler_params=compiler_params(layout.plan, layout.plan.config.scan_warps),
    interpret=interpret_mode(),
    name="linear_attention_chunk_sums",
  )(*operands)


def prepare(plan, q, k, v, log_decay, segment_ids, gates=None):
  """Pads time to whole chunks (zero q/k/v, zero log-decay; pad_operands) and builds the chunk-local g and reset
  counts (unless `gates`, the forward's (g, resets), are given); returns them with the calls' Layout."""
  batch, time, heads, dim_k = q.shape
  chunk = plan.chunk
  padded_time = round_up(time, chunk)
  layout = Layout(plan, batch, padded_time, heads, dim_k, v.shape[-1], q.dtype)
  q, k, v = pad_operands((q, k, v), padded_time)
  if gates is not None:
    return q, k, v, *gates, layout
  g = None
  if plan.mode == "scalar":
    per_step = jnp.where(jnp.arange(padded_time)[:, None] < time, log_decay.astype(jnp.float32)[None, :], 0.0)
    g = _chunk_cumsum(per_step[None], chunk)[0]  # [T, H]: the same for every batch row
  elif plan.mode == "token":
    g = _chunk_cumsum(pad_time(log_decay.astype(jnp.float32), padded_time), chunk)  # [B, T, H]
  elif plan.mode == "vector":
    g = chunk_sums(layout, pad_time(log_decay, padded_time))
  resets = None
  if plan.has_segments:
    starts = pad_time(segment_starts(segment_ids, batch, time).astype(jnp.int32), padded_time)
    resets = _chunk_cumsum(starts, chunk)
  return q, k, v, g, resets, layout


def state_dtype(plan, dtype, gradients=False):
  """The dtype of the stored per-chunk states (gradients: of their gradients) for inputs of `dtype`."""
  # bf16 states halve the traffic of the materialised per-chunk states (fla does the same); fp16 would overflow.
  fp32 = plan.config.fp32_state_grads if gradients else plan.config.fp32_states
  return jnp.bfloat16 if dtype == jnp.bfloat16 and not fp32 else jnp.float32


def value_major(state):
  """A [B,H,Dk,Dv] state (or its gradient) as the kernels take it, [B,H,Dv,Dk] f32; None (a zero state, or a
  symbolic-zero gradient) stays None: the kernels start from zero without writing and reading a zero array."""
  if state is None or isinstance(state, jax.custom_derivatives.SymbolicZero):
    return None
  return jnp.swapaxes(state.astype(jnp.float32), -1, -2)
