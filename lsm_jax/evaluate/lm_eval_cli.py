"""`lm_eval` with the lsm_jax model and local tasks: `python -m lsm_jax.evaluate.lm_eval_cli [lm_eval args]`.

lm-evaluation-harness 0.4.13 resolves `--model` names only from its in-process registry and reads no plugin
entry points, so the stock `lm_eval` script cannot see `lsm_jax` (the package's `lm_eval.models` entry point
is for versions that do). This wrapper, installed as `lsm-jax-lm-eval`, imports the adapter (which registers
it), appends lsm_jax's task directory (lsm_jax/evaluate/tasks) to `--include_path`, and hands over to
lm-eval's own command line, so every lm_eval argument works unchanged:

  python -m lsm_jax.evaluate.lm_eval_cli --model lsm_jax --model_args checkpoint=RUN_DIR,step=1000 \
      --tasks lsm_csr --output_path results/
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def main(argv: Sequence[str] | None = None) -> None:
  from lm_eval._cli import HarnessCLI
  from lm_eval.utils import setup_logging

  import lsm_jax.evaluate.harness  # noqa: F401  registers --model lsm_jax

  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  setup_logging()
  parser = HarnessCLI()
  args = parser.parse_args()
  if getattr(args, "command", None) == "run":
    args.include_path = [path for path in (args.include_path, TASKS_DIR) if path]
  parser.execute(args)


if __name__ == "__main__":
  main()
