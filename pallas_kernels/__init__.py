"""Pallas kernels for lsm_jax. Imports nothing from lsm_jax."""
