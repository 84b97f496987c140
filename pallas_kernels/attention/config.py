"""Block sizes, warps and stages of the flash-attention kernels."""

import dataclasses

import jax.numpy as jnp

from pallas_kernels.blocks import is_power_of_two

MIN_BLOCK = 16  # Triton's smallest dot operand


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Tiles and launch parameters. The forward kernel owns block_q query rows and loops over keys block_k at a
  time; the dk/dv kernel owns block_k_dkv keys and loops over queries block_q_dkv at a time; the dq kernel owns
  block_q_dq query rows and loops over keys block_k_dq at a time. Blocks are powers of two >= 16."""

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps: int = 4
  num_stages: int = 3
  num_warps_backward: int = 4
  num_stages_backward: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
      value = getattr(self, name)
      if not is_power_of_two(value) or value < MIN_BLOCK:
        raise ValueError(f"FlashConfig.{name} must be a power of two >= {MIN_BLOCK}; got {value!r}.")
    for name in ("num_warps", "num_warps_backward"):
      value = getattr(self, name)
      if not is_power_of_two(value) or value > 16:
        raise ValueError(f"FlashConfig.{name} must be 1, 2, 4, 8 or 16; got {value!r}.")
    for name in ("num_stages", "num_stages_backward"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"FlashConfig.{name} must be a positive int; got {value!r}.")

  def fitted(self, length: int) -> "FlashConfig":
    """Blocks no longer than `length` rounded up to a power of two (>= 16), so short sequences pad little."""
    cap = max(MIN_BLOCK, 1 << max(length - 1, 0).bit_length())
    blocks = {
      name: min(getattr(self, name), cap)
      for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
    }
    return dataclasses.replace(self, **blocks)

  @property
  def multiple(self) -> int:
    """The sequence length is padded to a multiple of this (every block divides it: all are powers of two)."""
    return max(self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv, self.block_q_dq, self.block_k_dq)


def default_config(head_dim: int, dtype) -> FlashConfig:
  """Defaults chosen from first principles for Hopper (H100/H200), untuned until measured.

  16-bit inputs: the forward keeps a 128-row query tile resident and streams 64-key tiles through 3 pipeline
  stages (2 × 64 × D × 2 bytes of K and V per stage, well inside 228 KiB of shared memory); both backward
  kernels use 64 × 64 tiles, as each holds two fp32 [64, D] accumulators (dk and dv) or one plus the [64, D]
  query and output-gradient tiles in registers. D = 128 doubles the accumulators, so 8 warps share them.
  fp32 inputs double every tile's bytes: halved blocks and 2 stages."""
  if jnp.dtype(dtype) == jnp.float32:
    return FlashConfig(
      block_q=64,
      block_k=32,
      block_q_dkv=32,
      block_k_dkv=32,
      block_q_dq=32,
      block_k_dq=32,
      num_warps=4,
      num_stages=2,
      num_warps_backward=4,
      num_stages_backward=2,
    )
  warps = 4 if head_dim <= 64 else 8
  return FlashConfig(num_warps=warps, num_warps_backward=warps)
