"""Block-size arithmetic the Pallas kernels share (JAX only, like the rest of pallas_kernels)."""


def is_power_of_two(value) -> bool:
  """A positive int (not a bool) that is a power of two: what Triton block shapes and warp counts must be."""
  return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


def rows_dividing(n: int, rows: int) -> int:
  """The largest power of two <= rows (a power of two) that divides n: blocks of rows that never overhang."""
  while n % rows:
    rows //= 2
  return rows
