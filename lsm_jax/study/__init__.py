r"""A scaling study end to end: train a grid, evaluate every milestone, fit the laws, write the report.

  python -m lsm_jax.study --gin_file=gin/study/mini/grid.gin --out=DIR [--gin.NAME=VALUE ...]

The grid file binds `study.StudyGrid` (architectures, size files, the run file, evaluation tasks). Each run
`<arch>_<size>` is trained by `trainer.train` from three gin files — `gin/models/<arch>/base.gin`, the size
file and the run file — in `DIR/runs/<arch>_<size>`; rerunning the command resumes unfinished runs from their
checkpoints and skips finished ones, so the grid can be trained across several sessions. Overrides: a
`--gin.study.…` binding configures the grid; any other `--gin.…` binding is applied to every run (e.g.
`--gin.TRAIN_STEPS=40`). Then every milestone of every run is evaluated (`lsm_jax.evaluate`), training curves
become scaling-law inputs (`lsm_jax.scaling`), and `DIR/report.md` collects the Table-3-style fits, the
Figure-1/2-style PNGs and the raw tidy tables (`curves.csv`, `eval.csv`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from typing import Sequence

import gin
import jax
from absl import logging

GRID_SCOPE = "study."


def split_bindings(bindings: Sequence[str]) -> tuple[list[str], list[str]]:
  """(grid bindings, per-run bindings): `study.…` bindings configure the grid, the rest every run."""
  grid = [b for b in bindings if b.strip().startswith(GRID_SCOPE)]
  return grid, [b for b in bindings if not b.strip().startswith(GRID_SCOPE)]


def train_run(run_dir: str, gin_files: Sequence[str], bindings: Sequence[str]) -> dict:
  """Trains (or resumes, or finds finished) one run with a fresh gin config."""
  from lsm_jax import train as train_cli
  from lsm_jax import trainer
  # Each run gets a fresh config; parsing finalizes (locks) it, so clear and parse while unlocked.
  with gin.unlock_config():
    gin.clear_config()
    train_cli.parse_gin(gin_files, [f"MODEL_DIR = {run_dir!r}", *bindings])
  return gin.get_configurable(trainer.train)(config_text=gin.config_str())


@dataclasses.dataclass(frozen=True)
class StudyGrid:
  """What a study trains: `archs` × `size_files` (size name → gin file setting configs.ModelConfig's shape),
  each with `run_file` (data, steps, optimizer, milestones) and `run_bindings`; `eval_tasks` for the sweep."""
  archs: Sequence[str]
  size_files: dict
  run_file: str
  eval_tasks: Sequence[str] = ("val_loss",)
  run_bindings: Sequence[str] = ()
  description: str = ""


def run_study(out_dir: str, grid: StudyGrid) -> str:
  """Trains every arch × size, evaluates every milestone, fits the scaling laws; returns report.md's path."""
  from lsm_jax import scaling
  from lsm_jax.evaluate import sweep
  from lsm_jax.models import configs

  from lsm_jax import train as train_cli
  archs, size_files, run_file = grid.archs, grid.size_files, grid.run_file

  unknown = sorted(set(archs) - set(configs.ARCHS))
  if unknown:
    raise ValueError(f"study.StudyGrid.archs has unknown architectures {unknown}; valid: {configs.ARCHS}")
  if len(size_files) < 2:
    raise ValueError(f"study.StudyGrid.size_files has {len(size_files)} size(s); a scaling fit needs at least 2")
  for path in (run_file, *size_files.values()):
    if not os.path.exists(os.path.join(train_cli.REPO_ROOT, path)) and not os.path.exists(path):
      raise ValueError(f"gin file {path!r} of the study grid does not exist")
  os.makedirs(out_dir, exist_ok=True)
  run_dirs = []
  for arch in archs:
    for size, size_file in size_files.items():
      run_dir = os.path.join(out_dir, "runs", f"{arch}_{size}")
      logging.info("study: training %s", run_dir)
      train_run(run_dir, [f"gin/models/{arch}/base.gin", size_file, run_file], grid.run_bindings)
      run_dirs.append(run_dir)

  eval_path = os.path.join(out_dir, "eval.csv")
  for run_dir in run_dirs:
    logging.info("study: evaluating %s", run_dir)
    sweep.evaluate_run(run_dir, tasks=list(grid.eval_tasks), output=eval_path)

  curves_path = os.path.join(out_dir, "curves.csv")
  scaling.write_curves(scaling.curves_from_run_dirs(run_dirs), curves_path)
  runs = scaling.load_curves(curves_path)
  fits = scaling.fit_all(runs)
  with open(os.path.join(out_dir, "fits.json"), "w", encoding="utf-8") as f:
    json.dump(scaling.fits_to_json(fits), f, indent=1)
  plot_dir = os.path.join(out_dir, "plots")
  figures = scaling.plot_fits(fits, runs, plot_dir)
  figures += scaling.plot_downstream(scaling.load_eval_table(eval_path), plot_dir)
  scaling_report = os.path.join(out_dir, "scaling.md")
  scaling.write_report(fits, scaling_report)
  return write_report(out_dir, fits=fits, figures=figures, scaling_report=scaling_report,
                      run_dirs=run_dirs, description=grid.description)


def write_report(out_dir, *, fits, figures, scaling_report, run_dirs, description) -> str:
  """report.md: provenance, the fits beside the paper's Table 3, figures and the raw tables."""
  from lsm_jax.scaling import paper
  paper_table = paper.paper_fits()
  lines = [
      "# Scaling study", "",
      f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
      f"- device: {jax.device_count()} × {jax.devices()[0].device_kind} (jax {jax.__version__}, "
      f"Python {platform.python_version()})",
      f"- command: `python -m lsm_jax.study {' '.join(sys.argv[1:])}`",
      f"- runs: {', '.join(os.path.basename(d) for d in run_dirs)}", "",
  ]
  if description:
    lines += [description, ""]
  lines += ["## Fitted exponents beside the paper's Table 3", "",
            "| Arch | α_L (ours) | α_L (paper) | a, N_opt (ours) | a (paper) | b, D_opt (ours) | b (paper) |",
            "|---|---|---|---|---|---|---|"]
  for arch, fit in fits.items():
    reference = paper_table.get(arch)
    exponents = []
    for law in ("loss", "n_opt", "d_opt"):
      exponents.append(f"{getattr(fit, law).exponent:.4f}")
      exponents.append(f"{getattr(reference, law).exponent:.4f}" if reference else "—")
    lines.append(f"| {arch} | " + " | ".join(exponents) + " |")
  with open(scaling_report, encoding="utf-8") as f:
    lines += ["", f.read().strip(), ""]
  lines += ["## Figures", ""]
  lines += [f"![{os.path.basename(path)}]({os.path.relpath(path, out_dir)})" for path in figures]
  lines += ["", "## Raw tables", "", "- `curves.csv`: training loss per logged step (arch, size, "
            "non_embedding_params, tokens, compute_pflops_days, loss)",
            "- `eval.csv`: every milestone's evaluation (arch, size, step, tokens, compute_pflops_days, task, "
            "metric, value)", "- `fits.json`: the fitted coefficients with bootstrap intervals", ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return path
