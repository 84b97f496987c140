"""Softmax attention over packed documents on one GPU: cuDNN flash attention against Pallas flash attention.

The Pallas kernels take the documents as segment ids (pallas_kernels.attention); cuDNN as a dense mask.

On a GPU host with jax[cuda]:
  python3 benchmarks/attention_timing.py --out $OUT [--shapes 0,1,2] [--reps 5] [--calls 10] [--budget_s 400] \
      [--config block_q=64 --config num_warps=4 ...]

Variants (bf16, H=16, D=128), each forward and forward+backward (one jitted gradient of Σ o·do in q, k, v; the
forward output feeds the backward of every variant, so none is dropped):
  cudnn_causal         jax.nn.dot_product_attention(implementation="cudnn", is_causal=True) without documents:
                       the speed ceiling (it attends across documents: more work, another result)
  cudnn_document_mask  the same with the dense [B, 1, T, T] mask LLaMA builds from segment ids (formed in the
                       jitted function, as in training)
  pallas_segment_ids   flash_attention(q, k, v, segment_ids): LLaMA's "pallas_gpu" attention
  pallas_causal        flash_attention(q, k, v) without documents: "pallas_gpu" on unpacked rows
Shapes B×T ∈ {8×2048, 2×8192, 1×32768}. Documents: each row packed with lengths drawn (--seed) from a lognormal
of mean --mean_document tokens (sigma 1), the last cut at the row's end.
TFLOP/s counts the causal + document FLOPs for every variant, 4·D·H·Σ n(n+1)/2 over documents of n tokens
forward and 3.5× that forward+backward (FlashAttention's convention: five matmuls backward to two forward); for
cudnn_causal it is the useful throughput, not what its kernel executes.
Timing (kernel_timing.py's method): lower().compile() (recorded as compile_s), two warm-up calls, then the median
over --reps of (--calls back-to-back calls, block_until_ready) / --calls.
Check, after each shape's timings: the Pallas output and gradients on the first --check_heads heads
(heads are independent) against jax.nn.dot_product_attention(implementation="xla") with the dense mask in
float32 on the same bf16 inputs, as relative RMS errors, beside cuDNN-with-mask's errors against the same
reference.
--config knob=value (repeatable) replaces one field of the kernels' default configuration
(pallas_kernels/attention/config.py). --budget_s: no measurement starts once that many seconds have passed since
start; JSON and markdown are rewritten after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

_STARTED = time.monotonic()  # --budget_s counts from here, JAX start-up included

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.attention import FlashConfig, default_config, flash_attention  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measurement  # noqa: E402  (benchmarks/measurement.py: the budgeted runner and --shapes)

SHAPES = ((8, 2048, 16, 128), (2, 8192, 16, 128), (1, 32768, 16, 128))
VARIANTS = ("cudnn_causal", "cudnn_document_mask", "pallas_segment_ids", "pallas_causal")
BACKWARD_OVER_FORWARD = 2.5  # FLOPs of the backward over the forward's
CHECK_BOUND = 2e-2  # bf16 kernel against the float32 reference, relative RMS


log = measurement.log


def document_ids(batch, length, mean_document, seed):
  """([B, T] int32 segment ids, the document lengths): rows packed with lognormal lengths of mean `mean_document`."""
  rng = np.random.default_rng(seed)
  sigma = 1.0
  ids = np.zeros((batch, length), np.int32)
  lengths = []
  for row in range(batch):
    start = 0
    while start < length:
      size = min(max(1, round(rng.lognormal(np.log(mean_document) - sigma**2 / 2, sigma))), length - start)
      ids[row, start : start + size] = len(lengths)
      lengths.append(size)
      start += size
  return ids, lengths


def forward_flops(lengths, heads, dim):
  """Causal + document forward FLOPs: q·kᵀ and p·v over each document's n(n+1)/2 visible pairs, per head."""
  return 4 * dim * heads * sum(n * (n + 1) // 2 for n in lengths)


def inputs(shape, mean_document, seed):
  batch, length, heads, dim = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  draw = lambda key: jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)  # noqa: E731
  ids, lengths = document_ids(batch, length, mean_document, seed)
  return (draw(keys[0]), draw(keys[1]), draw(keys[2]), jnp.asarray(ids), draw(keys[3])), lengths


def attention_fn(variant, config):
  """variant's attention(q, k, v, segment_ids) -> o."""

  def cudnn(q, k, v, segment_ids):
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")

  if variant == "cudnn_causal":
    return lambda q, k, v, segment_ids: cudnn(q, k, v, None)
  if variant == "cudnn_document_mask":
    return cudnn
  if variant == "pallas_segment_ids":
    return lambda q, k, v, segment_ids: flash_attention(q, k, v, segment_ids, config=config)
  return lambda q, k, v, segment_ids: flash_attention(q, k, v, config=config)


def gradient_fn(attention):
  """(q, k, v, segment_ids, d_out) -> (dq, dk, dv) of Σ o·d_out."""

  def loss(q, k, v, segment_ids, d_out):
    return jnp.sum(attention(q, k, v, segment_ids).astype(jnp.float32) * d_out.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


def time_jax(fn, args, reps, calls):
  """{"ms": median ms per call, "compile_s"}: compiled ahead, two warm-up calls, reps × (calls back-to-back calls,
  block_until_ready)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  jax.block_until_ready(compiled(*args))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = compiled(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / calls * 1e3)
  return {"ms": statistics.median(samples), "compile_s": compile_s}


def relative_rms_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.sqrt(np.mean((actual - expected) ** 2) / np.mean(expected**2)))


def check(args, config, heads):
  """Relative RMS errors of o, dq, dk, dv on the first `heads` heads: the Pallas kernel (and cuDNN with the mask)
  against the float32 XLA dense-mask attention on the same bf16 inputs."""
  q, k, v, segment_ids, d_out = (x[:, :, :heads] if x.ndim == 4 else x for x in args)

  def values(attention, *call_args):
    out = jax.jit(attention)(*call_args[:4])
    return (out, *jax.jit(gradient_fn(attention))(*call_args))

  full = lambda x: x.astype(jnp.float32)  # noqa: E731

  def reference(q, k, v, segment_ids):
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

  with jax.default_matmul_precision("highest"):  # full fp32 products, not the GPU's default TF32
    expected = values(reference, full(q), full(k), full(v), segment_ids, full(d_out))
  errors = {}
  for variant in ("pallas_segment_ids", "cudnn_document_mask"):
    actual = values(attention_fn(variant, config), q, k, v, segment_ids, d_out)
    errors[variant] = {name: relative_rms_error(a, e) for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected)}
  worst = max(errors["pallas_segment_ids"].values())
  return {"heads": heads, "errors": errors, "worst": worst, "bound": CHECK_BOUND, "ok": worst <= CHECK_BOUND}


def _fmt(x, digits=3):
  return "—" if x is None else f"{x:.{digits}f}"


def write_markdown(path, record):
  lines = [
    f"# Softmax attention over packed documents on {record['device']}",
    "",
    f"Date: {record['date']}, commit {record['commit']}, jax {record['jax_version']}. Command: "
    f"`{record['command']}`. Pallas kernels: {record['config']}.",
    "",
    "bf16, documents of lognormal lengths (mean "
    f"{record['mean_document']} tokens, seed {record['seed']}). ms = median per call; TFLOP/s with the causal + "
    "document FLOPs for every variant (cudnn_causal attends across documents: its figure is the useful "
    "throughput). × mask: cudnn_document_mask's ms over the variant's (> 1: faster than today's LLaMA path).",
    "",
    "| B×T×H×D | documents | variant | fwd ms | fwd TFLOP/s | × mask fwd | fwd+bwd ms | fwd+bwd TFLOP/s "
    "| × mask fwd+bwd | compile fwd s | compile fwd+bwd s |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in record["results"]:
    lines.append(
      f"| {row['shape']} | {row['documents']} | {row['variant']} | {_fmt(row['fwd'].get('ms'))} | "
      f"{_fmt(row['fwd'].get('tflops'), 1)} | {_fmt(row['fwd'].get('over_mask'), 2)} | "
      f"{_fmt(row['fwd_bwd'].get('ms'))} | {_fmt(row['fwd_bwd'].get('tflops'), 1)} | "
      f"{_fmt(row['fwd_bwd'].get('over_mask'), 2)} | {_fmt(row['fwd'].get('compile_s'), 1)} | "
      f"{_fmt(row['fwd_bwd'].get('compile_s'), 1)} |"
    )
  if record["checks"]:
    lines += [
      "",
      "Check: relative RMS error against XLA attention with the dense mask in float32 (same bf16 inputs, first "
      f"heads), bound {CHECK_BOUND:.0e} on the Pallas kernel's worst:",
      "",
      "| B×T×H×D | heads | variant | o | dq | dk | dv | ok |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for shape, entry in record["checks"].items():
      if "error" in entry:
        lines.append(f"| {shape} | — | failed: {entry['error']} | | | | | |")
        continue
      for variant, errors in entry["errors"].items():
        ok = ("yes" if entry["ok"] else "NO") if variant == "pallas_segment_ids" else ""
        cells = " | ".join(f"{errors[name]:.1e}" for name in ("o", "dq", "dk", "dv"))
        lines.append(f"| {shape} | {entry['heads']} | {variant} | {cells} | {ok} |")
  if record["skipped"]:
    lines += ["", f"Not measured (--budget_s {record['budget_s']} spent): " + "; ".join(record["skipped"]) + "."]
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def save(out_dir, record):
  with open(os.path.join(out_dir, "attention_timing.json"), "w") as handle:
    json.dump(record, handle, indent=1)
  write_markdown(os.path.join(out_dir, "attention_timing.md"), record)


def parse_shapes(text):
  return measurement.parse_shapes(text, SHAPES)


def parse_config(items):
  """--config knob=value items -> {knob: int} of FlashConfig fields."""
  fields = {field.name for field in dataclasses.fields(FlashConfig)}
  overrides = {}
  for item in items:
    name, _, value = item.partition("=")
    if name not in fields or not value.isdigit():
      raise SystemExit(f"--config: {item!r}; valid: knob=int with knob one of {', '.join(sorted(fields))}.")
    overrides[name] = int(value)
  return overrides


def measure_shape(runner, shape, args, overrides):
  batch, length, heads, dim = shape
  label = "x".join(map(str, shape))
  call_args, lengths = inputs(shape, args.mean_document, args.seed)
  flops = forward_flops(lengths, heads, dim)
  config = dataclasses.replace(default_config(dim, jnp.bfloat16), **overrides)
  rows = {}
  for variant in args.variants:
    row = {"shape": label, "documents": len(lengths), "variant": variant, "forward_flops": flops}
    row["fwd"] = runner.measure(
      f"{variant} fwd {label}", lambda: time_jax(attention_fn(variant, config), call_args[:4], args.reps, args.calls)
    )
    row["fwd_bwd"] = runner.measure(
      f"{variant} fwd+bwd {label}",
      lambda: time_jax(gradient_fn(attention_fn(variant, config)), call_args, args.reps, args.calls),
    )
    row["fwd"], row["fwd_bwd"] = row["fwd"] or {}, row["fwd_bwd"] or {}
    for part, part_flops in (("fwd", flops), ("fwd_bwd", flops * (1 + BACKWARD_OVER_FORWARD))):
      if row[part].get("ms"):
        row[part]["tflops"] = part_flops / (row[part]["ms"] * 1e-3) / 1e12
    rows[variant] = row
    runner.record["results"].append(row)
  mask = rows.get("cudnn_document_mask")
  for row in rows.values():
    for part in ("fwd", "fwd_bwd"):
      if mask and mask[part].get("ms") and row[part].get("ms"):
        row[part]["over_mask"] = mask[part]["ms"] / row[part]["ms"]
  save(runner.out_dir, runner.record)
  return call_args, config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--shapes", default="0,1,2", help="indices into SHAPES or BxTxHxD shapes")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--mean_document", type=int, default=1000, help="mean document length in tokens")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--check_heads", type=int, default=2, help="heads in the error check (0: no check)")
  parser.add_argument(
    "--config", action="append", default=[], help="knob=value replacing a field of the kernels' default config"
  )
  parser.add_argument("--budget_s", type=float, default=360.0, help="start no measurement after this many seconds")
  args = parser.parse_args()
  args.variants = [name for name in args.variants.split(",") if name]
  unknown = [name for name in args.variants if name not in VARIANTS]
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}.")
  if jax.default_backend() != "gpu":
    raise SystemExit("attention_timing.py times GPU kernels (cuDNN, Pallas Triton): run it on a GPU host.")
  shapes = parse_shapes(args.shapes)
  overrides = parse_config(args.config)
  record = {
    **measurement.record_header("attention_timing.py"),
    "timing": f"median of {args.reps} x ({args.calls} calls, block_until_ready) after lower().compile()",
    "config": "default configuration"
    + ("" if not overrides else " with " + ", ".join(f"{k}={v}" for k, v in overrides.items())),
    "mean_document": args.mean_document,
    "seed": args.seed,
    "budget_s": args.budget_s,
    "results": [],
    "checks": {},
    "skipped": [],
  }
  log("device", record["device"], "jax", jax.__version__, "commit", record["commit"])
  os.makedirs(args.out, exist_ok=True)
  runner = measurement.Runner(
    record,
    args.out,
    save,
    _STARTED,
    args.budget_s,
    failed=lambda error: {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"},
  )
  for shape in shapes:
    call_args, config = measure_shape(runner, shape, args, overrides)
    if args.check_heads:
      label = "x".join(map(str, shape))
      result = runner.measure(f"check {label}", lambda: check(call_args, config, args.check_heads))
      if result is not None:
        record["checks"][label] = result
  save(args.out, record)
  log(open(os.path.join(args.out, "attention_timing.md")).read())


if __name__ == "__main__":
  main()
