"""Times the loss's kernels (pallas_kernels.cross_entropy) on a GPU: the row statistics (XLA's two-pass form against
the one-pass Pallas kernel over a grid of rows per program, column block, warps and programs per row) and the softmax
gradient (XLA's fusion against the Pallas kernel over a grid of block rows, columns and warps), and then the whole
fused loss (lsm_jax.losses.masked_cross_entropy_sums: head matmul, statistics, gradient; forward+backward) with XLA
for both, the statistics kernel alone, and both kernels.

The kernels alone isolate them; the whole loss is what a training step runs, with the logits written by the head's
matmul and read again by the statistics and the gradient. benchmarks/train_step.py measures the training step.

  python3 benchmarks/cross_entropy_timing.py --rows 4096 --vocab 100280
"""

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

STATISTICS_GRID = {
  "block_rows": (1, 2),
  "block_columns": (1024, 2048, 4096),
  "num_warps": (4, 8),
  "row_splits": (1, 4, 16),
}
GRADIENT_GRID = {"block_rows": (1, 2, 4), "block_columns": (1024, 2048, 4096), "num_warps": (4, 8)}


class _Head:
  """The model's tied head as losses.masked_cross_entropy_sums takes it: fp32 weights used in bf16."""

  def __init__(self, weight):
    self.weight = weight

  def head(self):
    return self.weight, jnp.bfloat16


def _grid(config_class, grid):
  return [config_class(**dict(zip(grid, values))) for values in itertools.product(*grid.values())]


def _logits(rows, vocab):
  keys = jax.random.split(jax.random.key(0), 3)
  logits = (jax.random.normal(keys[0], (rows, vocab), jnp.float32) * 3).astype(jnp.bfloat16)
  return logits, jax.random.randint(keys[1], (rows,), 0, vocab), jax.random.uniform(keys[2], (rows,))


def measure_statistics(rows, vocab, reps, calls):
  logits, targets, _ = _logits(rows, vocab)

  def statistics(backend, config):
    return lambda x, t: cross_entropy.row_log_normalizer_and_pick(x, t, backend=backend, config=config)

  variants = [
    {
      "variant": "xla",
      "config": None,
      "ms": kernel_timing.median_ms(statistics("xla", None), (logits, targets), reps, calls),
    }
  ]
  best = kernel_timing.time_config_grid(
    variants,
    _grid(cross_entropy.RowStatsConfig, STATISTICS_GRID),
    lambda config: statistics("pallas_gpu", config),
    (logits, targets),
    rows * vocab * 2 / 1e9,  # the logits read once
    reps,
    calls,
  )
  return {"rows": rows, "vocab": vocab, "variants": variants, "best_config": best}


def measure_gradient(rows, vocab, reps, calls):
  logits, targets, weights = _logits(rows, vocab)
  log_normalizer = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)

  def gradient(backend, config):
    return lambda x, n, t, w: cross_entropy.softmax_gradient(x, n, t, w, jnp.bfloat16, backend=backend, config=config)

  args = (logits, log_normalizer, targets, weights)
  variants = [
    {"variant": "xla", "config": None, "ms": kernel_timing.median_ms(gradient("xla", None), args, reps, calls)}
  ]
  best = kernel_timing.time_config_grid(
    variants,
    _grid(cross_entropy.SoftmaxGradConfig, GRADIENT_GRID),
    lambda config: gradient("pallas_gpu", config),
    args,
    rows * vocab * 2 * 2 / 1e9,  # the logits read once, the bf16 gradient written once
    reps,
    calls,
  )
  return {"rows": rows, "vocab": vocab, "variants": variants, "best_config": best}


# The whole loss with XLA's forms, the statistics kernel alone, and both kernels.
LOSS_VARIANTS = {
  "xla": ("xla", "xla"),
  "statistics_kernel": ("pallas_gpu", "xla"),
  "both_kernels": ("pallas_gpu", "pallas_gpu"),
}


def measure_loss(batch, length, width, vocab, chunk, statistics_config, gradient_config, reps, calls):
  keys = jax.random.split(jax.random.key(1), 3)
  hidden = (jax.random.normal(keys[0], (batch, length, width), jnp.float32)).astype(jnp.bfloat16)
  weight = jax.random.normal(keys[1], (vocab, width), jnp.float32) * 0.02
  targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
  mask = jnp.ones((batch, length), jnp.float32)
  result = {"batch": batch, "length": length, "width": width, "vocab": vocab, "chunk": chunk}
  gpu, api = cross_entropy.gpu, cross_entropy.api
  saved = (gpu.DEFAULT_CONFIG, gpu.DEFAULT_GRADIENT_CONFIG, api.GPU_DEFAULT, api.GPU_GRADIENT_DEFAULT)
  try:
    gpu.DEFAULT_CONFIG = cross_entropy.RowStatsConfig(**statistics_config)
    gpu.DEFAULT_GRADIENT_CONFIG = cross_entropy.SoftmaxGradConfig(**gradient_config)
    for name, (api.GPU_DEFAULT, api.GPU_GRADIENT_DEFAULT) in LOSS_VARIANTS.items():

      def loss(weight, hidden):
        return losses.masked_cross_entropy_sums(_Head(weight), hidden, targets, mask, chunk, "bfloat16", "auto")[0]

      result[f"{name}_fwd_bwd_ms"] = kernel_timing.median_ms(
        jax.value_and_grad(loss, argnums=(0, 1)), (weight, hidden), reps, calls
      )
  finally:
    gpu.DEFAULT_CONFIG, gpu.DEFAULT_GRADIENT_CONFIG, api.GPU_DEFAULT, api.GPU_GRADIENT_DEFAULT = saved
  return result


def _config_label(config):
  return "—" if config is None else "×".join(str(value) for value in config.values())


def _kernel_table(measured, knobs):
  lines = [f"| variant | config ({knobs}) | ms | GB/s |", "|---|---|---:|---:|"]
  ranked = sorted(measured["variants"], key=lambda v: v["ms"])
  shown = [v for v in ranked if v["variant"] == "pallas_gpu"][:10] + [v for v in ranked if v["variant"] == "xla"]
  return lines + [f"| {v['variant']} | {_config_label(v['config'])} | {v['ms']:.3f} | {v['gb_s']:.0f} |" for v in shown]


def write_markdown(path, record):
  statistics, gradient, loss = record["statistics"], record["gradient"], record["loss"]
  lines = [
    f"# Cross-entropy kernels on {record['device']}",
    "",
    f"Date: {record['date']}, commit {record['commit']}, jax {record['jax_version']}. Command: `{record['command']}`.",
    "",
    f"The row statistics alone: log-normaliser and target logit of {statistics['rows']:,} bf16 rows of "
    f"{statistics['vocab']:,} logits. ms: median per call; GB/s: the logits read once over the time. The ten fastest "
    "Pallas configurations and XLA:",
    "",
    *_kernel_table(statistics, "rows × columns × warps × programs per row"),
    "",
    "The softmax gradient alone, the same rows, written in bf16. GB/s: the logits read and the gradient written once "
    "over the time:",
    "",
    *_kernel_table(gradient, "rows × columns × warps"),
    "",
    f"The whole fused loss, forward+backward (value and the gradients of the hidden states and the head), hidden "
    f"[{loss['batch']}, {loss['length']}, {loss['width']}], vocabulary {loss['vocab']:,}, chunks of {loss['chunk']} "
    "positions, bf16 logits, each kernel in its fastest configuration above:",
    "",
    "| statistics, gradient | ms |",
    "|---|---:|",
    *[
      f"| {', '.join('Pallas' if b == 'pallas_gpu' else 'XLA' for b in backends)} | {loss[f'{name}_fwd_bwd_ms']:.3f} |"
      for name, backends in LOSS_VARIANTS.items()
    ],
  ]
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def main():
  parser = measurement.kernel_timing_parser(__doc__.splitlines()[0], "cross_entropy")
  parser.add_argument("--rows", type=int, default=4096, help="rows of one loss chunk (batch × chunk)")
  parser.add_argument("--vocab", type=int, default=100280)
  parser.add_argument("--loss_shape", default="4,8192,1536,1024", help="batch,length,width,chunk of the whole loss")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("cross_entropy_timing.py times GPU kernels: run it on a GPU host.")
  record = measurement.record_header("cross_entropy_timing.py")
  record["statistics"] = measure_statistics(args.rows, args.vocab, args.reps, args.calls)
  record["gradient"] = measure_gradient(args.rows, args.vocab, args.reps, args.calls)
  best = {kernel: record[kernel]["best_config"] for kernel in ("statistics", "gradient")}
  measurement.log(json.dumps({"best_configs": best}))
  batch, length, width, chunk = (int(v) for v in args.loss_shape.split(","))
  record["loss"] = measure_loss(
    batch, length, width, args.vocab, chunk, best["statistics"], best["gradient"], args.reps, args.calls
  )
  measurement.log(json.dumps(record["loss"]))
  measurement.save_results(args, record, write_markdown)
  measurement.log("done at %.0f s" % (time.monotonic() - _STARTED))


if __name__ == "__main__":
  main()
