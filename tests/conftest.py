"""Test setup: eight fake CPU devices, set before jax is imported anywhere."""

import os

# Tiny shapes: XLA:CPU compile time dominates the suite, and LLVM's optimisation passes cost more than they save.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_CPU_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
