"""Block-size arithmetic the Pallas kernels share (JAX only, like the rest of pallas_kernels)."""


def is_power_of_two(value) -> bool:
  """A positive int (not a bool) that is a power of two: what Triton block shapes and warp counts must be."""
  return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


def check_powers_of_two(config, limits) -> None:
  """Raises one error naming the first of `limits` ((field, largest value), ...) of a frozen config that is not a
  power of two at most its limit."""
  for name, limit in limits:
    value = getattr(config, name)
    if not is_power_of_two(value) or value > limit:
      raise ValueError(f"{type(config).__name__}.{name} must be a power of two <= {limit}; got {value!r}.")


def rows_dividing(n: int, rows: int) -> int:
  """The largest power of two <= rows (a power of two) that divides n: blocks of rows that never overhang."""
  while n % rows:
    rows //= 2
  return rows
