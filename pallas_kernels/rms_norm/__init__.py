"""Parameter-free RMS norm of a residual stream (SRMSNorm), with the residual add fused: XLA and Pallas GPU."""

from pallas_kernels.rms_norm.api import BACKENDS, residual_rms_norm, resolve_backend
from pallas_kernels.rms_norm.gpu import NormConfig, default_config

__all__ = ["BACKENDS", "NormConfig", "default_config", "resolve_backend", "residual_rms_norm"]
