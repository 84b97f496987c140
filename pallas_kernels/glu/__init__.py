"""A fused GLU's product (up · act(gate) from one [..., 2, F] projection) with its gradient as one kernel. XLA and
Pallas GPU."""

from pallas_kernels.glu.api import BACKENDS, glu, resolve_backend
from pallas_kernels.glu.gpu import GluGradConfig

__all__ = ["BACKENDS", "GluGradConfig", "glu", "resolve_backend"]
