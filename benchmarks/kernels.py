"""Linear-attention kernel benchmark on one GPU: our Pallas GPU ops against fla 0.6.0 and JAX cuDNN flash.

Runs on the H200 through the device tool. fla travels as wheels (see /work/.library/device/README.md):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/fla_core-0.6.0-*.whl \
      .whl/flash_linear_attention-0.6.0-*.whl && export PYTHONPATH=/tmp/site
  python3 benchmarks/kernels.py --out $OUT [--check] [--variants]

Ops (bf16, D=128 unless noted), each forward and forward+backward (grads of q, k, v and, for the HGRN2 gate,
the log-decay; the TNL decay is a fixed buffer, as in fla's g_gamma):
  tnl         ours: log_decay [H]           fla: chunk_simple_gla(g_gamma=...)
  hgrn2       ours: log_decay [B,T,H,Dk]    fla: chunk_gla(g=...)
  cosformer2  ours: no decay                fla: chunk_linear_attn(normalize=False)
plus our "xla" chunked backend and JAX cuDNN causal flash attention. JAX ops are timed as the median over
--reps repetitions of (--calls back-to-back calls, then block_until_ready) / --calls, after warm-up; torch
ops with triton.testing.do_bench (median, CUDA events). --check first compares the pallas_gpu backend with the
float64 recurrent reference on the GPU (outputs, final state and all gradients).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.linear_attention import api, gpu, testing  # noqa: E402

SHAPES = ((8, 2048, 16, 128), (2, 8192, 16, 128), (1, 32768, 16, 128))
OPS = ("tnl", "hgrn2", "cosformer2")
HBM_BYTES_PER_S = 4.3e12  # device-to-device copy measured on this H200 (KINDS.md)
FLA_NAMES = {"tnl": "chunk_simple_gla(g_gamma)", "hgrn2": "chunk_gla", "cosformer2": "chunk_linear_attn"}


def log(*parts):
  print(*parts, flush=True)


def forward_floor_ms(op, batch, time_, heads, dim):
  """Fused-kernel HBM floor of the forward (kernels.md §10): read q, k, v, write o (bf16), plus fp32 gates."""
  per_token_head = 2 * (4 * dim)
  if op == "hgrn2":
    per_token_head += 4 * dim
  total = batch * heads * (time_ * per_token_head + dim * dim * 4)
  return total / HBM_BYTES_PER_S * 1e3


def time_jax(fn, args, reps, calls):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / calls * 1e3)
  return statistics.median(samples)


def jax_inputs(op, batch, time_, heads, dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
  q = (normal(keys[0], (batch, time_, heads, dim)) * 0.1).astype(jnp.bfloat16)
  k = (normal(keys[1], (batch, time_, heads, dim)) * 0.1).astype(jnp.bfloat16)
  v = (normal(keys[2], (batch, time_, heads, dim)) * 0.1).astype(jnp.bfloat16)
  if op == "tnl":
    log_decay = -jnp.exp(jax.random.uniform(keys[3], (heads,), minval=-6.0, maxval=-1.0))
  elif op == "hgrn2":  # the peer benchmark's mild gate: logsigmoid(N(0,1) + 4)
    log_decay = jax.nn.log_sigmoid(normal(keys[3], (batch, time_, heads, dim)) + 4.0)
  else:
    log_decay = None
  d_out = normal(keys[4], (batch, time_, heads, dim)).astype(jnp.bfloat16)
  return q, k, v, log_decay, d_out


def jax_fns(op_fn, log_decay_is_learned):
  """(forward, forward+backward) jitted closures of op_fn(q, k, v, log_decay) -> o."""
  forward = jax.jit(op_fn)

  def loss(q, k, v, log_decay, d_out):
    return jnp.sum(op_fn(q, k, v, log_decay).astype(jnp.float32) * d_out.astype(jnp.float32))

  argnums = (0, 1, 2, 3) if log_decay_is_learned else (0, 1, 2)
  backward = jax.jit(jax.grad(loss, argnums=argnums))
  return forward, backward


def ours(chunk_size=None, **options):
  def op_fn(q, k, v, log_decay):
    return gpu.linear_attention_gpu(q, k, v, log_decay, None, None, chunk_size, **options)[0]
  return op_fn


def xla_chunked(q, k, v, log_decay):
  return api.linear_attention(q, k, v, log_decay, backend="xla")


def time_ours(op, shape, reps, calls, op_fn=None):
  q, k, v, log_decay, d_out = jax_inputs(op, *shape)
  forward, backward = jax_fns(op_fn or ours(), op == "hgrn2")
  fwd = time_jax(forward, (q, k, v, log_decay), reps, calls)
  fwd_bwd = time_jax(backward, (q, k, v, log_decay, d_out), reps, calls)
  return fwd, fwd_bwd


def time_cudnn(shape, reps, calls):
  q, k, v, _, d_out = jax_inputs("cosformer2", *shape)
  attention = lambda q, k, v, _: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  forward, backward = jax_fns(attention, False)
  return (time_jax(forward, (q, k, v, None), reps, calls),
          time_jax(backward, (q, k, v, None, d_out), reps, calls))


def time_fla(op, shape):
  import torch
  from triton.testing import do_bench
  from fla.ops.gla import chunk_gla
  from fla.ops.linear_attn import chunk_linear_attn
  from fla.ops.simple_gla import chunk_simple_gla
  batch, time_, heads, dim = shape
  torch.manual_seed(0)
  make = lambda: (torch.randn(batch, time_, heads, dim, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_()
  q, k, v = make(), make(), make()
  d_out = torch.randn(batch, time_, heads, dim, device="cuda", dtype=torch.bfloat16)
  if op == "tnl":
    g_gamma = -torch.exp(torch.empty(heads, device="cuda").uniform_(-6, -1))
    fn = lambda: chunk_simple_gla(q, k, v, g_gamma=g_gamma)[0]
  elif op == "hgrn2":
    gate = torch.nn.functional.logsigmoid(torch.randn(batch, time_, heads, dim, device="cuda") + 4)
    gate = gate.to(torch.float32).requires_grad_()
    fn = lambda: chunk_gla(q, k, v, gate)[0]
  else:
    fn = lambda: chunk_linear_attn(q, k, v, normalize=False)[0]

  def fn_bwd():
    fn().backward(d_out)

  return (do_bench(fn, warmup=25, rep=100, return_mode="median"),
          do_bench(fn_bwd, warmup=25, rep=100, return_mode="median"))


def _kernel_with_grads(q, k, v, log_decay, state, segment_ids, d_out, d_state):
  present = {name: x for name, x in dict(q=q, k=k, v=v, log_decay=log_decay, initial_state=state).items()
             if x is not None}

  @jax.jit
  def run(present, segment_ids, d_out, d_state):
    def op(present):
      merged = {"log_decay": None, **present}
      return gpu.linear_attention_gpu(merged["q"], merged["k"], merged["v"], merged["log_decay"],
                                      merged["initial_state"], segment_ids, None)

    (out, final_state), vjp = jax.vjp(op, present)
    return (out, final_state, *vjp((d_out.astype(out.dtype), d_state)))

  return run(present, segment_ids, d_out, d_state)


def check_against_reference():
  """pallas_gpu vs the float64 recurrent reference on the GPU: worst relative RMS error per mode and dtype."""
  worst = {}
  for mode, dim_k, dim_v, strength in (("scalar", 64, 128, "weak"), ("vector", 128, 64, "strong"),
                                       ("none", 256, 128, "weak")):
    for dtype, bound in ((jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)):
      q, k, v, log_decay, state, segments = testing.random_inputs(
          7, batch=2, time=300, heads=2, dim_k=dim_k, dim_v=dim_v, decay_mode=mode, strength=strength, dtype=dtype)
      rng = np.random.default_rng(3)
      # bf16-representable cotangents: the bf16 kernel sees exactly what the reference sees.
      d_out = jnp.asarray(rng.normal(size=v.shape), jnp.bfloat16).astype(jnp.float32)
      d_state = jnp.asarray(rng.normal(size=state.shape), jnp.float32)
      ref_out, ref_state, ref_grads = testing.reference_float64(q, k, v, log_decay, state, segments, d_out, d_state)
      out, final_state, grads = _kernel_with_grads(q, k, v, log_decay, state, segments, d_out, d_state)
      errors = {"o": testing.relative_rms_error(out, ref_out),
                "final_state": testing.relative_rms_error(final_state, ref_state)}
      errors.update({f"d{name}": testing.relative_rms_error(grads[name], ref_grads[name]) for name in ref_grads})
      name = f"{mode} Dk={dim_k} Dv={dim_v} {strength} {jnp.dtype(dtype).name}"
      worst[name] = {"max_error": max(errors.values()), "bound": bound, "errors": errors,
                     "ok": max(errors.values()) <= bound}
      log("check", name, "max rel RMS %.2e (bound %.0e)" % (max(errors.values()), bound),
          "OK" if worst[name]["ok"] else "FAIL", {k_: "%.1e" % e for k_, e in errors.items()})
  return worst


def write_markdown(path, record):
  lines = [f"# Linear-attention kernels on {record['device']}", "",
           f"Date: {record['date']}. jax {record['jax_version']}, fla {record.get('fla_version', '?')}. "
           f"Command: `{record['command']}`.", "",
           "bf16, D=128 (cosFormer2 timed at Dk=Dv=128 to match fla). ms = median; ratio = fla_ms / ours_ms "
           "(> 1: ours faster). Floor: fused forward HBM bytes at 4.3 TB/s.", "",
           "| op | B×T×H×D | ours fwd | fla fwd | ratio | ours fwd+bwd | fla fwd+bwd | ratio | fwd / floor |",
           "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x: "—" if x is None else f"{x:.3f}"
  for row in record["results"]:
    lines.append(f"| {row['op']} | {row['shape']} | {fmt(row['fwd']['ours_ms'])} | {fmt(row['fwd']['fla_ms'])} | "
                 f"{fmt(row['fwd']['ratio'])} | {fmt(row['fwd_bwd']['ours_ms'])} | {fmt(row['fwd_bwd']['fla_ms'])} | "
                 f"{fmt(row['fwd_bwd']['ratio'])} | {fmt(row['fwd_over_floor'])} |")
  if record.get("others"):
    lines += ["", "| other (JAX) | B×T×H×D | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
    for row in record["others"]:
      lines.append(f"| {row['name']} | {row['shape']} | {fmt(row['fwd_ms'])} | {fmt(row['fwd_bwd_ms'])} |")
  if record.get("variants"):
    lines += ["", "Kernel-configuration sweep (ours):", "", "| op | B×T×H×D | config | fwd ms | fwd+bwd ms |",
              "|---|---|---|---|---|"]
    for row in record["variants"]:
      lines.append(f"| {row['op']} | {row['shape']} | {row['config']} | {fmt(row['fwd_ms'])} | "
                   f"{fmt(row['fwd_bwd_ms'])} |")
  if record.get("check"):
    lines += ["", "Correctness on the device (pallas_gpu vs float64 recurrent reference, B=2 T=300 H=2, "
              "segment resets and initial state; worst relative RMS over o, final state and all gradients):", "",
              "| case | worst error | bound |", "|---|---|---|"]
    for name, entry in record["check"].items():
      lines.append(f"| {name} | {entry['max_error']:.2e} | {entry['bound']:.0e} |")
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def save(out_dir, record):
  with open(os.path.join(out_dir, "kernels_h200.json"), "w") as handle:
    json.dump(record, handle, indent=1)
  write_markdown(os.path.join(out_dir, "kernels_h200.md"), record)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--check", action="store_true", help="compare with the float64 reference first")
  parser.add_argument("--variants", default="", help="extra configs, e.g. 'c128w4,c64w8' (chunk, warps)")
  parser.add_argument("--skip_peers", action="store_true", help="time ours only")
  parser.add_argument("--ops", default=",".join(OPS), help="subset of " + ",".join(OPS))
  parser.add_argument("--shapes", default="0,1,2", help="indices into SHAPES")
  args = parser.parse_args()
  device = jax.devices()[0]
  record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": getattr(device, "device_kind", str(device)), "jax_version": jax.__version__,
            "python": platform.python_version(), "command": "python3 benchmarks/kernels.py " + " ".join(sys.argv[1:]),
            "timing": f"JAX: median of {args.reps} x ({args.calls} calls, block_until_ready); "
                      "torch: triton do_bench median", "results": [], "others": [], "variants": []}
  try:
    import fla
    record["fla_version"] = getattr(fla, "__version__", "?")
  except ImportError:
    record["fla_version"] = None
  log("device", record["device"], "jax", jax.__version__, "fla", record["fla_version"])
  if args.check:
    try:
      record["check"] = check_against_reference()
    except Exception:  # still time the kernels
      traceback.print_exc()
  os.makedirs(args.out, exist_ok=True)
  ops = [op for op in args.ops.split(",") if op]
  for shape in [SHAPES[int(i)] for i in args.shapes.split(",")]:
    label = "x".join(map(str, shape))
    for op in ops:
      row = {"op": op, "shape": label, "fla_op": FLA_NAMES[op]}
      try:
        ours_fwd, ours_fwd_bwd = time_ours(op, shape, args.reps, args.calls)
      except Exception:  # report and keep timing the rest
        traceback.print_exc()
        ours_fwd = ours_fwd_bwd = None
      fla_fwd = fla_fwd_bwd = None
      if not args.skip_peers and record["fla_version"] is not None:
        try:
          fla_fwd, fla_fwd_bwd = time_fla(op, shape)
        except Exception:
          traceback.print_exc()
      ratio = lambda peer, mine: None if peer is None or mine is None else peer / mine
      row["fwd"] = {"ours_ms": ours_fwd, "fla_ms": fla_fwd, "ratio": ratio(fla_fwd, ours_fwd)}
      row["fwd_bwd"] = {"ours_ms": ours_fwd_bwd, "fla_ms": fla_fwd_bwd, "ratio": ratio(fla_fwd_bwd, ours_fwd_bwd)}
      floor = forward_floor_ms(op, *shape)
      row["fwd_floor_ms"] = floor
      row["fwd_over_floor"] = None if ours_fwd is None else ours_fwd / floor
      record["results"].append(row)
      save(args.out, record)  # after every row, so a run cut short still leaves its numbers
      log(op, label, json.dumps({"fwd": row["fwd"], "fwd_bwd": row["fwd_bwd"], "floor": floor}))
    if not args.skip_peers:
      for name, timer in (("cudnn_flash_causal", lambda: time_cudnn(shape, args.reps, args.calls)),
                          ("xla_chunked_tnl", lambda: time_ours("tnl", shape, args.reps, args.calls, xla_chunked))):
        try:
          fwd, fwd_bwd = timer()
        except Exception:
          traceback.print_exc()
          fwd = fwd_bwd = None
        record["others"].append({"name": name, "shape": label, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd})
        log(name, label, fwd, fwd_bwd)
  for variant in filter(None, args.variants.split(",")):
    chunk, warps = (int(x) for x in variant[1:].split("w"))
    for op in ops:
      shape = SHAPES[-1]
      try:
        fwd, fwd_bwd = time_ours(op, shape, args.reps, args.calls, ours(chunk, num_warps=warps))
      except Exception:
        traceback.print_exc()
        fwd = fwd_bwd = None
      record["variants"].append({"op": op, "shape": "x".join(map(str, shape)), "config": variant,
                                 "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd})
      log("variant", variant, op, fwd, fwd_bwd)
  save(args.out, record)
  log(open(os.path.join(args.out, "kernels_h200.md")).read())


if __name__ == "__main__":
  main()
