"""What the GPU timing scripts share: a runner that takes measurements in order within a time budget and saves the
record after each one (a run cut short keeps what it measured), the --shapes parser, the commit measured and the
header of a record."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback


def current_commit() -> str:
  """$LSM_JAX_COMMIT when set (a copy of the tree without its git history), else the checkout's git describe
  (-dirty when it has uncommitted changes), as checkpoints record it."""
  if os.environ.get("LSM_JAX_COMMIT"):
    return os.environ["LSM_JAX_COMMIT"]
  from lsm_jax import checkpoint  # the scripts put the repository on sys.path; a kernel-only run pays it here alone

  return checkpoint.code_version()


def record_header(script: str) -> dict:
  """Date, commit, device, jax and Python versions, and the command line of a timing script's record."""
  import jax

  device = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": current_commit(),
    "device": getattr(device, "device_kind", str(device)),
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "command": f"python3 benchmarks/{script} " + " ".join(sys.argv[1:]),
  }


def device_name() -> str:
  """The first device's kind as a results file suffix: "h200" for an NVIDIA H200, "h100_80gb_hbm3", "cpu"."""
  import jax

  return jax.devices()[0].device_kind.lower().replace("nvidia ", "").replace(" ", "_")


def log(*parts):
  print(*parts, flush=True)


def kernel_timing_parser(description: str, op: str) -> argparse.ArgumentParser:
  """The arguments every kernel timing script takes: where its result files go and how many samples it times."""
  parser = argparse.ArgumentParser(description=description)
  parser.set_defaults(op=op)
  parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--name", help=f"results file stem (default: {op}_<device>, e.g. {op}_h200)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--calls", type=int, default=20)
  return parser


def save_results(args: argparse.Namespace, record: dict, write_markdown) -> None:
  """record as <name>.json and write_markdown(<name>.md, record) in args.out_dir; args from kernel_timing_parser."""
  name = args.name or f"{args.op}_{device_name()}"
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, f"{name}.json"), "w") as handle:
    json.dump(record, handle, indent=1)
  write_markdown(os.path.join(args.out_dir, f"{name}.md"), record)


class Runner:
  """Runs measurements in order until `budget_s` seconds after `started` (time.monotonic()) have passed; after each
  one, save(out_dir, record) rewrites the script's result files. A measurement that raises is reported and records
  failed(error) (None: nothing); the next one runs."""

  def __init__(self, record, out_dir, save, started, budget_s, failed=lambda error: None):
    self.record, self.out_dir, self.save, self.started, self.failed = record, out_dir, save, started, failed
    self.deadline = None if budget_s is None else started + budget_s

  def measure(self, what, thunk):
    """thunk()'s result, failed(error) when it raised, or None when the budget was spent before it could start."""
    if self.deadline is not None and time.monotonic() >= self.deadline:
      log("budget spent, not measuring", what)
      self.record["skipped"].append(what)
      result = None
    else:
      log("measuring", what, "at %.0f s" % (time.monotonic() - self.started))
      try:
        result = thunk()
      except Exception as error:  # report and keep measuring the rest
        traceback.print_exc()
        result = self.failed(error)
      log(what, json.dumps(result))
    self.save(self.out_dir, self.record)
    return result


def parse_shapes(text, shapes):
  """Comma-separated indices into `shapes` or explicit BxTxHxD shapes."""
  parsed = []
  for item in filter(None, text.split(",")):
    parts = item.split("x")
    if item.isdigit() and int(item) < len(shapes):
      parsed.append(shapes[int(item)])
    elif len(parts) == 4 and all(part.isdigit() for part in parts):
      parsed.append(tuple(map(int, parts)))
    else:
      raise SystemExit(f"--shapes: {item!r}; valid: an index 0..{len(shapes) - 1} or BxTxHxD (e.g. 1x4096x16x128).")
  return parsed
