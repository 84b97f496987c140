"""Times the loss's row statistics (pallas_kernels.cross_entropy) on a GPU: XLA's two-pass form against the
one-pass Pallas kernel over a grid of rows per program, column block and warps, and then the whole fused loss
(lsm_jax.losses.masked_cross_entropy_sums: head matmul, statistics, gradient; forward+backward) with each.

The statistics alone isolate the kernel; the whole loss is what a training step runs, with the logits written by
the head's matmul and read again by the gradient's pass. benchmarks/train_step.py measures the training step.

  python3 benchmarks/cross_entropy_timing.py --rows 4096 --vocab 100280
"""

import argparse
import itertools
import json
import os
import sys
import time

_STARTED = time.monotonic()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kernel_timing  # noqa: E402
import measurement  # noqa: E402

from lsm_jax import losses  # noqa: E402
from pallas_kernels import cross_entropy  # noqa: E402

GRID_ROWS = (1, 2, 4)
GRID_COLUMNS = (2048, 4096, 8192)
GRID_WARPS = (4, 8, 16)


def time_fn(fn, args, reps, calls):
  """Median ms per call (kernel_timing.time_jax: compiled ahead, warmed up, reps × back-to-back calls)."""
  return kernel_timing.time_jax(jax.jit(fn), args, reps, calls)["ms"]


class _Head:
  """The model's tied head as losses.masked_cross_entropy_sums takes it: fp32 weights used in bf16."""

  def __init__(self, weight):
    self.weight = weight

  def head(self):
    return self.weight, jnp.bfloat16


def measure_statistics(rows, vocab, reps, calls):
  keys = jax.random.split(jax.random.key(0), 2)
  logits = (jax.random.normal(keys[0], (rows, vocab), jnp.float32) * 3).astype(jnp.bfloat16)
  targets = jax.random.randint(keys[1], (rows,), 0, vocab)
  gigabytes = rows * vocab * 2 / 1e9  # the least traffic: the logits read once

  def statistics(backend, config):
    return lambda x, t: cross_entropy.row_log_normalizer_and_pick(x, t, backend=backend, config=config)

  variants = [
    {"variant": "xla", "config": None, "ms": time_fn(statistics("xla", None), (logits, targets), reps, calls)}
  ]
  for block_rows, columns, warps in itertools.product(GRID_ROWS, GRID_COLUMNS, GRID_WARPS):
    config = cross_entropy.RowStatsConfig(block_rows=block_rows, block_columns=columns, num_warps=warps)
    try:
      ms = time_fn(statistics("pallas_gpu", config), (logits, targets), reps, calls)
    except Exception as error:  # a configuration the compiler refuses (registers, shared memory) is skipped
      measurement.log(f"config {config}: {type(error).__name__}: {str(error)[:200]}")
      continue
    variants.append({"variant": "pallas_gpu", "config": vars(config), "ms": ms})
  for variant in variants:
    variant["gb_s"] = gigabytes / variant["ms"] * 1e3
  best = min((v for v in variants if v["variant"] == "pallas_gpu"), key=lambda v: v["ms"])
  return {"rows": rows, "vocab": vocab, "variants": variants, "best_config": best["config"]}


def measure_loss(batch, length, width, vocab, chunk, best_config, reps, calls):
  keys = jax.random.split(jax.random.key(1), 3)
  hidden = (jax.random.normal(keys[0], (batch, length, width), jnp.float32)).astype(jnp.bfloat16)
  weight = jax.random.normal(keys[1], (vocab, width), jnp.float32) * 0.02
  targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
  mask = jnp.ones((batch, length), jnp.float32)
  result = {"batch": batch, "length": length, "width": width, "vocab": vocab, "chunk": chunk}
  default = cross_entropy.gpu.DEFAULT_CONFIG
  try:
    cross_entropy.gpu.DEFAULT_CONFIG = cross_entropy.RowStatsConfig(**best_config)
    for backend in ("xla", "pallas_gpu"):

      def loss(weight, hidden, backend=backend):
        return losses.masked_cross_entropy_sums(_Head(weight), hidden, targets, mask, chunk, "bfloat16", backend)[0]

      result[f"{backend}_fwd_bwd_ms"] = time_fn(jax.value_and_grad(loss, argnums=(0, 1)), (weight, hidden), reps, calls)
  finally:
    cross_entropy.gpu.DEFAULT_CONFIG = default
  result["xla_over_pallas"] = result["xla_fwd_bwd_ms"] / result["pallas_gpu_fwd_bwd_ms"]
  return result


def write_markdown(path, record):
  statistics, loss = record["statistics"], record["loss"]
  lines = [
    f"# Cross-entropy row statistics on {record['device']}",
    "",
    f"Date: {record['date']}, commit {record['commit']}, jax {record['jax_version']}. Command: `{record['command']}`.",
    "",
    f"The statistics alone: log-normaliser and target logit of {statistics['rows']:,} bf16 rows of "
    f"{statistics['vocab']:,} logits. ms: median per call; GB/s: the logits read once over the time. Config: "
    "rows per program × column block × warps. The ten fastest Pallas configurations and XLA:",
    "",
    "| variant | config | ms | GB/s |",
    "|---|---|---:|---:|",
  ]
  ranked = sorted(statistics["variants"], key=lambda v: v["ms"])
  shown = [v for v in ranked if v["variant"] == "pallas_gpu"][:10] + [v for v in ranked if v["variant"] == "xla"]
  for v in shown:
    config = v["config"]
    label = "—" if config is None else f"{config['block_rows']}×{config['block_columns']}×{config['num_warps']}"
    lines.append(f"| {v['variant']} | {label} | {v['ms']:.3f} | {v['gb_s']:.0f} |")
  lines += [
    "",
    f"The whole fused loss, forward+backward (value and the gradients of the hidden states and the head), hidden "
    f"[{loss['batch']}, {loss['length']}, {loss['width']}], vocabulary {loss['vocab']:,}, chunks of {loss['chunk']} "
    "positions, bf16 logits, the fastest configuration above:",
    "",
    "| XLA statistics ms | Pallas statistics ms | XLA / Pallas |",
    "|---:|---:|---:|",
    f"| {loss['xla_fwd_bwd_ms']:.3f} | {loss['pallas_gpu_fwd_bwd_ms']:.3f} | {loss['xla_over_pallas']:.3f} |",
  ]
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--name", default="cross_entropy_h200")
  parser.add_argument("--rows", type=int, default=4096, help="rows of one loss chunk (batch × chunk)")
  parser.add_argument("--vocab", type=int, default=100280)
  parser.add_argument("--loss_shape", default="4,8192,1536,1024", help="batch,length,width,chunk of the whole loss")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--calls", type=int, default=20)
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("cross_entropy_timing.py times GPU kernels: run it on a GPU host.")
  record = {
    **measurement.record_header("cross_entropy_timing.py"),
  }
  record["statistics"] = measure_statistics(args.rows, args.vocab, args.reps, args.calls)
  measurement.log(json.dumps({"best_config": record["statistics"]["best_config"]}))
  batch, length, width, chunk = (int(v) for v in args.loss_shape.split(","))
  record["loss"] = measure_loss(
    batch, length, width, args.vocab, chunk, record["statistics"]["best_config"], args.reps, args.calls
  )
  measurement.log(json.dumps(record["loss"]))
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, f"{args.name}.json"), "w") as handle:
    json.dump(record, handle, indent=1)
  write_markdown(os.path.join(args.out_dir, f"{args.name}.md"), record)
  measurement.log("done at %.0f s" % (time.monotonic() - _STARTED))


if __name__ == "__main__":
  main()
