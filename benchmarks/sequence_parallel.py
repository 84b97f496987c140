"""Sequence-parallel linear attention: one device against the time axis split over N devices.

For each op and length T (B=1, H=16, D=128, bf16 by default) times forward+backward (grads of q, k, v and, for
the HGRN2 gate, the log-decay) of
  single:    pallas_kernels.linear_attention on one device
  sequence:  sequence_parallel_linear_attention with [B,T,H,D] split over N devices along T
and records XLA's per-device memory of the compiled step (arguments + outputs + temporaries − aliased, from
buffer assignment: the peak the program needs, independent of what earlier rows left in the allocator). A
row whose compile or run fails with RESOURCE_EXHAUSTED is recorded as out of memory. Results (date, device,
jax version, command) are rewritten after every row; --budget_s stops starting new rows.

  4×H200:  python3 benchmarks/sequence_parallel.py --budget_s 150
  CPU smoke (4 fake devices):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      python benchmarks/sequence_parallel.py --tiny --out_dir /tmp/sp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kernel_timing  # noqa: E402  (benchmarks/kernel_timing.py: inputs, the fwd+bwd closure, compile and timing, log)
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from lsm_jax import metrics  # noqa: E402
from pallas_kernels.linear_attention import api  # noqa: E402
from pallas_kernels.linear_attention.sequence_parallel import sequence_parallel_linear_attention  # noqa: E402

OPS = ("tnl", "hgrn2", "cosformer2")  # decay per head, per token and key channel, none
GIB = 2.0**30


def placed_step(op, mode, inputs, devices, backend, chunk_size):
  """(jitted step, its inputs on the devices) for mode "single" (devices[0]) or "sequence" (all of devices)."""
  q, k, v, log_decay, d_out = inputs
  if mode == "single":
    attention = lambda q, k, v, log_decay: api.linear_attention(  # noqa: E731
      q, k, v, log_decay, backend=backend, chunk_size=chunk_size
    )
    place = lambda x: None if x is None else jax.device_put(x, devices[0])  # noqa: E731
    return kernel_timing.gradient_fn(attention, op == "hgrn2"), [place(x) for x in inputs]
  mesh = Mesh(np.asarray(devices), ("sequence",))
  attention = lambda q, k, v, log_decay: sequence_parallel_linear_attention(  # noqa: E731
    q, k, v, log_decay, mesh=mesh, backend=backend, chunk_size=chunk_size
  )
  split_time = NamedSharding(mesh, PartitionSpec(None, "sequence"))
  replicated = NamedSharding(mesh, PartitionSpec())
  place = lambda x, sharding: None if x is None else jax.device_put(x, sharding)  # noqa: E731
  decay_sharding = replicated if log_decay is None or log_decay.ndim == 1 else split_time
  args = [
    place(q, split_time),
    place(k, split_time),
    place(v, split_time),
    place(log_decay, decay_sharding),
    place(d_out, split_time),
  ]
  return kernel_timing.gradient_fn(attention, op == "hgrn2"), args


def measure(op, mode, length, args, devices):
  inputs = kernel_timing.jax_inputs(op, args.batch, length, args.heads, args.dim, dtype=jnp.dtype(args.dtype))
  row = {
    "op": op,
    "mode": mode,
    "devices": 1 if mode == "single" else len(devices),
    "shape": f"{args.batch}x{length}x{args.heads}x{args.dim}",
    "seq_len": length,
  }
  try:
    step, placed = placed_step(op, mode, inputs, devices, args.backend, args.chunk_size)
    compiled, row["compile_s"] = kernel_timing.compile_jax(step, placed)
    memory = metrics.compiled_memory_bytes(compiled)
    row["memory_gib_per_device"] = None if memory is None else memory["total"] / GIB
    row["fwd_bwd_ms"] = kernel_timing.time_compiled(compiled, placed, args.reps, args.calls)
    row["status"] = "ok"
  except Exception as error:  # record the row (out of memory is a result) and go on
    if metrics.is_out_of_memory(error):
      row["status"] = "out of memory"
    else:
      traceback.print_exc()
      row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
  return row


def write_markdown(path, record):
  lines = [
    f"# Sequence-parallel linear attention on {record['device']} × {record['num_devices']}",
    "",
    f"Date: {record['date']}. jax {record['jax_version']}, backend {record['backend']}, "
    f"{record['dtype']}. Command: `{record['command']}`.",
    "",
    "Forward+backward of one linear-attention op (grads of q, k, v; HGRN2 also of its gate), median "
    f"of {record['reps']} × {record['calls']} calls. single: one device; sequence: the time axis split "
    "over all devices (shard_map, one all-gather of per-shard states). Memory: XLA buffer-assignment "
    "peak per device of the compiled step (arguments + outputs + temporaries − aliased).",
    "",
    "| op | B×T×H×D | mode | devices | fwd+bwd ms | GiB / device | compile s | status |",
    "|---|---|---|---|---|---|---|---|",
  ]
  fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
  for row in record["results"]:
    lines.append(
      f"| {row['op']} | {row['shape']} | {row['mode']} | {row['devices']} | "
      f"{fmt(row.get('fwd_bwd_ms'), '.2f')} | {fmt(row.get('memory_gib_per_device'), '.3f')} | "
      f"{fmt(row.get('compile_s'), '.1f')} | {row['status']} |"
    )
  if record.get("stopped"):
    lines += ["", f"Stopped early: {record['stopped']}."]
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def save(out_dir, name, record):
  with open(os.path.join(out_dir, f"{name}.json"), "w") as handle:
    json.dump(record, handle, indent=1)
  write_markdown(os.path.join(out_dir, f"{name}.md"), record)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--name", default="sequence_parallel_h200x4", help="result file stem in --out_dir")
  parser.add_argument("--ops", default="tnl,hgrn2,cosformer2", help="subset of " + ",".join(OPS))
  parser.add_argument("--seq_lens", default="32768,65536,131072")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--backend", default="auto", choices=api.BACKENDS)
  parser.add_argument("--chunk_size", type=int, default=None)
  parser.add_argument("--num_devices", type=int, default=None, help="devices of the sequence mode (default all)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--budget_s", type=float, default=None, help="start no new row after this many seconds")
  parser.add_argument(
    "--tiny",
    action="store_true",
    help="CPU smoke: replaces the sizes with T 256,512, H 2, D 16, float32, 2 reps of 1 call",
  )
  args = parser.parse_args(argv)
  if args.tiny:
    args.seq_lens, args.heads, args.dim, args.dtype = "256,512", 2, 16, "float32"
    args.reps, args.calls = 2, 1
  ops = [op for op in args.ops.split(",") if op]
  unknown = sorted(set(ops) - set(OPS))
  if unknown:
    parser.error(f"unknown --ops {unknown}; valid: {', '.join(OPS)}")
  args.ops = ops
  args.seq_lens = [int(x) for x in args.seq_lens.split(",") if x]
  return args


def main(argv=None):
  args = parse_args(argv)
  devices = jax.devices()[: args.num_devices] if args.num_devices else jax.devices()
  if len(devices) < 2:
    raise SystemExit(f"sequence parallelism needs at least 2 devices; found {len(devices)}")
  bad = [length for length in args.seq_lens if length % len(devices)]
  if bad:
    raise SystemExit(f"--seq_lens {bad} are not divisible by the {len(devices)} devices")
  os.makedirs(args.out_dir, exist_ok=True)
  record = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": getattr(devices[0], "device_kind", str(devices[0])),
    "num_devices": len(devices),
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "backend": api.resolve_backend(args.backend, devices[0].platform),
    "dtype": args.dtype,
    "reps": args.reps,
    "calls": args.calls,
    "command": "python3 benchmarks/sequence_parallel.py " + " ".join(sys.argv[1:]),
    "results": [],
  }
  kernel_timing.log("devices", len(devices), record["device"], "jax", jax.__version__, "backend", record["backend"])
  started = time.perf_counter()
  for op in args.ops:
    for length in args.seq_lens:
      for mode in ("single", "sequence"):
        elapsed = time.perf_counter() - started
        if args.budget_s is not None and elapsed > args.budget_s:
          record["stopped"] = (
            f"--budget_s {args.budget_s:g} reached after {elapsed:.0f} s, before {op} T={length} {mode}"
          )
          save(args.out_dir, args.name, record)
          kernel_timing.log(record["stopped"])
          return record
        row = measure(op, mode, length, args, devices)
        record["results"].append(row)
        save(args.out_dir, args.name, record)
        kernel_timing.log(json.dumps(row))
  return record


if __name__ == "__main__":
  main()
