"""The row statistics of a cross-entropy over a wide vocabulary (log-normaliser and the target's logit) in one
pass over the logits. XLA and Pallas GPU."""

from pallas_kernels.cross_entropy.api import BACKENDS, resolve_backend, row_log_normalizer_and_pick
from pallas_kernels.cross_entropy.gpu import RowStatsConfig

__all__ = ["BACKENDS", "RowStatsConfig", "resolve_backend", "row_log_normalizer_and_pick"]
