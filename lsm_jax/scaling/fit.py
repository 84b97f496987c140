"""Scaling-law fits: the paper's three power laws in C, and a Chinchilla-style L(N, D) surface.

Power laws (paper §4, Table 3): L(C) = β·C^α, N_opt(C) = β_N·C^a, D_opt(C) = β_D·C^b, each an ordinary
least-squares line in log-log space through the compute-optimal envelope (``envelope.py``), C in
PFLOP/s-days. Confidence intervals are percentile intervals of a pairs bootstrap over the envelope
points: they measure how well a power law describes the envelope, not which model sizes were trained.

Chinchilla surface (Hoffmann et al. 2022, approach 3; beyond the paper): L(N, D) = E + A/N^α + B/D^β,
fitted on the Huber loss (δ = 1e-3) between log L and log of the prediction, written as a log-sum-exp in
(log A, log B, log E, α, β). Hoffmann et al. run L-BFGS from every point of a grid of initialisations; we
score that whole grid at once and polish only the best few with BFGS (five parameters: full BFGS is as
cheap as L-BFGS and converges tighter), which reaches the same minimum for a fraction of the cost.

Degenerate fits: a least-squares fit always returns numbers, even where the data cannot pin a law down (a few
nearly flat curves, too short a compute range). ``problems()`` of each fit lists what is implausible (an
exponent outside EXPONENT_RANGES / CHINCHILLA_EXPONENT_RANGE, E at its bound 0, a coefficient above
MAX_COEFFICIENT or not finite); the report keeps such fits in its tables, marked, and out of its predictions.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from lsm_jax import flops
from lsm_jax.scaling import curves as curves_lib
from lsm_jax.scaling import envelope as envelope_lib

LAWS = ("loss", "n_opt", "d_opt")  # L(C), N_opt(C), D_opt(C)
HUBER_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid: α, β ∈ {0, .5, …, 2}, log E ∈ {-1, -.5, …, 1},
# log A, log B ∈ {0, 5, …, 25}
_INIT_GRID = np.array(
  list(
    itertools.product(
      np.arange(0, 30, 5.0),
      np.arange(0, 30, 5.0),
      np.arange(-1, 1.5, 0.5),
      np.arange(0, 2.5, 0.5),
      np.arange(0, 2.5, 0.5),
    )
  )
)  # columns: log A, log B, log E, α, β

# Open intervals outside which a fitted exponent is degenerate. Loss falls with compute, but slower than 1/C;
# N_opt and D_opt both grow with C, each slower than C itself (C ∝ N·D, so a + b ≈ 1).
EXPONENT_RANGES = {"loss": (-1.0, 0.0), "n_opt": (0.0, 1.0), "d_opt": (0.0, 1.0)}
# α, β of L(N, D): Hoffmann et al.'s initialisation grid spans [0, 2] (their fit: 0.34, 0.28).
CHINCHILLA_EXPONENT_RANGE = (0.0, 2.0)
# E (nats) at or below this is at its bound 0: the irreducible loss was absorbed into the A and B terms.
CHINCHILLA_MIN_E = 1e-3
# A coefficient this large only cancels an extreme exponent (e.g. A = 6e112 with α = 19).
MAX_COEFFICIENT = 1e30


def _value_problems(name: str, value: float, valid_range: tuple[float, float] | None = None) -> list[str]:
  if not np.isfinite(value):
    return [f"{name} = {value} is not finite"]
  if abs(value) > MAX_COEFFICIENT:
    return [f"{name} = {value:.3g} exceeds {MAX_COEFFICIENT:.0e}"]
  if valid_range is not None and not valid_range[0] < value < valid_range[1]:
    return [f"{name} = {value:.4g} is outside ({valid_range[0]:g}, {valid_range[1]:g})"]
  return []


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coefficient · C^exponent, with optional 95% bootstrap intervals (low, high)."""

  coefficient: float
  exponent: float
  coefficient_ci: tuple[float, float] | None = None
  exponent_ci: tuple[float, float] | None = None

  def __call__(self, compute_pflops_days):
    return self.coefficient * np.asarray(compute_pflops_days, dtype=float) ** self.exponent

  def problems(self, law: str) -> list[str]:
    """Why this fit of `law` (one of LAWS) is degenerate; empty when it is plausible."""
    problems = _value_problems("coefficient", self.coefficient)
    if self.coefficient <= 0:
      problems.append(f"coefficient = {self.coefficient:.3g} is not positive")
    return problems + _value_problems("exponent", self.exponent, EXPONENT_RANGES[law])

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict) -> "PowerLaw":
    return cls(
      coefficient=float(data["coefficient"]),
      exponent=float(data["exponent"]),
      coefficient_ci=_pair(data.get("coefficient_ci")),
      exponent_ci=_pair(data.get("exponent_ci")),
    )


def _pair(values):
  return None if values is None else (float(values[0]), float(values[1]))


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
  """L(N, D) = E + A/N^α + B/D^β, and C ≈ flops_per_param_token · N · D to turn it into an allocation."""

  E: float
  A: float
  B: float
  alpha: float
  beta: float
  flops_per_param_token: float  # median of C/(N·D) over the fitted points (6 for C = 6ND)

  def loss(self, non_embedding_params, tokens):
    return (
      self.E
      + self.A / np.asarray(non_embedding_params, dtype=float) ** self.alpha
      + self.B / np.asarray(tokens, dtype=float) ** self.beta
    )

  def optimal_allocation(self, compute_pflops_days):
    """(N_opt, D_opt, loss) minimising L(N, D) subject to flops_per_param_token · N · D = C."""
    product = np.asarray(compute_pflops_days, dtype=float) * flops.PFLOP_S_DAY / self.flops_per_param_token
    scale = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    n_opt = scale * product ** (self.beta / (self.alpha + self.beta))
    d_opt = product / n_opt
    return n_opt, d_opt, self.loss(n_opt, d_opt)

  def problems(self) -> list[str]:
    """Why this surface is degenerate (its allocations meaningless); empty when it is plausible."""
    problems = []
    if not np.isfinite(self.E) or self.E <= CHINCHILLA_MIN_E:
      problems.append(f"E = {self.E:.3g} is at its bound 0 (≤ {CHINCHILLA_MIN_E:g})")
    for name in ("A", "B"):
      problems += _value_problems(name, getattr(self, name))
    for name, symbol in (("alpha", "α"), ("beta", "β")):
      problems += _value_problems(symbol, getattr(self, name), CHINCHILLA_EXPONENT_RANGE)
    return problems

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict) -> "ChinchillaFit":
    return cls(**{field.name: float(data[field.name]) for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class ScalingFit:
  """All fits of one architecture; ``envelope`` is kept for plotting and is not serialised."""

  arch: str
  loss: PowerLaw
  n_opt: PowerLaw
  d_opt: PowerLaw
  compute_range: tuple[float, float] | None = None  # the envelope's span in PFLOP/s-days
  sizes: tuple[str, ...] = ()
  chinchilla: ChinchillaFit | None = None
  envelope: envelope_lib.Envelope | None = dataclasses.field(default=None, compare=False, repr=False)

  def predict(self, compute_pflops_days) -> dict:
    """Compute-optimal non-embedding parameters, tokens and loss at a budget (PFLOP/s-days)."""
    return {
      "compute_pflops_days": compute_pflops_days,
      "n_opt": self.n_opt(compute_pflops_days),
      "d_opt": self.d_opt(compute_pflops_days),
      "loss": self.loss(compute_pflops_days),
    }

  def problems(self) -> dict[str, list[str]]:
    """{law or "chinchilla": reasons} for each degenerate part of the fit; empty when all are plausible."""
    problems = {law: getattr(self, law).problems(law) for law in LAWS}
    if self.chinchilla is not None:
      problems["chinchilla"] = self.chinchilla.problems()
    return {part: reasons for part, reasons in problems.items() if reasons}

  def to_dict(self) -> dict:
    """The fit's numbers, and under "degenerate" the problems() found (not read back: recomputed)."""
    return {
      "arch": self.arch,
      **{law: getattr(self, law).to_dict() for law in LAWS},
      "compute_range": None if self.compute_range is None else list(self.compute_range),
      "sizes": list(self.sizes),
      "chinchilla": None if self.chinchilla is None else self.chinchilla.to_dict(),
      "degenerate": self.problems(),
    }

  @classmethod
  def from_dict(cls, data: dict) -> "ScalingFit":
    missing = [key for key in ("arch", *LAWS) if key not in data]
    if missing:
      raise ValueError(f"a fit entry lacks {', '.join(missing)}; it needs arch, {', '.join(LAWS)}")
    return cls(
      arch=data["arch"],
      **{law: PowerLaw.from_dict(data[law]) for law in LAWS},
      compute_range=_pair(data.get("compute_range")),
      sizes=tuple(data.get("sizes", ())),
      chinchilla=None if data.get("chinchilla") is None else ChinchillaFit.from_dict(data["chinchilla"]),
    )


def fit_power_law(compute, values, *, num_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> PowerLaw:
  """Least squares of log(values) on log(compute); ``num_bootstrap=0`` skips the intervals."""
  log_x = np.log(np.asarray(compute, dtype=float))
  log_y = np.log(np.asarray(values, dtype=float))
  if log_x.shape != log_y.shape or log_x.size < 2 or np.ptp(log_x) == 0:
    raise ValueError(f"a power-law fit needs at least two points at distinct compute; got {log_x.size}")
  exponent, intercept = np.polyfit(log_x, log_y, 1)
  if num_bootstrap <= 0:
    return PowerLaw(float(np.exp(intercept)), float(exponent))
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, log_x.size, size=(num_bootstrap, log_x.size))
  x, y = log_x[picks], log_y[picks]
  x_centered = x - x.mean(axis=1, keepdims=True)
  variance = (x_centered**2).sum(axis=1)
  usable = variance > 0  # a draw of one repeated point has no slope
  slopes = (x_centered * (y - y.mean(axis=1, keepdims=True))).sum(axis=1)[usable] / variance[usable]
  intercepts = y.mean(axis=1)[usable] - slopes * x.mean(axis=1)[usable]
  tail = 100 * (1 - confidence) / 2
  exponent_ci = tuple(float(v) for v in np.percentile(slopes, [tail, 100 - tail]))
  coefficient_ci = tuple(float(v) for v in np.exp(np.percentile(intercepts, [tail, 100 - tail])))
  return PowerLaw(float(np.exp(intercept)), float(exponent), coefficient_ci, exponent_ci)


def _huber_objective(theta, log_params, log_tokens, log_loss):
  log_a, log_b, log_e, alpha, beta = theta
  terms = np.stack([log_a - alpha * log_params, log_b - beta * log_tokens, np.full_like(log_params, log_e)])
  top = terms.max(axis=0)
  weights = np.exp(terms - top)
  total = weights.sum(axis=0)
  residual = top + np.log(total) - log_loss
  weights /= total
  small = np.abs(residual) <= HUBER_DELTA
  value = np.where(small, 0.5 * residual**2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA)).mean()
  slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) / residual.size
  gradient = np.array(
    [
      (slope * weights[0]).sum(),
      (slope * weights[1]).sum(),
      (slope * weights[2]).sum(),
      -(slope * weights[0] * log_params).sum(),
      -(slope * weights[1] * log_tokens).sum(),
    ]
  )
  return value, gradient


def _huber_on_grid(grid, log_params, log_tokens, log_loss):
  """The objective at every initialisation at once (no gradient), to pick where to start BFGS."""
  log_a, log_b, log_e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
  prediction = np.logaddexp(np.logaddexp(log_a - alpha * log_params, log_b - beta * log_tokens), log_e)
  residual = np.abs(prediction - log_loss)
  return np.where(residual <= HUBER_DELTA, 0.5 * residual**2, HUBER_DELTA * (residual - 0.5 * HUBER_DELTA)).mean(axis=1)


def fit_chinchilla(non_embedding_params, tokens, loss, compute_pflops_days, *, num_starts: int = 8) -> ChinchillaFit:
  """Huber fit of L(N, D) = E + A/N^α + B/D^β on every logged point (N, D, L)."""
  arrays = [
    np.asarray(values, dtype=float).ravel() for values in (non_embedding_params, tokens, loss, compute_pflops_days)
  ]
  if len({array.size for array in arrays}) != 1 or arrays[0].size < 5:
    raise ValueError("fit_chinchilla needs equally long arrays with at least 5 points (5 free parameters)")
  if np.unique(arrays[0]).size < 2:
    raise ValueError("fit_chinchilla needs at least two model sizes to separate A/N^α from B/D^β")
  import scipy.optimize  # deferred: seconds to import, and only this fit needs it

  log_params, log_tokens, log_loss = (np.log(array) for array in arrays[:3])
  scores = _huber_on_grid(_INIT_GRID, log_params, log_tokens, log_loss)
  best = None
  for start in _INIT_GRID[np.argsort(scores)[:num_starts]]:
    result = scipy.optimize.minimize(
      _huber_objective,
      start,
      args=(log_params, log_tokens, log_loss),
      jac=True,
      method="BFGS",
      options={"maxiter": 5000, "gtol": 1e-12},
    )
    if best is None or result.fun < best.fun:
      best = result
  log_a, log_b, log_e, alpha, beta = best.x
  flops_per_param_token = float(np.median(arrays[3] * flops.PFLOP_S_DAY / (arrays[0] * arrays[1])))
  return ChinchillaFit(
    E=float(np.exp(log_e)),
    A=float(np.exp(log_a)),
    B=float(np.exp(log_b)),
    alpha=float(alpha),
    beta=float(beta),
    flops_per_param_token=flops_per_param_token,
  )


def fit_runs(
  runs: list[curves_lib.Run],
  *,
  num_points: int = 1000,
  num_bootstrap: int = 1000,
  seed: int = 0,
  compute_range: tuple[float, float] | None = None,
  smoothing_window: int = 1,
  chinchilla: bool = True,
) -> ScalingFit:
  """Envelope + the three power laws (+ the Chinchilla surface on all points) for one architecture."""
  envelope = envelope_lib.compute_envelope(
    runs, num_points=num_points, compute_range=compute_range, smoothing_window=smoothing_window
  )
  arch = runs[0].arch
  if np.unique(envelope.non_embedding_params).size < 2:
    raise ValueError(
      f"the {arch} envelope is attained by one model size only; N_opt(C) needs at least two "
      "sizes on the envelope (train longer or add sizes, or widen compute_range)"
    )
  laws = {
    law: fit_power_law(envelope.compute_pflops_days, values, num_bootstrap=num_bootstrap, seed=seed)
    for law, values in (("loss", envelope.loss), ("n_opt", envelope.non_embedding_params), ("d_opt", envelope.tokens))
  }
  surface = None
  if chinchilla:

    def stacked(field):
      return np.concatenate([getattr(run, field) * np.ones_like(run.loss) for run in runs])

    surface = fit_chinchilla(
      stacked("non_embedding_params"), stacked("tokens"), stacked("loss"), stacked("compute_pflops_days")
    )
  span = (float(envelope.compute_pflops_days[0]), float(envelope.compute_pflops_days[-1]))
  return ScalingFit(
    arch=arch, **laws, compute_range=span, sizes=tuple(run.size for run in runs), chinchilla=surface, envelope=envelope
  )


def fit_all(curves, **options) -> dict[str, ScalingFit]:
  """Per-architecture fits from a curves file path, a list of row dicts, or ``{arch: [Run, ...]}``.

  ``options`` go to :func:`fit_runs` (num_points, num_bootstrap, seed, compute_range, smoothing_window,
  chinchilla).
  """
  return {arch: fit_runs(runs, **options) for arch, runs in curves_lib.load_curves(curves).items()}


def fits_to_json(fits: dict[str, ScalingFit]) -> dict:
  """The JSON document ``fit --format=json`` prints and ``predict --fit=FILE`` reads."""
  return {"unit_of_compute": "PFLOP/s-days", "fits": {arch: fit.to_dict() for arch, fit in fits.items()}}


def fits_from_json(document: dict) -> dict[str, ScalingFit]:
  if not isinstance(document, dict) or not isinstance(document.get("fits"), dict):
    raise ValueError(
      'a fit file must be a JSON object {"fits": {arch: {...}}} as written by '
      "`python -m lsm_jax.scaling fit --format=json`"
    )
  return {arch: ScalingFit.from_dict(entry) for arch, entry in document["fits"].items()}
