"""The paper's Table 3 as data, and compute-optimal predictions from it or from our own fits."""

from __future__ import annotations

import json
import math
import numbers
import os

from lsm_jax.flops import ARCHS
from lsm_jax.scaling.fit import LAWS, PowerLaw, ScalingFit, fits_from_json

# arXiv 2406.16690 Table 3, C in PFLOP/s-days: (coefficient, exponent) of L(C), N_opt(C), D_opt(C).
TABLE_3 = {
  "llama": {"loss": (3.7087, -0.0798), "n_opt": (1.82e8, 0.7118), "d_opt": (2.56e10, 0.5102)},
  "tnl": {"loss": (3.5391, -0.0768), "n_opt": (2.74e8, 0.6470), "d_opt": (4.43e10, 0.4684)},
  "hgrn2": {"loss": (3.4788, -0.0753), "n_opt": (2.66e8, 0.6427), "d_opt": (4.80e10, 0.4500)},
  "cosformer2": {"loss": (3.5877, -0.0756), "n_opt": (2.65e8, 0.6516), "d_opt": (4.23e10, 0.4529)},
}


def paper_fits() -> dict[str, ScalingFit]:
  """Table 3 as ScalingFit objects (no intervals: the paper reports none)."""
  return {arch: ScalingFit(arch=arch, **{law: PowerLaw(*TABLE_3[arch][law]) for law in LAWS}) for arch in ARCHS}


def load_fits(source=None) -> dict[str, ScalingFit]:
  """Fits from None (the paper's Table 3), a fit JSON file path, or a mapping {arch: ScalingFit}."""
  if source is None:
    return paper_fits()
  if isinstance(source, dict):
    return source
  path = os.fspath(source)
  if not os.path.exists(path):
    raise ValueError(f"fit file {path!r} does not exist")
  with open(path, encoding="utf-8") as file:
    try:
      document = json.load(file)
    except json.JSONDecodeError as error:
      raise ValueError(f"fit file {path!r} is not JSON ({error.msg})") from None
  return fits_from_json(document)


def predict(arch: str, compute_pflops_days: float, fit=None) -> dict:
  """Compute-optimal N (non-embedding params), D (tokens) and loss for ``arch`` at a budget.

  ``fit``: None for the paper's Table 3, a fit JSON path, or ``{arch: ScalingFit}`` from ``fit_all``.
  """
  fits = load_fits(fit)
  if arch not in fits:
    raise ValueError(f"no fit for arch {arch!r}; available: {', '.join(fits)}")
  if (
    isinstance(compute_pflops_days, bool)
    or not isinstance(compute_pflops_days, numbers.Real)
    or not math.isfinite(compute_pflops_days)
    or compute_pflops_days <= 0
  ):
    raise ValueError(f"compute must be a positive number of PFLOP/s-days, got {compute_pflops_days!r}")
  problems = {law: reasons for law, reasons in fits[arch].problems().items() if law in LAWS}
  if problems:
    raise ValueError(
      f"the {arch} fit is degenerate and predicts nothing: "
      + "; ".join(f"{law}: {', '.join(reasons)}" for law, reasons in problems.items())
    )
  prediction = fits[arch].predict(float(compute_pflops_days))
  return {"arch": arch, **{key: float(value) for key, value in prediction.items()}}
