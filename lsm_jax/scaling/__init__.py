"""Scaling-law analysis for lsm_jax (arXiv 2406.16690 §4): envelope, fits, Table 3, Figures 1 and 2.

Needs no model code: compute comes from ``lsm_jax.flops`` (Table 1 FLOPs, PFLOP/s-days).

Python API::

  from lsm_jax import scaling
  runs = scaling.load_curves("curves.csv")       # CSV or JSON lines: arch, size, non_embedding_params,
                                                 # tokens, compute_pflops_days, loss (one row per logged point)
  fits = scaling.fit_all(runs)                   # {arch: ScalingFit}: L(C), N_opt(C), D_opt(C) power laws
                                                 # with bootstrap CIs, the envelope, a Chinchilla L(N, D) fit
  scaling.write_report(fits, "scaling.md")       # Table-3-layout markdown, next to the paper's own Table 3
  scaling.plot_fits(fits, runs, "plots/")        # figure1.png + scaling_<arch>.png
  scaling.plot_downstream(scaling.load_eval_table("eval.csv"), "plots/")   # Figure-2-style, per task/metric
  scaling.predict("hgrn2", 100.0)                # from the paper's Table 3; fit=fits or a fit JSON path
  fits["tnl"].chinchilla.optimal_allocation(100.0)   # (N_opt, D_opt, L) implied by the L(N, D) surface
  fits["tnl"].problems()                         # {law: reasons} of degenerate parts; the report marks them †
                                                 # and leaves them out of its predictions, predict() refuses them

Training run directories (``run_metadata.json`` + ``metrics.jsonl``) become curves with
``scaling.curves_from_run_dirs([...])`` (Table 1 N and C recomputed from the shapes via ``lsm_jax.flops``).

Command line::

  python -m lsm_jax.scaling curves --run_dir=MODEL_DIR [--run_dir=...] --out=curves.csv
  python -m lsm_jax.scaling fit --curves=FILE [--format=json|table]
  python -m lsm_jax.scaling plot --curves=FILE [--eval_table=FILE] --out=DIR
  python -m lsm_jax.scaling predict --arch=hgrn2 --compute=C [--fit=FILE]

Input that cannot give a meaningful fit (a missing column, NaN or non-positive values, compute not
increasing within a run, a single model size for an architecture) raises one ValueError naming the problem.
"""

from lsm_jax.scaling.curves import (
  CURVE_COLUMNS,
  EVAL_COLUMNS,
  Run,
  curves_from_run_dirs,
  load_curves,
  load_eval_table,
  write_curves,
)
from lsm_jax.scaling.envelope import Envelope, compute_envelope
from lsm_jax.scaling.fit import (
  ChinchillaFit,
  PowerLaw,
  ScalingFit,
  fit_all,
  fit_chinchilla,
  fit_power_law,
  fit_runs,
  fits_from_json,
  fits_to_json,
)
from lsm_jax.scaling.paper import TABLE_3, load_fits, paper_fits, predict
from lsm_jax.scaling.report import format_table, write_report

__all__ = [
  "CURVE_COLUMNS",
  "EVAL_COLUMNS",
  "Run",
  "curves_from_run_dirs",
  "load_curves",
  "load_eval_table",
  "write_curves",
  "Envelope",
  "compute_envelope",
  "ChinchillaFit",
  "PowerLaw",
  "ScalingFit",
  "fit_all",
  "fit_chinchilla",
  "fit_power_law",
  "fit_runs",
  "fits_from_json",
  "fits_to_json",
  "TABLE_3",
  "load_fits",
  "paper_fits",
  "predict",
  "format_table",
  "write_report",
  "plot_downstream",
  "plot_fits",
]


def __getattr__(name):
  # matplotlib is imported only when plotting is asked for: fitting and predict stay quick to start.
  if name in ("plot_fits", "plot_downstream"):
    from lsm_jax.scaling import plots

    return getattr(plots, name)
  raise AttributeError(f"module 'lsm_jax.scaling' has no attribute {name!r}")
