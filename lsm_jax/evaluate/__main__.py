"""`python -m lsm_jax.evaluate --run_dir=DIR --tasks=val_loss,csr,TASK [--include_path=P] [--output=FILE]`.

Evaluates every milestone checkpoint of the run that the output table does not hold yet and appends tidy
rows (arch, size, step, tokens, compute_pflops_days, task, metric, value) to FILE.jsonl and FILE.csv
(default RUN_DIR/eval/results). Interrupt and rerun at will: finished (step, task) pairs are skipped.
--tasks takes the built-in names below and any lm-eval task, group or tag: lm-eval's bundled tasks, lsm_jax's
local ones, and tasks in YAML files under --include_path (repeatable). Rows also go to TensorBoard (default
RUN_DIR/tensorboard/eval). lsm_jax's local lm-eval tasks read data from $LSM_JAX_EVAL_DATA (see
lsm_jax/evaluate/tasks/lsm_tasks.py).
A milestone whose files fail their checksums (docs/reliability.md) stops the sweep with one error naming it and
the intact milestones nearest to it. Errors print one line, `error: ...`, and exit with 2 (lsm_jax/errors.py).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from lsm_jax import checkpoint, errors
from lsm_jax.evaluate import sweep


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m lsm_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--run_dir", required=True, help="MODEL_DIR of a training run")
  parser.add_argument(
    "--tasks", required=True, help=f"comma-separated: {', '.join(sweep.TASKS)}, or lm-eval task/group/tag names"
  )
  parser.add_argument(
    "--include_path", action="append", default=[], help="directory (or YAML file) of lm-eval task configs; repeatable"
  )
  parser.add_argument(
    "--tensorboard_dir",
    default=None,
    help="TensorBoard scalars of the rows (default RUN_DIR/tensorboard/eval; '' for none)",
  )
  parser.add_argument("--output", default=None, help="tidy table path (.jsonl/.csv written side by side)")
  parser.add_argument("--steps", default=None, help="comma-separated milestone steps (default: all)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--compute_dtype", default=None, help="override the model's compute dtype, e.g. float32")
  parser.add_argument("--val_max_batches", type=int, default=None, help="cap on validation batches")
  parser.add_argument("--lm_eval_limit", type=int, default=None, help="examples per lm-eval task (debugging)")
  parser.add_argument("--eval_data_dir", default=None, help="local task data (default $LSM_JAX_EVAL_DATA)")
  parser.add_argument("--haystack_file", default=None, help="NIAH haystack text (default: embedded corpus)")
  parser.add_argument(
    "--niah_config", default=None, help='JSON of NIAHConfig overrides, e.g. {"context_lengths": [1000, 2000]}'
  )
  parser.add_argument("--no_progress", action="store_true")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  steps = [int(step) for step in args.steps.split(",")] if args.steps else None
  niah_overrides = json.loads(args.niah_config) if args.niah_config else None
  for key in ("context_lengths", "depth_percents"):
    if niah_overrides and key in niah_overrides:
      niah_overrides[key] = tuple(niah_overrides[key])
  try:
    rows = sweep.evaluate_run(
      args.run_dir,
      args.tasks,
      args.output,
      steps=steps,
      batch_size=args.batch_size,
      compute_dtype=args.compute_dtype,
      val_max_batches=args.val_max_batches,
      lm_eval_limit=args.lm_eval_limit,
      eval_data_dir=args.eval_data_dir,
      haystack_file=args.haystack_file,
      niah_overrides=niah_overrides,
      progress=not args.no_progress,
      include_path=args.include_path,
      tensorboard_dir=args.tensorboard_dir,
    )
  except checkpoint.CorruptCheckpointError as error:
    # The rows of the milestones before it are kept.
    errors.exit_with(
      errors.EXIT_USER_ERROR,
      f"{error}. No rows were written for it or the milestones after it. Rerun with --steps naming intact "
      f"milestones ({checkpoint.intact_alternatives(error)}) or restore the damaged files from a copy",
    )
  except (ValueError, FileNotFoundError) as error:  # unknown task, missing include path, bad steps, no run
    errors.exit_with(errors.EXIT_USER_ERROR, str(error))
  print(f"wrote {len(rows)} new rows")


if __name__ == "__main__":
  main()
