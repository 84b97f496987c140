r"""The experiment files as users run them: which remat policy and microbatch each 70M–1B file ships with, and
what the training CLI then does on one GPU.

  select  For each file, candidate (remat policy, rows per batch shard per microbatch) pairs are compiled in the
          order of expected speed; per policy the first whose XLA memory plan fits the target memory is timed
          (a policy that keeps more activations, or a larger microbatch, is never slower per token, so the
          remaining candidates of that policy, and heavier policies at no larger microbatch, are skipped).
          Writes experiment_defaults_<device>.{json,md}: every candidate with its plan, the fastest that fits.
  run     Each file as shipped, only TRAIN_STEPS and GLOBAL_BATCH_SIZE shortened (two microbatches per step),
          through `python -m lsm_jax.train` on the embedded corpus: wall-clock tokens/s, MFU and peak memory from
          its metrics.jsonl, beside benchmarks/train_step.py's timing of the same program (synthetic batches,
          compiled step only). Writes experiment_files_<device>.{json,md}.

CPU check of the script (tiny sequences): add --gin 'SEQ_LEN = 256' --gin 'trainer.train.loss_chunk_length = 128'.
On a GPU host with jax[cuda], lsm_jax and portpicker installed (`pip install -e . portpicker`):
  python3 benchmarks/experiment_files.py select --out_dir $OUT
  python3 benchmarks/experiment_files.py run --out_dir $OUT --archs llama,tnl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peak memory then reflects the program
BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
sys.path[:0] = [REPO_ROOT, BENCHMARKS_DIR]

import jax  # noqa: E402
import measurement  # noqa: E402  (benchmarks/measurement.py: the commit measured)
import train_step  # noqa: E402  (benchmarks/train_step.py)

from lsm_jax import metrics, sharding  # noqa: E402
from lsm_jax.models import configs  # noqa: E402

ARCHS = ("llama", "tnl", "hgrn2", "cosformer2")
HYBRID_ARCHS = configs.HYBRID_ARCHS  # not in the default list: --archs=hgrn2_hybrid (docs/hybrids.md)
SIZES = ("1b", "410m", "160m", "70m")
# The target of the 70M–1B files: one 80 GB-class GPU (H100/A100 80GB) under JAX's default preallocation of 75%
# of its memory, which is what a plain `python -m lsm_jax.train` gets there.
TARGET_HARDWARE = "one 80 GB-class GPU (H100/A100 80GB), JAX's default 75% memory fraction"
TARGET_GIB = 0.75 * 80.0
# Candidates per size, fastest first within each policy; rows per batch shard must divide 480 / shards for 1–32
# shards, hence 1, 3, 5 and 15. Policies from the lightest (keeps every activation) to the heaviest.
POLICY_ORDER = ("none", "dots_and_mixer_kernels_saveable", "full")
CANDIDATES = {
  "70m": (("none", 15), ("none", 5), ("dots_and_mixer_kernels_saveable", 15)),
  "160m": (("none", 15), ("none", 5), ("none", 3), ("dots_and_mixer_kernels_saveable", 15)),
  "410m": (
    ("none", 5),
    ("none", 3),
    ("none", 1),
    ("dots_and_mixer_kernels_saveable", 15),
    ("dots_and_mixer_kernels_saveable", 5),
  ),
  "1b": (
    ("none", 3),
    ("none", 1),
    ("dots_and_mixer_kernels_saveable", 5),
    ("dots_and_mixer_kernels_saveable", 3),
    ("full", 5),
  ),
}
MICROBATCHES_PER_STEP = 2  # the shortened global batch: enough to run the accumulation loop as shipped


def _gin_file(arch: str, size: str) -> str:
  return f"gin/{arch}_{size}.gin"


def _spec(gin_file: str, bindings: list[str], args) -> dict:
  return train_step.gin_spec([gin_file], [*bindings, *args.gin])


def _header(command: str) -> dict:
  device = jax.devices()[0]
  limit = metrics.device_memory_limit_bytes(jax.devices())
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": measurement.current_commit(),
    "device": f"{jax.device_count()} × {device.device_kind}",
    "device_gib": None if limit is None else limit / 2**30,
    "versions": f"jax {jax.__version__}, Python {platform.python_version()}",
    "command": command,
    "target_hardware": TARGET_HARDWARE,
    "target_gib": TARGET_GIB,
  }


def _timing_args(steps: int, warmup: int) -> argparse.Namespace:
  return argparse.Namespace(steps=steps, warmup=warmup, profile_steps=0, peak_flops_per_device=None)


def select(gin_file: str, size: str, args) -> list[dict]:
  """Every candidate of `gin_file` with its memory plan; the timed ones with tokens/s; the chosen one marked."""
  rows, fitting = [], {}
  for policy, rows_per_shard in CANDIDATES[size]:
    lighter = [fitting[p] for p in POLICY_ORDER[: POLICY_ORDER.index(policy)] if p in fitting]
    if policy in fitting or any(row["per_shard_microbatch_size"] >= rows_per_shard for row in lighter):
      continue  # dominated: the same policy with a larger microbatch, or a lighter policy, already fits
    bindings = [
      f"configs.ModelConfig.remat_policy = '{policy}'",
      f"PER_SHARD_MICROBATCH_SIZE = {rows_per_shard}",
      f"GLOBAL_BATCH_SIZE = {MICROBATCHES_PER_STEP * rows_per_shard}",
    ]
    row = {"gin_file": gin_file, "remat_policy": policy, "per_shard_microbatch_size": rows_per_shard}
    try:
      program, compiled, described = train_step.compile_spec(_spec(gin_file, bindings, args))
      row.update(described, fits=described["planned_gib"] <= TARGET_GIB)
      if row["fits"]:
        row = train_step.time_compiled(program, compiled, row, _timing_args(args.steps, args.warmup))
        fitting[policy] = row
      del program, compiled
    except Exception as error:  # e.g. the compiler refusing a program for memory: that candidate does not fit
      traceback.print_exc()
      row.update(fits=False, error=f"{type(error).__name__}: {error}"[:300])
    print(json.dumps(row), flush=True)
    rows.append(row)
  if fitting:
    best = max(fitting.values(), key=lambda row: row["tokens_per_s"])
    best["chosen"] = True
  return rows


def _metrics_rows(model_dir: str) -> list[dict]:
  with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def run(gin_file: str, args, cache_dir: str) -> dict:
  """The training CLI on `gin_file` as shipped (steps and global batch shortened), then the benchmark of its program."""
  shipped = _spec(gin_file, [], args)
  rows_per_shard = shipped["per_shard_microbatch_size"]
  if rows_per_shard is None:
    raise ValueError(f"{gin_file} sets no PER_SHARD_MICROBATCH_SIZE: the shortened batch needs one")
  global_batch = MICROBATCHES_PER_STEP * rows_per_shard * sharding.batch_shards(shipped["mesh"])
  bindings = [f"TRAIN_STEPS = {args.train_steps}", f"GLOBAL_BATCH_SIZE = {global_batch}"]
  cli_bindings = [f"--gin_bindings={binding}" for binding in (*bindings, *args.gin)]
  limit = metrics.device_memory_limit_bytes(jax.devices())
  row = {
    "gin_file": gin_file,
    "hardware": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
    "device_gib": None if limit is None else limit / 2**30,
    "target_hardware": TARGET_HARDWARE,
    "target_gib": TARGET_GIB,
    "remat_policy": shipped["model_config"].remat_policy,
    "per_shard_microbatch_size": rows_per_shard,
    "global_batch_size": global_batch,
    "seq_len": shipped["seq_len"],
    "train_steps": args.train_steps,
  }
  if args.work_dir:
    os.makedirs(args.work_dir, exist_ok=True)
  model_dir = tempfile.mkdtemp(prefix="experiment-", dir=args.work_dir)
  command = [
    sys.executable,
    "-m",
    "lsm_jax.train",
    f"--gin_file={gin_file}",
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.DATA_DIR='embedded'",
    *cli_bindings,
  ]
  environment = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": cache_dir,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environment)
  row["cli_wall_s"] = time.perf_counter() - start
  row["cli_command"] = " ".join(command[1:]).replace(model_dir, "DIR")
  if result.returncode != 0:
    row["error"] = (result.stderr or result.stdout)[-1500:]
    shutil.rmtree(model_dir, ignore_errors=True)
    return row
  steps = [m for m in _metrics_rows(model_dir) if "loss" in m]
  timed = steps[args.skip_steps :] or steps
  row.update(
    tokens_per_s=statistics.median(m["tokens_per_sec"] for m in timed),
    mfu=statistics.median(m["mfu"] for m in timed),
    step_tokens_per_s=statistics.median(m.get("step_tokens_per_sec", m["tokens_per_sec"]) for m in timed),
    peak_gib=max((m["peak_memory_gib"] for m in steps if m.get("peak_memory_gib") is not None), default=None),
    final_loss=steps[-1]["loss"],
    timed_steps=len(timed),
  )
  shutil.rmtree(model_dir, ignore_errors=True)

  jax.config.update("jax_compilation_cache_dir", cache_dir)  # the CLI compiled this very program
  benchmark = train_step.measure(_spec(gin_file, bindings, args), _timing_args(args.benchmark_steps, 2))
  row.update(
    benchmark_tokens_per_s=benchmark["tokens_per_s"],
    benchmark_mfu=benchmark["mfu"],
    planned_gib=benchmark["planned_gib"],
  )
  row["cli_over_benchmark"] = row["tokens_per_s"] / row["benchmark_tokens_per_s"]
  return row


def _fmt(value, pattern: str) -> str:
  return "" if value is None else format(value, pattern)


def write_select_markdown(path: str, header: dict, rows: list[dict]) -> None:
  lines = [
    f"# Experiment-file defaults on {header['device']}",
    "",
    f"Date {header['date']}, commit {header['commit']}, {header['versions']}. Command: `{header['command']}`.",
    "",
    f"Target: {header['target_hardware']} = {header['target_gib']:.0f} GiB for XLA's memory plan of the "
    f"train step. Each candidate is the file with only the remat policy, PER_SHARD_MICROBATCH_SIZE and a "
    f"global batch of {MICROBATCHES_PER_STEP} microbatches bound; timed candidates: median step after "
    "warm-up, synthetic batches. The chosen candidate (fastest that fits) is what the file ships.",
    "",
    "| file | remat | rows/shard | plan GiB | fits | tokens/s | MFU | chosen |",
    "|---|---|---:|---:|---|---:|---:|---|",
  ]
  for row in rows:
    lines.append(
      f"| {row['gin_file']} | {row['remat_policy']} | {row['per_shard_microbatch_size']} | "
      f"{_fmt(row.get('planned_gib'), '.1f')} | {'yes' if row.get('fits') else 'no'} | "
      f"{_fmt(row.get('tokens_per_s'), ',.0f')} | {_fmt(row.get('mfu') and 100 * row['mfu'], '.1f')} | "
      f"{'**yes**' if row.get('chosen') else ''} |"
    )
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def write_run_markdown(path: str, header: dict, rows: list[dict]) -> None:
  lines = [
    f"# Experiment files as shipped on {header['device']}",
    "",
    f"Date {header['date']}, commit {header['commit']}, {header['versions']}. Command: `{header['command']}`.",
    "",
    f"Each file through `python -m lsm_jax.train` with only TRAIN_STEPS and GLOBAL_BATCH_SIZE shortened "
    f"({MICROBATCHES_PER_STEP} microbatches per step), embedded corpus. tokens/s and MFU: the CLI's "
    "wall-clock figures (metrics.jsonl, median after the first steps); benchmark: benchmarks/train_step.py "
    f"on the same program (compiled step only). Target: {header['target_hardware']} "
    f"({header['target_gib']:.0f} GiB); device memory available to JAX: "
    f"{_fmt(header['device_gib'], '.1f')} GiB.",
    "",
    "| file | remat | rows/shard | batch | plan GiB | peak GiB | CLI tokens/s | MFU | benchmark tokens/s "
    "| CLI / benchmark |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    if "error" in row:
      lines.append(
        f"| {row['gin_file']} | {row['remat_policy']} | {row['per_shard_microbatch_size']} | "
        f"{row['global_batch_size']} | | | error: {row['error'][-100:]!r} | | | |"
      )
      continue
    lines.append(
      f"| {row['gin_file']} | {row['remat_policy']} | {row['per_shard_microbatch_size']} | "
      f"{row['global_batch_size']} | {_fmt(row.get('planned_gib'), '.1f')} | "
      f"{_fmt(row['peak_gib'], '.1f')} | "
      f"{row['tokens_per_s']:,.0f} | {100 * row['mfu']:.1f}% | {row['benchmark_tokens_per_s']:,.0f} | "
      f"{row['cli_over_benchmark']:.3f} |"
    )
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _save(base: str, header: dict, rows: list[dict], render) -> None:
  with open(base + ".json", "w", encoding="utf-8") as f:
    json.dump({**header, "rows": rows}, f, indent=2)
  render(base + ".md", header, rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=("select", "run"))
  parser.add_argument("--archs", default=",".join(ARCHS))
  parser.add_argument("--sizes", default=",".join(SIZES))
  parser.add_argument("--steps", type=int, default=2, help="select: timed steps per candidate")
  parser.add_argument("--warmup", type=int, default=1, help="select: untimed steps per candidate")
  parser.add_argument("--train_steps", type=int, default=12, help="run: the CLI's TRAIN_STEPS")
  parser.add_argument("--skip_steps", type=int, default=2, help="run: first CLI steps left out of the median")
  parser.add_argument("--benchmark_steps", type=int, default=4, help="run: timed benchmark steps")
  parser.add_argument("--work_dir", default=None, help="run: where the CLI's run directories go (removed after)")
  parser.add_argument(
    "--gin",
    action="append",
    default=[],
    help="extra gin binding for every file, e.g. 'SEQ_LEN = 256' for a CPU check of the script",
  )
  parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
  args = parser.parse_args(argv)
  for arch in args.archs.split(","):
    if arch not in ARCHS + HYBRID_ARCHS:
      parser.error(f"--archs: unknown architecture {arch!r}; valid: {ARCHS + HYBRID_ARCHS}")
  for size in args.sizes.split(","):
    if size not in CANDIDATES:
      parser.error(f"--sizes: {size!r} has no candidates; valid: {tuple(CANDIDATES)}")
  stem = "experiment_defaults" if args.mode == "select" else "experiment_files"
  base = os.path.join(args.out_dir, f"{stem}_{measurement.device_name()}")
  os.makedirs(args.out_dir, exist_ok=True)
  header = _header("python benchmarks/experiment_files.py " + " ".join(sys.argv[1:] if argv is None else argv))
  rows = []
  if os.path.exists(base + ".json"):  # a second call (other archs) adds its rows
    with open(base + ".json", encoding="utf-8") as f:
      earlier = json.load(f)
    rows = earlier["rows"]
    header["command"] = f"{earlier['command']}; {header['command']}"
  cache_dir = tempfile.mkdtemp(prefix="jax-cache-")
  for size in args.sizes.split(","):
    for arch in args.archs.split(","):
      gin_file = _gin_file(arch, size)
      print(f"--- {gin_file}", flush=True)
      if args.mode == "select":
        rows += select(gin_file, size, args)
        _save(base, header, rows, write_select_markdown)
      else:
        row = run(gin_file, args, cache_dir)
        print(json.dumps(row), flush=True)
        rows.append(row)
        _save(base, header, rows, write_run_markdown)


if __name__ == "__main__":
  main()
