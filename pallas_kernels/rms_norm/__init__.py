"""Parameter-free RMS norms (SRMSNorm) as fused kernels: a residual stream's pre-norm with the residual add, and a
mixer's output norm with its sigmoid gate. XLA and Pallas GPU."""

from pallas_kernels.rms_norm.api import BACKENDS, gated_rms_norm, residual_rms_norm, resolve_backend
from pallas_kernels.rms_norm.gpu import NormConfig, default_config

__all__ = ["BACKENDS", "gated_rms_norm", "NormConfig", "default_config", "resolve_backend", "residual_rms_norm"]
