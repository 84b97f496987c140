"""`python -m lsm_jax.study --gin_file=gin/study/mini/grid.gin --out=DIR [--gin.NAME=VALUE ...]`.

Uses the training CLI's gin flags (lsm_jax.train); see lsm_jax.study for what runs.
"""
import dataclasses
import sys
from typing import Sequence

import gin
from absl import app
from absl import flags
from absl import logging

from lsm_jax import study
from lsm_jax import train as train_cli



def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  if not flag_values.gin_file or not flag_values.out:
    raise app.UsageError("give --gin_file=gin/study/mini/grid.gin and --out=DIR")
  logging.get_absl_handler().addFilter(train_cli._DropLibraryInfo())
  grid_bindings, run_bindings = study.split_bindings(flag_values.gin_bindings)
  train_cli.parse_gin(flag_values.gin_file, grid_bindings, flag_values.gin_search_paths)
  grid = gin.get_configurable(study.StudyGrid)()
  grid = dataclasses.replace(grid, run_bindings=[*grid.run_bindings, *run_bindings])
  print(f"report: {study.run_study(flag_values.out, grid)}")


if __name__ == "__main__":
  train_cli._define_flags()  # the training CLI's gin flags
  flags.DEFINE_string("out", None, "Study directory (runs/, tables, plots, report.md).")
  app.run(main, argv=train_cli.rewrite_gin_args(sys.argv))
