"""Figure-1-style (loss, N_opt, D_opt vs compute) and Figure-2-style (downstream metric vs compute) PNGs."""

from __future__ import annotations

import os
import re

import matplotlib
import numpy as np

# Figure without pyplot: renders straight to PNG, touches no global backend state of the caller.
from matplotlib.figure import Figure

from lsm_jax.scaling.curves import Run
from lsm_jax.scaling.fit import ScalingFit
from lsm_jax.scaling.report import DISPLAY_NAMES

_PANELS = (
  ("loss", "L(C)", "training loss"),
  ("n_opt", "N_opt(C)", "non-embedding parameters"),
  ("d_opt", "D_opt(C)", "tokens"),
)


def _file_name(*parts: str) -> str:
  return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-") for part in parts) + ".png"


def _draw_arch(axes, fit: ScalingFit, runs: list[Run]) -> None:
  """One row of Figure 1: every run + envelope + fit of L(C); the envelope's N_opt and D_opt + their fits."""
  if fit.envelope is None:
    raise ValueError(f"the {fit.arch} fit carries no envelope to plot; build it with fit_all(curves)")
  envelope = fit.envelope
  colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(runs)))
  for run, colour in zip(runs, colours):
    axes[0].plot(run.compute_pflops_days, run.loss, color=colour, linewidth=1, alpha=0.8, label=run.size)
  envelope_values = {"loss": envelope.loss, "n_opt": envelope.non_embedding_params, "d_opt": envelope.tokens}
  compute = envelope.compute_pflops_days
  name = DISPLAY_NAMES.get(fit.arch, fit.arch)
  for axis, (law, title, label) in zip(axes, _PANELS):
    axis.plot(compute, envelope_values[law], color="black", linewidth=2, label="envelope")
    power_law = getattr(fit, law)
    axis.plot(
      compute,
      power_law(compute),
      color="red",
      linestyle="--",
      label=f"{power_law.coefficient:.4g}·C^{power_law.exponent:.4f}",
    )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("compute (PFLOP/s-days)")
    axis.set_ylabel(label)
    axis.set_title(f"{name}: {title}")
    axis.legend(fontsize=6)


def plot_fits(fits: dict[str, ScalingFit], runs: dict[str, list[Run]], out_dir: str | os.PathLike) -> list[str]:
  """``figure1.png`` (one row per arch) and ``scaling_<arch>.png`` per arch; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  figure = Figure(figsize=(15, 4 * len(fits)))
  grid = figure.subplots(len(fits), 3, squeeze=False)
  for axes, (arch, fit) in zip(grid, fits.items()):
    _draw_arch(axes, fit, runs[arch])
  figure.tight_layout()
  written.append(os.path.join(out_dir, "figure1.png"))
  figure.savefig(written[-1], dpi=100)
  for arch, fit in fits.items():
    figure = Figure(figsize=(15, 4))
    axes = figure.subplots(1, 3)
    _draw_arch(axes, fit, runs[arch])
    figure.tight_layout()
    written.append(os.path.join(out_dir, _file_name("scaling", arch)))
    figure.savefig(written[-1], dpi=100)
  return written


def plot_downstream(table: dict[str, np.ndarray], out_dir: str | os.PathLike) -> list[str]:
  """One PNG per (task, metric): a panel per arch, value vs compute, one line per model size (Figure 2)."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  pairs = dict.fromkeys(zip(table["task"], table["metric"]))
  for task, metric in pairs:
    selected = (table["task"] == task) & (table["metric"] == metric)
    archs = list(dict.fromkeys(table["arch"][selected]))
    figure = Figure(figsize=(5 * len(archs), 4))
    axes = figure.subplots(1, len(archs), squeeze=False, sharey=True)
    for axis, arch in zip(axes[0], archs):
      in_arch = selected & (table["arch"] == arch)
      sizes = list(dict.fromkeys(table["size"][in_arch]))
      colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(sizes)))
      for size, colour in zip(sizes, colours):
        rows = np.flatnonzero(in_arch & (table["size"] == size))
        rows = rows[np.argsort(table["compute_pflops_days"][rows])]
        axis.plot(
          table["compute_pflops_days"][rows], table["value"][rows], marker="o", markersize=2, color=colour, label=size
        )
      axis.set_xscale("log")
      if "ppl" in metric.lower() or "perplexity" in metric.lower():
        axis.set_yscale("log")
      axis.set_xlabel("compute (PFLOP/s-days)")
      axis.set_title(f"{DISPLAY_NAMES.get(arch, arch)}: {task} {metric}")
      axis.legend(fontsize=6)
    axes[0][0].set_ylabel(metric)
    figure.tight_layout()
    written.append(os.path.join(out_dir, _file_name("downstream", task, metric)))
    figure.savefig(written[-1], dpi=100)
  return written
