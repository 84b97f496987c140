"""The compute-optimal envelope: minimum training loss over model sizes at each compute budget.

Interpolation (arXiv 2406.16690 §4.1 takes the envelope without stating how): every run is placed on one
shared grid of ``num_points`` log-spaced compute values spanning all runs. A run's log-loss (and log-tokens)
is interpolated linearly in log-C between its own logged points, and only inside its own compute range (no
extrapolation: a run contributes nothing before its first or after its last logged point). At each grid point
the envelope is the smallest interpolated loss among the runs that cover it; that run's non-embedding
parameters give N_opt and its interpolated tokens give D_opt. Grid points no run covers are dropped.

Training loss is noisy and a minimum over noisy curves is biased low, so ``smoothing_window`` (odd, default 1
= off) first replaces each run's log-loss by a centred moving average over that many logged points; near the
ends the window shrinks symmetrically, which keeps straight stretches of log-loss unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lsm_jax.scaling.curves import Run


@dataclasses.dataclass(frozen=True)
class Envelope:
  compute_pflops_days: np.ndarray
  loss: np.ndarray
  non_embedding_params: np.ndarray  # N_opt at each compute value
  tokens: np.ndarray  # D_opt at each compute value
  run_index: np.ndarray  # which run attains the minimum (index into the runs passed in)


def compute_grid(runs: list[Run], num_points: int = 1000) -> np.ndarray:
  """``num_points`` log-spaced compute values from the smallest to the largest logged compute."""
  if num_points < 2:
    raise ValueError(f"num_points must be at least 2, got {num_points}")
  low = min(run.compute_pflops_days[0] for run in runs)
  high = max(run.compute_pflops_days[-1] for run in runs)
  grid = np.logspace(np.log10(low), np.log10(high), num_points)
  grid[[0, -1]] = low, high  # exact ends, so rounding never drops the first or last logged point
  return grid


def smooth_log_loss(loss: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average of log(loss) over ``window`` points (symmetric, shrinking at the ends)."""
  if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
    raise ValueError(f"smoothing_window must be an odd positive integer, got {window!r}")
  if window == 1:
    return loss
  index = np.arange(loss.size)
  half = np.minimum(window // 2, np.minimum(index, loss.size - 1 - index))
  cumulative = np.concatenate([[0.0], np.cumsum(np.log(loss))])
  return np.exp((cumulative[index + half + 1] - cumulative[index - half]) / (2 * half + 1))


def interpolate_run(run: Run, compute: np.ndarray, smoothing_window: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(loss, tokens) of one run at ``compute``, NaN outside the run's own compute range."""
  log_compute = np.log(run.compute_pflops_days)
  target = np.log(compute)
  inside = (target >= log_compute[0]) & (target <= log_compute[-1])
  loss = np.full(compute.shape, np.nan)
  tokens = np.full(compute.shape, np.nan)
  log_loss = np.log(smooth_log_loss(run.loss, smoothing_window))
  loss[inside] = np.exp(np.interp(target[inside], log_compute, log_loss))
  tokens[inside] = np.exp(np.interp(target[inside], log_compute, np.log(run.tokens)))
  return loss, tokens


def compute_envelope(
  runs: list[Run],
  *,
  num_points: int = 1000,
  compute_range: tuple[float, float] | None = None,
  smoothing_window: int = 1,
) -> Envelope:
  """The envelope on the shared grid, optionally restricted to ``compute_range`` = (low, high)."""
  if not runs:
    raise ValueError("compute_envelope needs at least one run")
  grid = compute_grid(runs, num_points)
  losses, tokens = zip(*(interpolate_run(run, grid, smoothing_window) for run in runs))
  losses = np.stack(losses)
  tokens = np.stack(tokens)
  covered = np.isfinite(losses).any(axis=0)
  if compute_range is not None:
    low, high = compute_range
    if not 0 <= low < high:
      raise ValueError(f"compute_range must be (low, high) with 0 <= low < high, got {compute_range}")
    covered &= (grid >= low) & (grid <= high)
  if covered.sum() < 2:
    raise ValueError(
      f"fewer than two envelope points inside compute_range {compute_range}; the runs span "
      f"{grid[0]:.4g} to {grid[-1]:.4g} PFLOP/s-days"
    )
  best = np.argmin(np.where(np.isfinite(losses), losses, np.inf)[:, covered], axis=0)
  columns = np.flatnonzero(covered)
  params = np.array([run.non_embedding_params for run in runs])
  return Envelope(
    compute_pflops_days=grid[covered],
    loss=losses[best, columns],
    non_embedding_params=params[best],
    tokens=tokens[best, columns],
    run_index=best,
  )
