"""A cross-entropy over a wide vocabulary: its row statistics (log-normaliser and the target's logit) in one pass
over the logits, and the softmax gradient. XLA and Pallas GPU."""

from pallas_kernels.cross_entropy.api import BACKENDS, resolve_backend, row_log_normalizer_and_pick, softmax_gradient
from pallas_kernels.cross_entropy.gpu import RowStatsConfig, SoftmaxGradConfig

__all__ = [
  "BACKENDS",
  "RowStatsConfig",
  "SoftmaxGradConfig",
  "resolve_backend",
  "row_log_normalizer_and_pick",
  "softmax_gradient",
]
