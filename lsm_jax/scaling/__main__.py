"""python -m lsm_jax.scaling {fit,plot,predict,curves}: see the package docstring."""

from __future__ import annotations

import argparse
import json
import sys

from lsm_jax.scaling import curves, fit, paper, report


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--curves", required=True, help="CSV or JSON lines: " + ", ".join(curves.CURVE_COLUMNS))
  parser.add_argument("--num_points", type=int, default=1000, help="log-spaced compute grid of the envelope")
  parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_compute", type=float, default=None, help="fit only C >= this (PFLOP/s-days)")
  parser.add_argument("--max_compute", type=float, default=None, help="fit only C <= this (PFLOP/s-days)")
  parser.add_argument(
    "--smoothing_window",
    type=int,
    default=1,
    help="centred moving average of log-loss over this many logged points (odd; 1 = off)",
  )
  parser.add_argument("--no_chinchilla", action="store_true", help="skip the L(N, D) surface fit")


def _fits(args) -> tuple[dict, dict]:
  runs = curves.load_curves(args.curves)
  compute_range = None
  if args.min_compute is not None or args.max_compute is not None:
    compute_range = (args.min_compute or 0.0, args.max_compute or float("inf"))
  fits = fit.fit_all(
    runs,
    num_points=args.num_points,
    num_bootstrap=args.bootstrap,
    seed=args.seed,
    compute_range=compute_range,
    smoothing_window=args.smoothing_window,
    chinchilla=not args.no_chinchilla,
  )
  return fits, runs


def _command_fit(args) -> None:
  fits, _ = _fits(args)
  if args.format == "json":
    print(json.dumps(fit.fits_to_json(fits), indent=2))
    return
  sections = [report.format_table(fits), "", report.format_intervals(fits)]
  if not args.no_chinchilla:
    sections += ["", report.format_chinchilla(fits)]
  problems = report.format_problems(fits)
  if problems:
    sections += ["", problems]
  print("\n".join(sections))


def _command_plot(args) -> None:
  from lsm_jax.scaling import plots  # matplotlib only when plotting

  fits, runs = _fits(args)
  written = plots.plot_fits(fits, runs, args.out)
  if args.eval_table:
    written += plots.plot_downstream(curves.load_eval_table(args.eval_table), args.out)
  print("\n".join(written))


def _command_predict(args) -> None:
  prediction = paper.predict(args.arch, args.compute, fit=args.fit)
  if args.format == "json":
    print(json.dumps(prediction, indent=2))
    return
  print(
    f"Compute-optimal allocation from {args.fit or 'the paper Table 3'}:\n\n"
    "| Arch | C (PFLOP/s-days) | N_opt (non-embedding params) | D_opt (tokens) | L |\n"
    "|---|---|---|---|---|\n"
    f"| {report.DISPLAY_NAMES.get(args.arch, args.arch)} | {args.compute:g} | {prediction['n_opt']:.4g} | "
    f"{prediction['d_opt']:.4g} | {prediction['loss']:.4f} |"
  )


def _command_curves(args) -> None:
  rows = curves.curves_from_run_dirs(args.run_dir)
  curves.write_curves(rows, args.out)
  print(f"wrote {len(rows)} rows from {len(args.run_dir)} run(s) to {args.out}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm_jax.scaling", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  fit_parser = commands.add_parser("fit", help="fit L(C), N_opt(C), D_opt(C) (and L(N, D)) per architecture")
  _add_fit_options(fit_parser)
  fit_parser.add_argument("--format", choices=("json", "table"), default="table")
  plot_parser = commands.add_parser("plot", help="Figure-1 and Figure-2 style PNGs")
  _add_fit_options(plot_parser)
  plot_parser.add_argument(
    "--eval_table", default=None, help="evaluation tidy table: " + ", ".join(curves.EVAL_COLUMNS)
  )
  plot_parser.add_argument("--out", required=True, help="directory for the PNG files")
  predict_parser = commands.add_parser("predict", help="compute-optimal N, D and loss at a budget")
  predict_parser.add_argument("--arch", required=True)
  predict_parser.add_argument("--compute", type=float, required=True, help="budget in PFLOP/s-days")
  predict_parser.add_argument(
    "--fit", default=None, help="fit JSON from `fit --format=json` (default: the paper's Table 3)"
  )
  predict_parser.add_argument("--format", choices=("json", "table"), default="table")
  curves_parser = commands.add_parser("curves", help="curves CSV from training run directories")
  curves_parser.add_argument(
    "--run_dir", action="append", required=True, help="MODEL_DIR with run_metadata.json and metrics.jsonl (repeatable)"
  )
  curves_parser.add_argument("--out", required=True, help="CSV file to write")
  args = parser.parse_args(argv)
  command = {"fit": _command_fit, "plot": _command_plot, "predict": _command_predict, "curves": _command_curves}[
    args.command
  ]
  try:
    command(args)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
