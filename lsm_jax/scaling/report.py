"""Markdown tables in the layout of the paper's Table 3 (and the allocations it implies).

Degenerate fits (``ScalingFit.problems()``) stay in the fit tables, marked †, and are left out of every
prediction (allocation cells and the Chinchilla N_opt / D_opt columns read "—"); the report lists why.
"""

from __future__ import annotations

import math
import os

from lsm_jax.scaling.fit import (
  CHINCHILLA_EXPONENT_RANGE,
  CHINCHILLA_MIN_E,
  EXPONENT_RANGES,
  MAX_COEFFICIENT,
  ScalingFit,
)
from lsm_jax.scaling.paper import paper_fits

DISPLAY_NAMES = {
  "llama": "LLaMA",
  "tnl": "TNL",
  "hgrn2": "HGRN2",
  "cosformer2": "cosFormer2",
  "tnl_hybrid": "TNL hybrid",
  "hgrn2_hybrid": "HGRN2 hybrid",
}
BUDGETS = (1.0, 10.0, 100.0, 1000.0)  # PFLOP/s-days at which Table 3's allocations are derived


def _name(arch: str) -> str:
  return DISPLAY_NAMES.get(arch, arch)


def _scientific(value: float) -> str:
  if not math.isfinite(value) or value == 0:
    return f"({value})"
  exponent = math.floor(math.log10(abs(value)))
  return f"({value / 10**exponent:.2f}×10^{exponent})"


def format_power_law(law, kind: str) -> str:
  """'3.7087 C^-0.0798' for a loss law, '(1.82×10^8) C^0.7118' for N_opt/D_opt, as Table 3 prints them."""
  coefficient = f"{law.coefficient:.4f}" if kind == "loss" else _scientific(law.coefficient)
  return f"{coefficient} C^{law.exponent:.4f}"


def _interval(values, digits: int) -> str:
  return "—" if values is None else f"[{values[0]:.{digits}f}, {values[1]:.{digits}f}]"


def _quantity(value: float) -> str:
  return f"{value / 1e12:.2f}T" if value >= 1e12 else f"{value / 1e9:.2f}B"


DEGENERATE_MARK = " †"


def format_table(fits: dict[str, ScalingFit]) -> str:
  """Table 3 layout: one row per architecture with L(C), N_opt(C), D_opt(C) (C in PFLOP/s-days); † marks a
  degenerate law."""
  lines = ["| Arch | L(C) | N_opt(C) | D_opt(C) |", "|---|---|---|---|"]
  for arch, fit in fits.items():
    problems = fit.problems()
    cells = [
      format_power_law(getattr(fit, law), law) + (DEGENERATE_MARK if law in problems else "")
      for law in ("loss", "n_opt", "d_opt")
    ]
    lines.append(f"| {_name(arch)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_intervals(fits: dict[str, ScalingFit]) -> str:
  lines = [
    "| Arch | α_L 95% CI | a (N_opt) 95% CI | b (D_opt) 95% CI | envelope C range | sizes |",
    "|---|---|---|---|---|---|",
  ]
  for arch, fit in fits.items():
    span = "—" if fit.compute_range is None else f"{fit.compute_range[0]:.3g}–{fit.compute_range[1]:.3g}"
    lines.append(
      f"| {_name(arch)} | {_interval(fit.loss.exponent_ci, 4)} | {_interval(fit.n_opt.exponent_ci, 4)} "
      f"| {_interval(fit.d_opt.exponent_ci, 4)} | {span} | {', '.join(fit.sizes)} |"
    )
  return "\n".join(lines)


def format_chinchilla(fits: dict[str, ScalingFit]) -> str:
  """The L(N, D) surfaces; a degenerate one is marked † and its allocation at C = 100 left out."""
  lines = [
    "| Arch | E | A | α | B | β | C/(N·D) | N_opt at C=100 | D_opt at C=100 |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for arch, fit in fits.items():
    surface = fit.chinchilla
    if surface is None:
      continue
    if surface.problems():
      allocation = ["—", "—"]
    else:
      allocation = [_quantity(value) for value in surface.optimal_allocation(100.0)[:2]]
    mark = DEGENERATE_MARK if surface.problems() else ""
    lines.append(
      f"| {_name(arch)}{mark} | {surface.E:.4f} | {surface.A:.4g} | {surface.alpha:.4f} | "
      f"{surface.B:.4g} | {surface.beta:.4f} | {surface.flops_per_param_token:.3f} | " + " | ".join(allocation) + " |"
    )
  return "\n".join(lines)


def format_problems(fits: dict[str, ScalingFit]) -> str:
  """One line per degenerate law or surface with its reasons; empty when every fit is plausible."""
  names = {"loss": "L(C)", "n_opt": "N_opt(C)", "d_opt": "D_opt(C)", "chinchilla": "L(N, D)"}
  lines = [
    f"- {_name(arch)} {names[part]}: {'; '.join(reasons)}"
    for arch, fit in fits.items()
    for part, reasons in fit.problems().items()
  ]
  if not lines:
    return ""
  return "\n".join(["Degenerate fits (marked †; left out of every prediction in this report):", "", *lines])


def format_allocations(fits: dict[str, ScalingFit], budgets=BUDGETS) -> str:
  """N_opt / D_opt / L at each budget, one column per architecture ("—" where a law is degenerate)."""
  lines = ["| C (PF-days) | " + " | ".join(_name(arch) for arch in fits) + " |", "|---|" + "---|" * len(fits)]
  for budget in budgets:
    cells = []
    for fit in fits.values():
      problems = fit.problems()
      n_opt = "—" if "n_opt" in problems else _quantity(float(fit.n_opt(budget)))
      d_opt = "—" if "d_opt" in problems else _quantity(float(fit.d_opt(budget)))
      loss = "—" if "loss" in problems else f"{float(fit.loss(budget)):.3f}"
      cells.append(f"{n_opt} / {d_opt} / {loss}")
    lines.append(f"| {budget:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _open_interval(bounds: tuple[float, float]) -> str:
  return f"({bounds[0]:g}, {bounds[1]:g})"


_PROBLEM_RANGES = (
  f"A fit is degenerate when an exponent leaves its range (L(C): {_open_interval(EXPONENT_RANGES['loss'])}, "
  f"N_opt(C) and D_opt(C): {_open_interval(EXPONENT_RANGES['n_opt'])}, α and β of L(N, D): "
  f"{_open_interval(CHINCHILLA_EXPONENT_RANGE)}), E is at its bound "
  f"0 (≤ {CHINCHILLA_MIN_E:g}), or a coefficient is not finite or above {MAX_COEFFICIENT:.0e}: the data do not "
  "determine that law (typically a few nearly flat curves or too short a compute range)."
)


def write_report(fits: dict[str, ScalingFit], path: str | os.PathLike, *, compare_to_paper: bool = True) -> str:
  """Write the markdown report (ours, and the paper's Table 3 beside it) to ``path``; returns the text."""
  sections = [
    "# Scaling laws (C in PFLOP/s-days)",
    "",
    "## Fitted power laws (Table 3 layout)",
    "",
    format_table(fits),
    "",
    "## Bootstrap intervals",
    "",
    format_intervals(fits),
    "",
    "## Compute-optimal allocations (N_opt / D_opt / L)",
    "",
    format_allocations(fits),
  ]
  if any(fit.chinchilla is not None for fit in fits.values()):
    sections += ["", "## Chinchilla-style L(N, D) = E + A/N^α + B/D^β", "", format_chinchilla(fits)]
  problems = format_problems(fits)
  if problems:
    sections += ["", "## Degenerate fits", "", problems, "", _PROBLEM_RANGES]
  if compare_to_paper:
    paper = {arch: fit for arch, fit in paper_fits().items() if arch in fits} or paper_fits()
    sections += [
      "",
      "## The paper's Table 3 (arXiv 2406.16690)",
      "",
      format_table(paper),
      "",
      format_allocations(paper),
    ]
  text = "\n".join(sections) + "\n"
  with open(path, "w", encoding="utf-8") as file:
    file.write(text)
  return text
