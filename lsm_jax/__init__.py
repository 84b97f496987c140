"""lsm_jax: scaling laws of linear-complexity language models in JAX."""

__version__ = "0.1.0"
