"""Flash attention with causal masking and packed documents (segment ids) as Pallas GPU kernels."""

from pallas_kernels.attention.config import FlashConfig, default_config
from pallas_kernels.attention.flash import HEAD_DIMS, block_ranges, flash_attention

__all__ = ["HEAD_DIMS", "FlashConfig", "block_ranges", "default_config", "flash_attention"]
