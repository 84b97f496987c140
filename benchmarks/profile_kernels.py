"""Per-kernel GPU time of our linear-attention ops: where a forward or forward+backward spends its time.

Runs each (op, variant) under `jax.profiler.trace` and sums the device events of the Perfetto trace by kernel
name (our pallas_calls are named linear_attention_*; XLA's fusions keep theirs), per call. Complements
benchmarks/kernel_timing.py, whose medians are end-to-end.
  python3 benchmarks/profile_kernels.py --out $OUT --ops hgrn2 --shapes 0,1 --variant num_warps=4 \
      --variant chunk_size=64,num_warps=4
--config KNOB=VALUE (repeatable) replaces one knob of the default kernel configuration, as in kernel_timing.py;
each --variant KNOB=VALUE,... is profiled on top of it in the same process. --peer adds fla's kernels for the same
op and shape (torch.profiler); --accuracy each variant's errors against the float64 recurrence. CPU smoke
(interpret mode; the trace then holds host events, summed the same way):
  python3 benchmarks/profile_kernels.py --out /tmp/profile_smoke --shapes 1x64x2x16 --calls 1
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_timing  # noqa: E402  (benchmarks/kernel_timing.py: inputs, jitted closures, --config parsing)
import measurement  # noqa: E402  (benchmarks/measurement.py: the commit measured)


def device_kernel_us(trace_dir: str) -> tuple[dict[str, list[float]], str]:
  """({event name: [durations in µs]}, source): the kernels on the device's streams ("device"), or every host
  event when the trace has no device process ("host": the CPU smoke). The device's "XLA Modules"/"XLA Ops" lines
  span the same kernels and are left out."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as handle:
    trace = json.load(handle)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  metadata = [e for e in events if e.get("ph") == "M"]
  device_pids = {e["pid"] for e in metadata if e.get("name") == "process_name" and "/device:" in e["args"]["name"]}
  streams = {
    (e["pid"], e["tid"])
    for e in metadata
    if e.get("name") == "thread_name" and e["pid"] in device_pids and e["args"]["name"].startswith("Stream")
  }
  if device_pids:
    keep = lambda e: (e["pid"], e.get("tid")) in streams if streams else e["pid"] in device_pids
  else:
    keep = lambda e: True
  durations = collections.defaultdict(list)
  for event in events:
    if event.get("ph") == "X" and keep(event):
      durations[event["name"]].append(float(event["dur"]))
  return durations, "device" if device_pids else "host"


def profile(fn, fn_args, calls: int) -> tuple[list[dict], str]:
  """Kernels of `calls` calls of fn after a warm-up (name, launches per call, µs per call; slowest first) and
  the events' source."""
  jax.block_until_ready(fn(*fn_args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn(*fn_args))
    durations, source = device_kernel_us(trace_dir)
  rows = [
    {"kernel": name, "launches": len(times) / calls, "us": sum(times) / calls} for name, times in durations.items()
  ]
  return sorted(rows, key=lambda row: -row["us"]), source


def profile_fla(fn, calls: int) -> list[dict]:
  """fla's kernels over `calls` calls of fn after a warm-up (its Triton autotuning included), as profile's rows,
  from torch.profiler's CUDA activity (kernels, copies and fills only: no host events recorded)."""
  import torch
  from torch.profiler import ProfilerActivity

  fn()
  torch.cuda.synchronize()
  with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      fn()
    torch.cuda.synchronize()
  rows = []
  for event in prof.key_averages():
    device_us = getattr(event, "device_time_total", None)
    if device_us is None:  # torch < 2.4
      device_us = event.cuda_time_total
    if device_us > 0:
      rows.append({"kernel": event.key, "launches": event.count / calls, "us": device_us / calls})
  return sorted(rows, key=lambda row: -row["us"])


def write_markdown(path: str, record: dict) -> None:
  lines = [
    f"# Linear-attention kernel profile on {record['device']}",
    "",
    f"Date: {record['date']}. Commit {record.get('commit', 'not recorded')}. jax {record['jax']}. "
    f"Command: `{record['command']}`.",
    "",
    "Device time per call, summed by kernel name over the profiled calls (jax.profiler trace; rows of a run "
    "whose trace had no device events are host events, marked 'host').",
    "",
  ]
  totals = collections.defaultdict(dict)
  for run in record["runs"]:
    total = run.get("error") and "failed" or f"{sum(row['us'] for row in run['kernels']):.1f}"
    totals[run["op"], run["shape"], run["config"]][run["part"]] = total
  if totals:
    lines += ["| op | B×T×H×D | config | fwd µs | fwd+bwd µs |", "|---|---|---|---:|---:|"]
  for (op, shape, config), parts in totals.items():
    lines.append(f"| {op} | {shape} | {config} | {parts.get('fwd', '')} | {parts.get('fwd_bwd', '')} |")
  if record.get("accuracy"):
    names = sorted({name for entry in record["accuracy"] for name in entry["errors"]})
    lines += [
      "",
      f"Accuracy ({kernel_timing.ACCURACY_SHAPE}, bf16, packed documents): relative RMS error against the "
      "float64 recurrence.",
      "",
      "| op | config | " + " | ".join(names) + " |",
      "|---|---|" + "---:|" * len(names),
    ]
    for entry in record["accuracy"]:
      errors = [f"{entry['errors'][name]:.2e}" if name in entry["errors"] else "" for name in names]
      lines.append(f"| {entry['op']} | {entry['config']} | " + " | ".join(errors) + " |")
  if record["runs"]:
    lines += [
      "",
      "| op | B×T×H×D | config | part | kernel | launches | µs | share |",
      "|---|---|---|---|---|---:|---:|---:|",
    ]
  for run in record["runs"]:
    if "error" in run:
      lines.append(
        f"| {run['op']} | {run['shape']} | {run['config']} | {run['part']} | failed: {run['error'][:80]} | | | |"
      )
      continue
    total = sum(row["us"] for row in run["kernels"])
    for row in run["kernels"]:
      part = run["part"] + (" (host)" if run["events"] == "host" else "")
      lines.append(
        f"| {run['op']} | {run['shape']} | {run['config']} | {part} | {row['kernel'][:60]} | "
        f"{row['launches']:g} | {row['us']:.1f} | {row['us'] / total:.0%} |"
      )
    lines.append(
      f"| {run['op']} | {run['shape']} | {run['config']} | {run['part']} | **total** | | **{total:.1f}** | |"
    )
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--name", default="kernel_profile_h200", help="results file stem")
  parser.add_argument("--ops", default="hgrn2", help="subset of " + ",".join(kernel_timing.OPS))
  parser.add_argument(
    "--shapes", default="8x2048x16x128", help="BxTxHxD shapes or indices into kernel_timing.SHAPES, comma-separated"
  )
  parser.add_argument(
    "--config",
    action="append",
    default=[],
    metavar="KNOB=VALUE",
    help="replace one knob of the default kernel configuration (repeatable), as in kernel_timing.py",
  )
  parser.add_argument(
    "--variant",
    action="append",
    default=[],
    metavar="KNOB=VALUE,...",
    help="a configuration to profile on top of --config (repeatable; one process compares them); default: --config",
  )
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--peer", action="store_true", help="also profile fla's op (torch.profiler) for each op")
  parser.add_argument(
    "--accuracy",
    action="store_true",
    help="also each variant's errors against the float64 recurrence (" + ", ".join(kernel_timing.ACCURACY_OPS) + ")",
  )
  args = parser.parse_args()
  shapes = kernel_timing.parse_shapes(args.shapes)
  ops = [op for op in args.ops.split(",") if op]
  for op in ops:
    if op not in kernel_timing.OPS:
      raise SystemExit(f"--ops: {op!r}; valid: {', '.join(kernel_timing.OPS)}.")
  base = kernel_timing.parse_config(args.config)
  variants = [{**base, **kernel_timing.parse_config(text.split(","))} for text in args.variant] or [base]
  if args.peer:
    try:
      import fla  # noqa: F401
    except ImportError:
      raise SystemExit(
        "--peer profiles fla on a CUDA GPU: pip install flash-linear-attention==0.6.0 fla-core==0.6.0"
      ) from None
  os.makedirs(args.out, exist_ok=True)
  record = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "commit": measurement.current_commit(),
    "command": "python3 " + " ".join(sys.argv),
    "runs": [],
    "accuracy": [],
  }
  if args.accuracy:  # first: one shape, independent of --shapes
    for op in ops:
      for overrides in variants if op in kernel_timing.ACCURACY_OPS else []:
        results = kernel_timing.accuracy_against_fla([op], overrides=overrides, with_fla=False)
        for case, result in results.items():
          record["accuracy"].append({"op": case, "config": config_label(overrides), "errors": result["ours"]})
          kernel_timing.log("accuracy", case, config_label(overrides), result["ours"])
        write(args, record)
  for shape in shapes:
    label = "x".join(map(str, shape))
    for op in ops:
      for overrides in variants:
        config_text = config_label(overrides)
        forward, forward_args, backward, backward_args = kernel_timing.ours_fns(
          op, shape, kernel_timing.ours(overrides=overrides)
        )
        for part, fn, fn_args in (("fwd", forward, forward_args), ("fwd_bwd", backward, backward_args)):
          run = {"op": op, "shape": label, "config": config_text, "part": part}
          try:
            rows, source = profile(fn, fn_args, args.calls)
          except Exception as error:  # a configuration the device refuses (e.g. shared memory) leaves the others
            save_run(args, record, {**run, "error": f"{type(error).__name__}: {str(error)[:2000]}"})
            continue
          save_run(args, record, {**run, "events": source, "kernels": rows})
      if args.peer and op in kernel_timing.FLA_NAMES:
        forward, backward, _ = kernel_timing.fla_fns(op, shape)
        for part, fn in (("fwd", forward), ("fwd_bwd", backward)):
          config_text = "fla " + kernel_timing.FLA_NAMES[op]
          run = {"op": op, "shape": label, "config": config_text, "part": part, "events": "device"}
          save_run(args, record, {**run, "kernels": profile_fla(fn, args.calls)})


def config_label(overrides: dict) -> str:
  return ",".join(f"{name}={value}" for name, value in overrides.items()) or "default"


def save_run(args, record, run):
  record["runs"].append(run)
  kernel_timing.log(
    run["op"], run["shape"], run["config"], run["part"], run.get("error") or json.dumps(run["kernels"][:8])
  )
  write(args, record)


def write(args, record):
  with open(os.path.join(args.out, args.name + ".json"), "w") as handle:
    json.dump(record, handle, indent=1)
  write_markdown(os.path.join(args.out, args.name + ".md"), record)


if __name__ == "__main__":
  main()
