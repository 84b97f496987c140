"""The "auto" backend choice the GPU-kernel ops share (RMS norms, the loss's kernels, the GLU gradient): a Pallas GPU
kernel or XLA's form on a GPU, XLA's form elsewhere."""

import jax

BACKENDS = ("auto", "xla", "pallas_gpu")


def resolve_backend(op: str, backend: str, gpu_default: str, platform: str | None = None) -> str:
  """`backend` checked against BACKENDS (the error names `op`), "auto" mapped to `gpu_default` on a GPU and "xla"
  elsewhere; `platform` ("tpu", "gpu", "cpu"; None: the default device's)."""
  if backend not in BACKENDS:
    raise ValueError(f"Unknown {op} backend {backend!r}; valid: {', '.join(BACKENDS)}.")
  if backend != "auto":
    return backend
  return gpu_default if (platform or jax.default_backend()) == "gpu" else "xla"
