"""`python -m lsm_jax.study --gin_file=gin/study/mini/grid.gin --out=DIR [--parallel=N --gpus=0,1] [--gin.X=Y ...]`.

Uses the training CLI's gin flags (lsm_jax.train); see lsm_jax.study for what runs. `--run=NAME` is what a
worker process runs: one run of the grid that `--out=DIR/study_grid.json` holds.
"""

import dataclasses
import sys
from typing import Sequence

import gin
from absl import app, flags, logging

from lsm_jax import errors, study
from lsm_jax import train as train_cli


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  logging.get_absl_handler().addFilter(train_cli._DropLibraryInfo())
  if flag_values.run:
    if not flag_values.out:
      raise app.UsageError("--run=NAME needs --out=DIR, the study directory holding study_grid.json")
    study.run_worker(flag_values.out, flag_values.run)
    return
  if not flag_values.gin_file or not flag_values.out:
    raise app.UsageError("give --gin_file=gin/study/mini/grid.gin and --out=DIR")
  try:
    grid_bindings, run_bindings = study.split_bindings(flag_values.gin_bindings)
    train_cli.parse_gin(flag_values.gin_file, grid_bindings, flag_values.gin_search_paths)
    grid = gin.get_configurable(study.StudyGrid)()
    grid = dataclasses.replace(grid, run_bindings=[*grid.run_bindings, *run_bindings])
    study.grid_runs(flag_values.out, grid)  # every run's configuration, before any run starts
  except (ValueError, TypeError, FileNotFoundError) as error:
    errors.exit_with(errors.EXIT_USER_ERROR, str(error).split("\n  In call to configurable")[0])
  try:
    report = study.run_study(
      flag_values.out,
      grid,
      parallel=flag_values.parallel,
      gpus=flag_values.gpus,
      time_limit_s=flag_values.time_limit_s or None,
    )
  except RuntimeError as error:
    sys.exit(f"study failed: {error}")
  print(f"report: {report}")


if __name__ == "__main__":
  train_cli._define_flags()  # the training CLI's gin flags
  flags.DEFINE_string("out", None, "Study directory (runs/, tables, plots, report.md).")
  flags.DEFINE_integer(
    "parallel",
    0,
    "Worker processes training runs at once, largest first (0: train in this process, one run after another).",
    lower_bound=0,
  )
  flags.DEFINE_list(
    "gpus", [], "CUDA_VISIBLE_DEVICES values given to the worker slots round-robin, e.g. 0,1 (needs --parallel)."
  )
  flags.DEFINE_float(
    "time_limit_s",
    0,
    "After this many seconds start no run, stop running workers and fit what finished (0: no limit).",
    lower_bound=0,
  )
  flags.DEFINE_string(
    "run", None, "Internal (worker processes): train and evaluate only this run, <arch>_<size>, of the grid in --out."
  )
  app.run(main, argv=train_cli.rewrite_gin_args(sys.argv))
