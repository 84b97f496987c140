"""Times the RMS norms (pallas_kernels.rms_norm) on a GPU: XLA's form against the Pallas kernels over a
grid of rows-per-program and warps, forward and forward+backward, and names the fastest configuration per width
(the tuned table of pallas_kernels/rms_norm/gpu.py).

What is timed is the norm alone, as a model's pre-norm calls it: s = x + delta, y = norm(s), and the backward of
both outputs. Inside a model XLA fuses the add into neighbouring passes differently; benchmarks/train_step.py
measures the whole training step with each backend (--norm_backend).

  python3 benchmarks/rms_norm_timing.py --widths 1024,1536,2048,4096
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

from pallas_kernels import rms_norm  # noqa: E402

GRID_ROWS = (1, 2, 4)
GRID_WARPS = (4, 8)


def norm_fns(backend, config):
  def forward(x, delta):
    return rms_norm.residual_rms_norm(x, delta, eps=1e-6, backend=backend, config=config)

  def forward_backward(x, delta, ds, dy):
    outputs, vjp = jax.vjp(forward, x, delta)
    return outputs, vjp((ds, dy))

  return forward, forward_backward


def measure_width(rows, width, reps, calls):
  keys = jax.random.split(jax.random.key(0), 4)
  x, delta, ds, dy = (jax.random.normal(k, (rows, width), jnp.float32).astype(jnp.bfloat16) for k in keys)
  element_bytes = rows * width * 2
  # Least traffic: forward reads x, delta and writes s, y; backward reads s, dy, ds and writes the gradient.
  traffic = {"fwd": 4 * element_bytes, "bwd": 4 * element_bytes}
  result = {"rows": rows, "width": width, "variants": []}

  def entry(name, config, fwd_ms, fwd_bwd_ms):
    return {
      "variant": name,
      "config": config,
      "fwd_ms": fwd_ms,
      "fwd_bwd_ms": fwd_bwd_ms,
      "fwd_gb_s": traffic["fwd"] / fwd_ms / 1e6,
      "fwd_bwd_gb_s": (traffic["fwd"] + traffic["bwd"]) / fwd_bwd_ms / 1e6,
    }

  forward, forward_backward = norm_fns("xla", None)
  result["variants"].append(
    entry(
      "xla",
      None,
      kernel_timing.median_ms(forward, (x, delta), reps, calls),
      kernel_timing.median_ms(forward_backward, (x, delta, ds, dy), reps, calls),
    )
  )
  fwd_times = {}
  for block_rows, warps in itertools.product(GRID_ROWS, GRID_WARPS):
    config = rms_norm.NormConfig(block_rows=block_rows, num_warps=warps)
    fwd_times[(block_rows, warps)] = kernel_timing.median_ms(norm_fns("pallas_gpu", config)[0], (x, delta), reps, calls)
  best_rows, best_warps = min(fwd_times, key=fwd_times.get)
  for block_rows, warps in itertools.product(GRID_ROWS, GRID_WARPS):
    config = rms_norm.NormConfig(
      block_rows=best_rows, num_warps=best_warps, block_rows_backward=block_rows, num_warps_backward=warps
    )
    fwd_bwd = kernel_timing.median_ms(norm_fns("pallas_gpu", config)[1], (x, delta, ds, dy), reps, calls)
    fields = {"block_rows": best_rows, "num_warps": best_warps}
    fields |= {"block_rows_backward": block_rows, "num_warps_backward": warps}
    result["variants"].append(entry("pallas_gpu", fields, fwd_times[(best_rows, best_warps)], fwd_bwd))
  result["forward_grid_ms"] = {f"{r}x{w}": ms for (r, w), ms in fwd_times.items()}
  best = min((v for v in result["variants"] if v["variant"] == "pallas_gpu"), key=lambda v: v["fwd_bwd_ms"])
  result["best_config"] = best["config"]
  # The gated output norm (TNL's) with the fastest configuration: y = norm(x)·sigmoid(gate), both gradients.
  best_config = rms_norm.NormConfig(**best["config"])
  for backend, config in (("xla", None), ("pallas_gpu", best_config)):

    def gated(x, gate, dy, backend=backend, config=config):
      y, vjp = jax.vjp(lambda x, g: rms_norm.gated_rms_norm(x, g, eps=1e-6, backend=backend, config=config), x, gate)
      return y, vjp(dy)

    result[f"gated_{backend}_fwd_bwd_ms"] = kernel_timing.median_ms(gated, (x, delta, dy), reps, calls)
  result["xla_over_best"] = result["variants"][0]["fwd_bwd_ms"] / best["fwd_bwd_ms"]
  return result


def write_markdown(path, record):
  lines = [
    f"# Residual RMS norm on {record['device']}",
    "",
    f"Date: {record['date']}, commit {record['commit']}, jax {record['jax_version']}. Command: `{record['command']}`.",
    "",
    "bf16 rows; s = x + delta, y = s / rms(s) and the backward of both. ms: median per call. GB/s: the least "
    "traffic (forward: x, delta read, s, y written; backward: s, dy, ds read, the gradient written) over the time. "
    "Configs: forward rows×warps (the fastest forward), then the backward's rows×warps.",
    "",
    "| rows × width | variant | config | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |",
    "|---|---|---|---|---|---|---|",
  ]
  for result in record["results"]:
    for v in result["variants"]:
      config = v["config"]
      label = (
        "—"
        if config is None
        else f"{config['block_rows']}×{config['num_warps']}, bwd {config['block_rows_backward']}×"
        f"{config['num_warps_backward']}"
      )
      lines.append(
        f"| {result['rows']} × {result['width']} | {v['variant']} | {label} | {v['fwd_ms']:.3f} | "
        f"{v['fwd_gb_s']:.0f} | {v['fwd_bwd_ms']:.3f} | {v['fwd_bwd_gb_s']:.0f} |"
      )
  lines += [
    "",
    "Gated output norm: y = norm(x)·sigmoid(gate) and both gradients, with the fastest configuration.",
    "",
    "| width | fastest Pallas config | XLA / Pallas, residual norm fwd+bwd | gated norm fwd+bwd ms, XLA / Pallas |",
    "|---|---|---|---|",
  ]
  for result in record["results"]:
    xla_ms, pallas_ms = result["gated_xla_fwd_bwd_ms"], result["gated_pallas_gpu_fwd_bwd_ms"]
    lines.append(
      f"| {result['width']} | {result['best_config']} | {result['xla_over_best']:.2f} | "
      f"{xla_ms:.3f} / {pallas_ms:.3f} = {xla_ms / pallas_ms:.2f} |"
    )
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def main():
  parser = measurement.kernel_timing_parser(__doc__.splitlines()[0], "rms_norm")
  parser.add_argument("--rows", type=int, default=32768, help="tokens per call (batch × length)")
  parser.add_argument("--widths", default="1024,1536,2048,4096")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("rms_norm_timing.py times GPU kernels: run it on a GPU host.")
  widths = [int(w) for w in args.widths.split(",") if w]
  record = {
    **measurement.record_header("rms_norm_timing.py"),
    "results": [],
  }
  for width in widths:
    result = measure_width(args.rows, width, args.reps, args.calls)
    measurement.log(json.dumps({k: result[k] for k in ("width", "best_config", "xla_over_best")}))
    record["results"].append(result)
    measurement.save_results(args, record, write_markdown)
  measurement.log("done at %.0f s" % (time.monotonic() - _STARTED))


if __name__ == "__main__":
  main()
