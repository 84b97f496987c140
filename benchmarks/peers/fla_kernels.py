"""Kernel timings of the peers that benchmarks/kernel_timing.py compares against (its --reference_peers file).

At three shapes (bf16, D=128): fla's chunk_simple_gla (scalar per-head decay, TNL), chunk_gla (per-key-channel
decay, HGRN2-like gates logsigmoid(N(0, 1) + 4)) and chunk_linear_attn (no decay, cosFormer2), OpenNLPLab's
lightning_attn2, torch SDPA flash attention (causal), and in JAX cuDNN flash attention and a plain-XLA chunked
linear attention. Median ms of the forward and of forward+backward: triton's do_bench for torch, the median of 20
calls (each ended by block_until_ready) for JAX. A peer that fails to import or run is logged and left out.

On a GPU machine with jax[cuda], torch and the peers (pip install flash-linear-attention==0.6.0 fla-core==0.6.0
lightning-attn==0.0.5):
  python3 benchmarks/peers/fla_kernels.py --out benchmarks/peers/fla_kernels_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import traceback

from provenance import package_versions  # benchmarks/peers/, the script's own directory

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to torch as well

SHAPES = ((8, 2048, 16, 128), (2, 8192, 16, 128), (1, 32768, 16, 128))


def log(*parts):
  print(*parts, flush=True)


def jax_median_ms(function, *args, calls: int = 20) -> float:
  import jax

  jax.block_until_ready(function(*args))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2] * 1e3


def chunk_simple_gla_jax(q, k, v, log_decay, chunk: int = 64):
  """Chunked linear attention with a scalar log-decay per head in plain jnp (XLA only), on [B, T, H, D]."""
  import jax
  import jax.numpy as jnp

  batch, length, heads, dim = q.shape
  num_chunks = length // chunk
  qc, kc, vc = (x.reshape(batch, num_chunks, chunk, heads, dim) for x in (q, k, v))
  position = jnp.arange(chunk, dtype=jnp.float32)
  log_decay = log_decay.astype(jnp.float32)  # [H]
  decay_q = jnp.exp(log_decay[None, :] * (position[:, None] + 1))  # [C, H]
  decay_k = jnp.exp(log_decay[None, :] * (chunk - 1 - position[:, None]))  # [C, H]
  distance = position[:, None] - position[None, :]
  mask = jnp.where(distance[None] >= 0, jnp.exp(log_decay[:, None, None] * jnp.maximum(distance, 0)[None]), 0.0)
  scores = jnp.einsum("bnihd,bnjhd->bnhij", qc, kc, preferred_element_type=jnp.float32) * mask[None, None]
  intra = jnp.einsum("bnhij,bnjhd->bnihd", scores.astype(q.dtype), vc, preferred_element_type=jnp.float32)
  chunk_states = jnp.einsum(
    "bnjhd,bnjhe->bnhde", (kc * decay_k[None, None, :, :, None]).astype(q.dtype), vc, preferred_element_type=jnp.float32
  )
  chunk_decay = jnp.exp(log_decay * chunk)  # [H]

  def step(state, contribution):
    return state * chunk_decay[None, :, None, None] + contribution, state

  _, states = jax.lax.scan(step, jnp.zeros((batch, heads, dim, dim), jnp.float32), jnp.moveaxis(chunk_states, 1, 0))
  states = jnp.moveaxis(states, 0, 1)  # the state before each chunk, [B, n, H, D, D]
  inter = jnp.einsum(
    "bnihd,bnhde->bnihe",
    (qc * decay_q[None, None, :, :, None]).astype(q.dtype),
    states.astype(q.dtype),
    preferred_element_type=jnp.float32,
  )
  return (intra + inter).reshape(batch, length, heads, dim).astype(q.dtype)


def time_jax(results: dict) -> None:
  import jax
  import jax.numpy as jnp

  for shape in SHAPES:
    label = "x".join(map(str, shape))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(keys[i], shape, jnp.bfloat16) * 0.1 for i in range(3))
    log_decay = -jnp.exp(jax.random.uniform(keys[3], (shape[2],), minval=-6, maxval=-1))
    loss = lambda f: lambda q, k, v: f(q, k, v).astype(jnp.float32).sum()
    linear = lambda q, k, v: chunk_simple_gla_jax(q, k, v, log_decay)
    flash = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    for name, function in (("jax_xla_chunk_simple_gla", linear), ("jax_cudnn_flash", flash)):
      try:
        forward = jax_median_ms(jax.jit(function), q, k, v)
        both = jax_median_ms(jax.jit(jax.grad(loss(function), argnums=(0, 1, 2))), q, k, v)
      except Exception as error:
        log(name, label, "FAIL", repr(error)[:300])
        continue
      results[f"{name} {label}"] = (forward, both)
      log(name, label, f"fwd {forward:.3f} ms  fwd+bwd {both:.3f} ms")


def time_torch(results: dict) -> None:
  import torch
  from fla.ops.gla import chunk_gla
  from fla.ops.linear_attn import chunk_linear_attn
  from fla.ops.simple_gla import chunk_simple_gla
  from triton.testing import do_bench

  try:
    from lightning_attn.ops import lightning_attn_func
  except ImportError as error:
    lightning_attn_func = None
    log("lightning_attn not timed:", error)
  for shape in SHAPES:
    label = "x".join(map(str, shape))
    batch, length, heads, dim = shape
    torch.manual_seed(0)
    make = lambda: (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_()
    q, k, v = make(), make(), make()
    log_decay = -torch.exp(torch.empty(heads, device="cuda").uniform_(-6, -1))
    gates = torch.nn.functional.logsigmoid(torch.randn(*shape, device="cuda", dtype=torch.bfloat16) + 4)
    gates.requires_grad_()
    grad_out = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    cases = {
      "fla chunk_simple_gla (TNL decay)": lambda: chunk_simple_gla(q, k, v, g_gamma=log_decay)[0],
      "fla chunk_gla (HGRN2-like)": lambda: chunk_gla(q, k, v, gates)[0],
      "fla chunk_linear_attn (no decay)": lambda: chunk_linear_attn(q, k, v, normalize=False)[0],
      "torch sdpa flash (causal)": lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
      ),
    }
    if lightning_attn_func is not None:
      slopes = (-log_decay).reshape(heads, 1, 1).float()
      qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
      cases["lightning_attn2 (OpenNLPLab)"] = lambda: lightning_attn_func(qh, kh, vh, slopes)
    for name, function in cases.items():

      def forward_backward(function=function):
        out = function()
        out.backward(grad_out if out.shape == grad_out.shape else torch.ones_like(out))

      try:
        forward = do_bench(function, warmup=25, rep=100, return_mode="median")
        both = do_bench(forward_backward, warmup=25, rep=100, return_mode="median")
      except Exception as error:
        log(name, label, "FAIL", repr(error)[:300])
        continue
      results[f"{name} {label}"] = (forward, both)
      log(name, label, f"fwd {forward:.3f} ms  fwd+bwd {both:.3f} ms")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSON file to write")
  args = parser.parse_args(argv)
  results = {}
  for timer in (time_jax, time_torch):
    try:
      timer(results)
    except Exception:  # a missing framework leaves the other's timings
      traceback.print_exc()
  import jax

  record = {
    "provenance": {
      "script": "benchmarks/peers/fla_kernels.py",
      "command": f"python3 benchmarks/peers/fla_kernels.py --out {args.out}",
      "packages": package_versions("jax", "torch", "triton", "fla", "lightning_attn"),
      "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "units": "milliseconds, [forward, forward+backward], median",
    },
    "results": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  for name, (forward, both) in results.items():
    log(f"{name:70s} {forward:9.3f} {both:9.3f}")
  return record


if __name__ == "__main__":
  main()
