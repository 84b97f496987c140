"""Tuning knobs of the Pallas GPU kernels: one frozen dataclass and the tuned defaults per decay mode and dtype.

Why each default is what it is (the H200 measurements that chose it): docs/tuning.md.
"""

import dataclasses
from typing import Sequence

import jax.numpy as jnp

# No decay (cosFormer2), fixed per head (TNL), per head and token (Mamba-2, simple GLA), per key channel (HGRN2).
DECAY_MODES = ("none", "scalar", "token", "vector")
SUB_CHUNK = 16  # per-key-channel decay: rows whose diagonal blocks need more than one matmul (fla's chunk_gla)
MIN_BLOCK = 16  # Triton's smallest matmul operand dimension
_WARPS = (1, 2, 4, 8, 16, 32)
# Factors up to e^60 times rows down to 1e-10 stay normal fp32 numbers (e^±87); 40, the default, leaves e^20 more.
MAX_SPAN_LIMIT = 60


@dataclasses.dataclass(frozen=True)
class GpuKernelConfig:
  """Static tuning of one "pallas_gpu" call (hashable: a nondiff argument of the op's custom_vjp).

  Attributes:
    chunk_size: tokens per chunk; a sequence shorter than a chunk takes the next power of two >= its length.
    num_warps: warps of the chunk-parallel output and dv kernels.
    key_tile: Dk tile of the dq/dk kernel (clipped to Dk).
    decay_key_tile: Dk tile of the dq/dk kernel when the decay's gradient is taken (its fp32 per-row terms take
      the registers of a wider tile).
    key_warps: warps of the dq/dk kernel.
    value_tile: Dv tile of the output and dv kernels (clipped to Dv).
    split_sub_chunks: per-key-channel decay: one program per 16-row sub-chunk in the dq/dk kernel instead of one
      looping over the chunk's sub-chunks.
    fused_forward: the forward walks the chunks in one kernel with the state in registers instead of a state
      scan that stores every chunk's state followed by the output kernel.
    fused_forward_states: the fused forward also stores the state entering each chunk, rounded as the state
      scan's, for the backward, which then runs no forward state scan: a residual of O((T/C)·Dk·Dv) per call, as
      the unfused forward keeps.
    fused_backward_dv: without a decay per key channel and without a decay gradient, the dq/dk kernel also
      computes dv (its programs then take the whole Dk, one tile), instead of a dv kernel of its own reading the
      same rows and state gradients again.
    packed_operands: `linear_attention_qkv` (no decay, or one per head or per head and token) reads v in place
      from the packed projection and q, k from it or from one [B, T, 2, H, D] array of their feature map's output,
      and writes the packed projection's gradient whole (the map's gradient applied in the dq/dk kernel), instead of
      slicing q, k, v out and concatenating their gradients in XLA.
    one_pass_tf32: the dq/dk kernel's fp32 matmuls (a per-key-channel or per-token decay gradient's intra-chunk
      terms) in one TF32 pass instead of three.
    three_pass_diagonal: with one_pass_tf32, the per-key-channel dq/dk kernel's diagonal-block matmuls (and the
      within-span matmuls, which hold those blocks) still take three passes: their pairs (the nearest tokens)
      carry most of the decay gradient's error from one pass.
    matched_rounding: with one_pass_tf32 and a per-key-channel decay's gradient, the dq/dk kernel's q·dq − k·dk
      takes the TF32-rounded factors that its one-pass matmuls multiplied, for the pairs inside a sub-chunk and
      with its adjacent sub-chunks (all the chunk's pairs within diagonal_span_limit): those pairs then cancel
      exactly.
    fp32_states: 16-bit inputs store the per-chunk states in fp32 instead of bf16 (twice the forward scan's
      stores and the chunk kernels' state reads). Without split_state_products only the decay gradient's
      Σ_v S·dS_e term sees the unrounded values, which changes little.
    fp32_state_grads: the same for the state gradients (the reverse scan's stores).
    split_state_products: fp32 states or state gradients enter the dq/dk kernel's do·h and v·dS as two bf16 passes
      (the state's bf16 rounding and its residual) instead of rounded to bf16 once: with weak gates most of the
      decay gradient's error is that rounding (docs/tuning.md).
    split_scan_updates: the state scans' decayed keys k̂ (queries q̂ in the reverse scan) enter their chunk's
      update v̂ᵀk̂ as their 16-bit rounding plus its residual, two passes instead of one: the rounding of k̂ and q̂
      is the larger part of a per-key-channel decay gradient's error with weak gates (docs/tuning.md).
    diagonal_span_limit: per-key-channel decay: a chunk whose gates decay by at most e^−limit (nats) in every
      channel (of the kernel's Dk tile) from its first row to its middle one and from there to its last takes its
      intra-chunk pairs in the score and dq/dk kernels from single matmuls of rows referenced to its middle row
      (factors within e^±limit, far inside fp32's range even for rows of 1e−20); a chunk decaying faster takes the
      16-row sub-chunk forms, exact for any gate strength (0: always).
    score_levels: halvings of the score kernel's 16x16 diagonal blocks done as matmuls before its elementwise
      loop (0 to 4).
    scores_warps: warps of the per-key-channel intra-chunk score kernel.
    fused_value_tile: Dv tile of the fused forward (its fp32 state [tile, Dk] stays in registers).
    scan_tile: Dk and Dv tile of the state scans.
    scan_warps: warps of the state scans, the segment combine and the chunk cumulative sums.
    scan_stages: software-pipelining stages of the state scans that walk one chunk per step over one segment
      (the others take num_stages).
    scan_unroll: chunks per loop step of latency-bound state scans with 16-bit operands.
    latency_bound_programs: state scans with fewer programs than this unroll scan_unroll chunks per step.
    segment_programs: sequential kernels split time into segments (a two-level scan) while they have fewer
      programs than this (0: never).
    segment_scans_below: the state scans consider segments only below this many programs.
    segment_scan_tile: state tile of segmented state scans with 16-bit operands.
    min_segment_chunks: chunks each segment keeps at least.
    combine_tile: state tile of the segment combine (elementwise: small tiles, many programs).
    num_stages: software-pipelining stages of every other kernel.
  """

  chunk_size: int
  num_warps: int
  key_tile: int
  key_warps: int
  value_tile: int
  split_sub_chunks: bool
  fused_forward: bool
  one_pass_tf32: bool
  decay_key_tile: int = 64
  fused_forward_states: bool = False
  packed_operands: bool = False
  fused_backward_dv: bool = False
  three_pass_diagonal: bool = False
  matched_rounding: bool = False
  fp32_states: bool = False
  fp32_state_grads: bool = False
  split_state_products: bool = False
  split_scan_updates: bool = False
  diagonal_span_limit: int = 40
  score_levels: int = 1
  scores_warps: int = 4  # one program per chunk, mostly one [C, Dk]x[Dk, C] matmul: 4 warps beat 8
  fused_value_tile: int = 64
  scan_tile: int = 64
  scan_warps: int = 4
  scan_stages: int = 2
  scan_unroll: int = 4
  latency_bound_programs: int = 256
  segment_programs: int = 512
  segment_scans_below: int = 128
  segment_scan_tile: int = 128
  min_segment_chunks: int = 8
  combine_tile: int = 32
  num_stages: int = 2

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.type is bool:
        if not isinstance(value, bool):
          raise TypeError(f"GpuKernelConfig.{field.name}={value!r}; valid: True or False.")
      elif not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"GpuKernelConfig.{field.name}={value!r}; valid: an int.")
    for name in (
      "chunk_size",
      "key_tile",
      "decay_key_tile",
      "value_tile",
      "fused_value_tile",
      "scan_tile",
      "segment_scan_tile",
      "combine_tile",
    ):
      value = getattr(self, name)
      if value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"GpuKernelConfig.{name}={value}; valid: a power of two >= {MIN_BLOCK}.")
    for name in ("num_warps", "key_warps", "scores_warps", "scan_warps"):
      if getattr(self, name) not in _WARPS:
        raise ValueError(f"GpuKernelConfig.{name}={getattr(self, name)}; valid: one of {_WARPS}.")
    levels = SUB_CHUNK.bit_length() - 1
    if not 0 <= self.score_levels <= levels:
      raise ValueError(f"GpuKernelConfig.score_levels={self.score_levels}; valid: 0 to {levels}.")
    for name in ("num_stages", "scan_stages", "scan_unroll", "min_segment_chunks"):
      if getattr(self, name) < 1:
        raise ValueError(f"GpuKernelConfig.{name}={getattr(self, name)}; valid: an int >= 1.")
    if not 0 <= self.diagonal_span_limit <= MAX_SPAN_LIMIT:
      raise ValueError(f"GpuKernelConfig.diagonal_span_limit={self.diagonal_span_limit}; valid: 0 to {MAX_SPAN_LIMIT}.")
    for name in ("latency_bound_programs", "segment_programs", "segment_scans_below"):
      if getattr(self, name) < 0:
        raise ValueError(f"GpuKernelConfig.{name}={getattr(self, name)}; valid: an int >= 0.")


def effective_chunk(chunk_size: int, time: int) -> int:
  """The chunk a sequence of `time` tokens runs with: short sequences use a smaller one (as fla does), never below
  the 16-row Triton matmul minimum."""
  return min(chunk_size, max(MIN_BLOCK, 1 << max(time - 1, 0).bit_length()))


def default_config(mode: str, shape: Sequence[int], dtype) -> GpuKernelConfig:
  """The tuned configuration for queries of `shape` [batch, time, heads, dim_k] and `dtype` in decay `mode`.

  Args:
    mode: "none", "scalar" (one decay per head), "token" (one per head and token) or "vector" (per key channel).
    shape: q's shape; a sequence shorter than the default chunk gets a smaller one.
    dtype: the inputs' dtype; 32-bit inputs take narrower tiles (shared memory) and three-pass TF32 matmuls.
  """
  if mode not in DECAY_MODES:
    raise ValueError(f"default_config: mode={mode!r}; valid: {', '.join(DECAY_MODES)}.")
  if len(shape) != 4:
    raise ValueError(f"default_config: shape={tuple(shape)}; valid: q's shape [batch, time, heads, dim_k].")
  # "token" runs the fixed decay's kernels with per-batch-row gates: its defaults are the fixed decay's tuning, not
  # yet measured for it on an H200.
  vector = mode == "vector"
  wide = jnp.dtype(dtype).itemsize >= 4
  return GpuKernelConfig(
    chunk_size=effective_chunk(64, shape[1]),
    num_warps=4,
    key_tile=64 if vector or wide else 128,
    key_warps=4,
    value_tile=64 if wide else 128,
    split_sub_chunks=vector,
    fused_forward=not vector,
    one_pass_tf32=not wide,
    # Per-key-channel gates make the scans' loads the largest; 3 stages slowed the row-gate modes' scans.
    scan_stages=3 if vector else 2,
    # The decay gradient's intra-chunk pairs as accurate as fla's chunk_gla's, for 5% of the HGRN2 backward.
    three_pass_diagonal=vector,
    matched_rounding=vector,
    # A decay gradient more accurate than fla's chunk_gla's with weak gates, for 1-7% of HGRN2's forward+backward;
    # the two passes slow 128-wide segmented scan tiles far more than 64-wide ones.
    split_scan_updates=vector,
    segment_scan_tile=64 if vector else 128,
    # Unrolled per-key-channel scans won at 128 programs and lost at 192 (more than the H200's 132 SMs).
    latency_bound_programs=133 if vector else 256,
    # TNL 1B at 8K on an H200: each 1.0-1.3% faster, both 2.0% (against two base runs); cosFormer2 (no decay) lost
    # 7.3% with both.
    fused_forward_states=mode == "scalar",
    fused_backward_dv=mode == "scalar",
    # TNL 1B at 8K on an H200: 0.8% faster, 3 GiB less in XLA's memory plan.
    packed_operands=mode == "scalar",
  )


def parse_overrides(assignments: Sequence[str]) -> dict:
  """{knob: value} from "knob=value" strings (the benchmarks' --config), converted to the knob's type.

  Raises:
    ValueError: an assignment without "=", an unknown knob, or a value of the wrong type.
  """
  types = {field.name: field.type for field in dataclasses.fields(GpuKernelConfig)}
  overrides = {}
  for assignment in assignments:
    name, separator, text = assignment.partition("=")
    name, text = name.strip(), text.strip()
    if not separator:
      raise ValueError(f"config assignment {assignment!r}; valid: knob=value, e.g. num_warps=8.")
    if name not in types:
      raise ValueError(f"unknown GpuKernelConfig knob {name!r}; valid: {', '.join(types)}.")
    if types[name] is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"GpuKernelConfig.{name}={text}; valid: true or false.")
      overrides[name] = text.lower() in ("true", "1")
    else:
      try:
        overrides[name] = int(text)
      except ValueError:
        raise ValueError(f"GpuKernelConfig.{name}={text}; valid: an integer.") from None
  return overrides


def checked_overrides(overrides) -> tuple[tuple[str, bool | int], ...]:
  """GpuKernelConfig overrides (a mapping, or (knob, value) pairs as JSON gives them back) as sorted (knob, value)
  pairs: hashable, so that they can be a static argument or a frozen config's field.

  Raises:
    ValueError or TypeError: not a mapping or pairs, an unknown knob, or a value of the wrong type or range (checked
      on a tuned configuration, so that a bad override fails before any kernel is traced).
  """
  if overrides is None:
    return ()
  try:
    pairs = dict(overrides.items() if hasattr(overrides, "items") else overrides)
  except (TypeError, ValueError):
    raise TypeError(
      f"GpuKernelConfig overrides {overrides!r}; valid: a mapping of knob to value, e.g. {{'num_warps': 8}}."
    ) from None
  names = {field.name for field in dataclasses.fields(GpuKernelConfig)}
  for name in pairs:
    if name not in names:
      raise ValueError(f"unknown GpuKernelConfig knob {name!r}; valid: {', '.join(sorted(names))}.")
  # the dataclass checks each value's type and range
  dataclasses.replace(default_config("scalar", (1, 64, 1, 128), jnp.bfloat16), **pairs)
  return tuple(sorted(pairs.items()))
