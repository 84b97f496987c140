"""Times the fused GLU's product gradient (pallas_kernels.glu) on a GPU: XLA's autodiff (two padded halves added)
against the Pallas kernel over a grid of block rows, columns and warps, and then the whole fused GLU
(layers.GatedMLP with fused=True: the up-and-gate matmul, the product, the down matmul; forward+backward) with each
backend.

The gradient alone isolates the kernel; the whole GLU is what a training step runs of it. benchmarks/train_step.py
--glu_backend measures the training step.

  python3 benchmarks/glu_timing.py --rows 32768 --widths 1536:4096,1024:2816
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
from flax import nnx  # noqa: E402

from lsm_jax.models import layers  # noqa: E402
from pallas_kernels import glu  # noqa: E402
from pallas_kernels.blocks import rows_dividing  # noqa: E402
from pallas_kernels.glu import api as glu_api  # noqa: E402
from pallas_kernels.glu import gpu as glu_gpu  # noqa: E402

GRID = {"block_rows": (1, 2, 4, 8), "block_columns": (256, 512, 1024, 2048), "num_warps": (4, 8)}


def measure_gradient(rows, width, swish, reps, calls):
  keys = jax.random.split(jax.random.key(0), 2)
  both = jax.random.normal(keys[0], (rows, 2, width), jnp.float32).astype(jnp.bfloat16)
  d_hidden = jax.random.normal(keys[1], (rows, width), jnp.float32).astype(jnp.bfloat16)
  gigabytes = rows * width * 2 * 5 / 1e9  # d_hidden, up and gate read once, both halves written once
  xla = lambda d, b: glu_api.glu_gradient_xla(d, b, swish=swish)
  variants = [{"variant": "xla", "config": None, "ms": kernel_timing.median_ms(xla, (d_hidden, both), reps, calls)}]
  configs = [glu.GluGradConfig(**dict(zip(GRID, values))) for values in itertools.product(*GRID.values())]
  # a column block the kernel would halve to divide F is the same as a smaller one of the grid
  configs = [config for config in configs if rows_dividing(width, config.block_columns) == config.block_columns]

  def kernel(config):
    return lambda d, b: glu_gpu.glu_gradient_gpu(d, b, swish=swish, config=config)

  best = kernel_timing.time_config_grid(variants, configs, kernel, (d_hidden, both), gigabytes, reps, calls)
  return {"rows": rows, "width": width, "swish": swish, "variants": variants, "best_config": best}


def measure_mlp(rows, d_model, width, swish, best_config, reps, calls):
  x = jax.random.normal(jax.random.key(1), (1, rows, d_model), jnp.float32).astype(jnp.bfloat16)
  result = {"rows": rows, "d_model": d_model, "width": width, "swish": swish}
  default = glu_gpu.DEFAULT_CONFIG
  try:
    glu_gpu.DEFAULT_CONFIG = glu.GluGradConfig(**best_config)
    for backend in ("xla", "pallas_gpu"):
      mlp = layers.GatedMLP(
        d_model,
        width,
        swish=swish,
        std=0.02,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
        fused=True,
        glu_backend=backend,
      )
      graphdef, params = nnx.split(mlp, nnx.Param)

      def loss(params, x, graphdef=graphdef):
        return jnp.sum(nnx.merge(graphdef, params)(x, jnp.bfloat16).astype(jnp.float32))

      result[f"{backend}_fwd_bwd_ms"] = kernel_timing.median_ms(
        jax.value_and_grad(loss, argnums=(0, 1)), (params, x), reps, calls
      )
  finally:
    glu_gpu.DEFAULT_CONFIG = default
  result["xla_over_pallas"] = result["xla_fwd_bwd_ms"] / result["pallas_gpu_fwd_bwd_ms"]
  return result


def write_markdown(path, record):
  lines = [
    f"# Fused GLU product gradient on {record['device']}",
    "",
    f"Date: {record['date']}, commit {record['commit']}, jax {record['jax_version']}. Command: `{record['command']}`.",
    "",
    "The gradient alone: d_both [rows, 2, F] of bf16 rows from d_hidden, up and gate. ms: median per call; GB/s: "
    "the three inputs read and the two halves written once over the time. Config: rows × columns × warps. The five "
    "fastest Pallas configurations and XLA, per shape:",
    "",
    "| rows × F | act | variant | config | ms | GB/s |",
    "|---|---|---|---|---:|---:|",
  ]
  for shape in record["gradient"]:
    ranked = sorted(shape["variants"], key=lambda v: v["ms"])
    shown = [v for v in ranked if v["variant"] == "pallas_gpu"][:5] + [v for v in ranked if v["variant"] == "xla"]
    act = "SiLU" if shape["swish"] else "identity"
    for v in shown:
      config = "—" if v["config"] is None else "×".join(str(value) for value in v["config"].values())
      timing = f"{v['ms']:.3f} | {v['gb_s']:.0f}"
      lines.append(f"| {shape['rows']:,} × {shape['width']} | {act} | {v['variant']} | {config} | {timing} |")
  lines += [
    "",
    "The whole fused GLU (GatedMLP, fused=True), forward+backward of its output's sum (the gradients of its weights "
    "and input), bf16, each shape's fastest configuration above:",
    "",
    "| rows × d × F | act | XLA ms | Pallas ms | XLA / Pallas |",
    "|---|---|---:|---:|---:|",
  ]
  for mlp in record["mlp"]:
    lines.append(
      f"| {mlp['rows']:,} × {mlp['d_model']} × {mlp['width']} | {'SiLU' if mlp['swish'] else 'identity'} | "
      f"{mlp['xla_fwd_bwd_ms']:.3f} | {mlp['pallas_gpu_fwd_bwd_ms']:.3f} | {mlp['xla_over_pallas']:.3f} |"
    )
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def main():
  parser = measurement.kernel_timing_parser(__doc__.splitlines()[0], "glu")
  parser.add_argument("--rows", type=int, default=32768, help="tokens of one step (batch × length)")
  parser.add_argument(
    "--widths", default="1536:4096,1024:2816", help="d_model:F pairs (TNL and HGRN2 1B and 410M by default)"
  )
  parser.add_argument("--swish", action="store_true", help="SwiGLU (LLaMA) instead of the activation-free SGLU")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("glu_timing.py times GPU kernels: run it on a GPU host.")
  record = {**measurement.record_header("glu_timing.py"), "gradient": [], "mlp": []}
  for pair in args.widths.split(","):
    d_model, width = (int(v) for v in pair.split(":"))
    gradient = measure_gradient(args.rows, width, args.swish, args.reps, args.calls)
    record["gradient"].append(gradient)
    measurement.log(json.dumps({"width": width, "best_config": gradient["best_config"]}))
    record["mlp"].append(
      measure_mlp(args.rows, d_model, width, args.swish, gradient["best_config"], args.reps, args.calls)
    )
    measurement.log(json.dumps(record["mlp"][-1]))
  measurement.save_results(args, record, write_markdown)
  measurement.log("done at %.0f s" % (time.monotonic() - _STARTED))


if __name__ == "__main__":
  main()
