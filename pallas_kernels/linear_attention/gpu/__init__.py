"""Pallas GPU (Hopper) kernels for chunked linear attention, lowered through Triton (the "pallas_gpu" backend).

fla's decomposition, which keeps every SM busy when batch·heads is small:
  forward   1. state scan (scans.py): one program per (batch·head, Dk tile, Dv tile) walks the chunks and writes
               the state entering each chunk and the final state;
            2. per-key-channel decay: intra-chunk scores A [C, C] per chunk, masked and decayed (scores.py);
            3. output: parallel over (Dv tile, chunk, batch·head): o = q̄·h + A·v, matmuls only (forward.py).
            Without per-key-channel decay the forward is one fused kernel walking the chunks with the state in
            registers, never storing the per-chunk states (fla's fused_chunk form).
  backward  the reverse scan of the state gradient, then two chunk-parallel kernels: dv = Aᵀ·do + k̄·dh and dq, dk
            (backward.py).
Sequential kernels with few programs split time into segments (a two-level scan). Decay factors use chunk-local
cumulative log-decays so that every exponent is <= 0 (blocks.py). Segment resets become masks from a chunk-local
count of document starts: a query sees the carried state only before the chunk's first reset, a key feeds the
outgoing state only after its last one. States travel between kernels value-major ([.., Dv, Dk]) so that
per-key-channel decays scale columns. Loops are `fori_loop`s with dynamic offsets: Triton keeps them rolled, so a
program (and its compile time) stays the size of one body; the state scans deliberately unroll a few chunks when
latency-bound. Planning, layouts and padding: planning.py; every tuning knob and its tuned default: config.py.
Off the GPU the kernels run in Pallas interpret mode (tests on CPU).
"""

from pallas_kernels.linear_attention.gpu.config import (
  DECAY_MODES,
  GpuKernelConfig,
  checked_overrides,
  default_config,
  parse_overrides,
)
from pallas_kernels.linear_attention.gpu.op import (
  decay_mode,
  fits_shared_memory,
  linear_attention_gpu,
  linear_attention_gpu_qkv,
)

__all__ = [
  "DECAY_MODES",
  "GpuKernelConfig",
  "checked_overrides",
  "decay_mode",
  "default_config",
  "fits_shared_memory",
  "linear_attention_gpu",
  "linear_attention_gpu_qkv",
  "parse_overrides",
]
