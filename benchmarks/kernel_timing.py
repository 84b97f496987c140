"""Linear-attention kernel benchmark on one GPU: our Pallas GPU ops against fla 0.6.0 and JAX cuDNN flash.

On a GPU host with jax[cuda] and, for the fla columns, fla (pip install flash-linear-attention==0.6.0
fla-core==0.6.0):
  python3 benchmarks/kernel_timing.py --out $OUT [--budget_s 240] [--chunk_sizes 64,128] [--check] \
      [--config num_warps=8 --config fused_forward=false ...]

Ops (bf16, D=128 unless noted), each forward and forward+backward (grads of q, k, v and, for the HGRN2 gate,
the log-decay; the TNL decay is a fixed buffer, as in fla's g_gamma):
  hgrn2              ours: log_decay [B,T,H,Dk]    fla: chunk_gla(g=...)
  tnl                ours: log_decay [H]           fla: chunk_simple_gla(g_gamma=...)
  cosformer2         ours: no decay                fla: chunk_linear_attn(normalize=False)
  gated_scalar       ours: log_decay [B,T,H]       fla: chunk_simple_gla(g=...)   (Mamba-2 / gated RetNet decay;
                     fla's Triton-version guard on its backward lifted for the timing: FLA_GUARD_NOTE)
  tnl_learned_decay  ours: log_decay [H], its gradient taken (a trainable TNL decay); no fla peer: its ratio
                     column compares with our fixed-decay tnl row at the same shape
plus, at every shape, our "xla" chunked backend (TNL) and JAX cuDNN causal flash attention, also with the
dense document mask our LLaMA passes it (segment ids; all one document here).
Order: our ops at every shape, then the JAX baselines, then fla in this process (--fla_shapes, not
--skip_fla_ops; elsewhere the --reference_peers timings, marked †).
JAX ops are compiled ahead (lower().compile(), timed and recorded as compile_s) and timed as the median over
--reps repetitions of (--calls back-to-back calls, then block_until_ready) / --calls, after warm-up; JAX
forward+backward is two calls as in a training step (ForwardThenBackward: forward with output and residuals,
then the backward from them), torch
ops with triton.testing.do_bench (median, CUDA events), fla's first call (Triton JIT + autotune) timed apart.
--chunk_sizes times our forward at each chunk size and reports the fastest (fwd+bwd uses the first size).
--config knob=value (repeatable) replaces one knob of our ops' default kernel configuration
(pallas_kernels/linear_attention/gpu/config.py, docs/tuning.md) in every measurement of ours.
--budget_s: no measurement starts once that many seconds have passed since start; JSON and markdown are
rewritten after every measurement, so a run cut short keeps what it measured. --check first compares the
pallas_gpu backend with the float64 recurrent reference on the GPU (outputs, final state and all gradients).
--accuracy compares ours and fla with the float64 recurrence on the same inputs (ACCURACY_SHAPE, bf16, packed
documents: our segment ids, fla's cu_seqlens), the errors of o and of every gradient side by side.
--shapes takes indices into SHAPES or explicit BxTxHxD shapes; a CPU smoke (kernels in interpret mode):
  python3 benchmarks/kernel_timing.py --out /tmp/kernels_smoke --shapes 1x64x2x16 --reps 1 --calls 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

_STARTED = time.monotonic()  # --budget_s counts from here, JAX start-up included

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.linear_attention import api, gpu, testing  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measurement  # noqa: E402  (benchmarks/measurement.py: the budgeted runner and --shapes)

SHAPES = ((8, 2048, 16, 128), (2, 8192, 16, 128), (1, 32768, 16, 128))
# Measurement order: HGRN2 (the slowest compile) first; tnl before tnl_learned_decay, which is compared with it.
OPS = ("hgrn2", "tnl", "cosformer2", "gated_scalar", "tnl_learned_decay")
OP_DECAY_MODES = {
  "hgrn2": "vector",
  "tnl": "scalar",
  "cosformer2": "none",
  "gated_scalar": "token",
  "tnl_learned_decay": "scalar",
}
LEARNED_DECAY_OPS = ("hgrn2", "gated_scalar", "tnl_learned_decay")  # ops whose fwd+bwd includes d log_decay
HBM_BYTES_PER_S = 4.3e12  # device-to-device copy bandwidth measured on the H200
FLA_NAMES = {
  "tnl": "chunk_simple_gla(g_gamma)",
  "hgrn2": "chunk_gla",
  "cosformer2": "chunk_linear_attn",
  "gated_scalar": "chunk_simple_gla(g)",
}
# Keys of the --reference_peers file's "results" (benchmarks/peers/fla_kernels.py: [fwd_ms, fwd_bwd_ms]).
REFERENCE_PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "fla_kernels_h200.json")
REFERENCE_PEER_NAMES = {
  "tnl": "chunk_simple_gla (TNL decay)",
  "hgrn2": "chunk_gla (HGRN2-like)",
  "cosformer2": "chunk_linear_attn (no decay)",
}


log = measurement.log


def forward_floor_ms(op, batch, time_, heads, dim):
  """HBM floor of the forward: the bytes a fused kernel must move (read q, k, v, write o in bf16, plus fp32 gates)."""
  per_token_head = 2 * (4 * dim)
  if op == "hgrn2":
    per_token_head += 4 * dim
  elif op == "gated_scalar":
    per_token_head += 4
  total = batch * heads * (time_ * per_token_head + dim * dim * 4)
  return total / HBM_BYTES_PER_S * 1e3


def compile_jax(fn, args):
  """(compiled executable, seconds spent in lower().compile())."""
  if isinstance(fn, ForwardThenBackward):
    return fn.compile(args)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_compiled(compiled, args, reps, calls):
  """Median ms per call of a compiled executable: reps × (calls back-to-back calls, block_until_ready), after
  warm-up."""
  jax.block_until_ready(compiled(*args))
  jax.block_until_ready(compiled(*args))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = compiled(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / calls * 1e3)
  return statistics.median(samples)


def time_jax(fn, args, reps, calls):
  """{"ms": median ms per call, "compile_s": lower+compile seconds} of a jitted fn."""
  compiled, compile_s = compile_jax(fn, args)
  return {"ms": time_compiled(compiled, args, reps, calls), "compile_s": compile_s}


def median_ms(fn, args, reps, calls):
  """Median ms per call of fn jitted (time_jax: compiled ahead, warmed up, reps × back-to-back calls)."""
  return time_jax(jax.jit(fn), args, reps, calls)["ms"]


def time_config_grid(variants, configs, make_fn, args, gigabytes, reps, calls):
  """Appends {"variant": "pallas_gpu", "config", "ms"} to `variants` for make_fn(config) of each config (a config
  the compiler refuses, for registers or shared memory, is logged and skipped), then every variant's GB/s from
  `gigabytes` of least traffic. Returns the fastest Pallas config's fields."""
  for config in configs:
    try:
      ms = median_ms(make_fn(config), args, reps, calls)
    except Exception as error:
      measurement.log(f"config {config}: {type(error).__name__}: {str(error)[:200]}")
      continue
    variants.append({"variant": "pallas_gpu", "config": vars(config), "ms": ms})
  for variant in variants:
    variant["gb_s"] = gigabytes / variant["ms"] * 1e3
  return min((v for v in variants if v["variant"] == "pallas_gpu"), key=lambda v: v["ms"])["config"]


def jax_inputs(op, batch, time_, heads, dim, seed=0, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
  q = (normal(keys[0], (batch, time_, heads, dim)) * 0.1).astype(dtype)
  k = (normal(keys[1], (batch, time_, heads, dim)) * 0.1).astype(dtype)
  v = (normal(keys[2], (batch, time_, heads, dim)) * 0.1).astype(dtype)
  if op in ("tnl", "tnl_learned_decay"):
    log_decay = -jnp.exp(jax.random.uniform(keys[3], (heads,), minval=-6.0, maxval=-1.0))
  elif op == "hgrn2":  # the peer benchmark's mild gate: logsigmoid(N(0,1) + 4)
    log_decay = jax.nn.log_sigmoid(normal(keys[3], (batch, time_, heads, dim)) + 4.0)
  elif op == "gated_scalar":  # the same gate, one per head and token
    log_decay = jax.nn.log_sigmoid(normal(keys[3], (batch, time_, heads)) + 4.0)
  else:
    log_decay = None
  d_out = normal(keys[4], (batch, time_, heads, dim)).astype(dtype)
  return q, k, v, log_decay, d_out


def gradient_fn(op_fn, log_decay_is_learned):
  """One jitted gradient of Σ o·do (sequence_parallel.py: one executable for its memory analysis)."""

  def loss(q, k, v, log_decay, d_out):
    return jnp.sum(op_fn(q, k, v, log_decay).astype(jnp.float32) * d_out.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if log_decay_is_learned else (0, 1, 2)))


class ForwardThenBackward:
  """Forward+backward as a training step (and torch's o.backward(do)) runs it: the jitted forward returns the
  output and the residuals, a second jitted call the gradients from them. From one jitted jax.grad XLA drops the
  unused output kernel, and with it the forward's state scan, which fla's o.backward(do) does run. Residuals that
  are the inputs themselves are not returned by the forward (a jit output aliasing an input is a device copy,
  163 µs of HGRN2's 8×2048 step on the H200, which neither a training step nor torch's saved tensors pay): the
  backward takes the inputs again."""

  def __init__(self, op_fn, log_decay_is_learned):
    self._structure = None  # (pullback treedef, per residual leaf: the input it is, or None), set when traced

    def forward(q, k, v, log_decay):
      inputs = (q, k, v, log_decay)
      if log_decay_is_learned:
        out, pullback = jax.vjp(op_fn, *inputs)
      else:
        out, pullback = jax.vjp(lambda q, k, v: op_fn(q, k, v, log_decay), q, k, v)
      leaves, treedef = jax.tree_util.tree_flatten(pullback)
      sources = tuple(next((i for i, x in enumerate(inputs) if leaf is x), None) for leaf in leaves)
      self._structure = treedef, sources
      return out, [leaf for leaf, source in zip(leaves, sources) if source is None]

    def backward(inputs, computed, d_out):
      treedef, sources = self._structure
      computed = iter(computed)
      leaves = [next(computed) if source is None else inputs[source] for source in sources]
      return jax.tree_util.tree_unflatten(treedef, leaves)(d_out)

    self.forward = jax.jit(forward)
    self.backward = jax.jit(backward)

  def __call__(self, q, k, v, log_decay, d_out):
    inputs = (q, k, v, log_decay)
    out, computed = self.forward(*inputs)
    return self.backward(inputs, computed, d_out.astype(out.dtype))

  def compile(self, args):
    """(a callable running both compiled calls, seconds spent compiling them)."""
    *inputs, d_out = args
    start = time.perf_counter()
    forward = self.forward.lower(*inputs).compile()
    seconds = time.perf_counter() - start
    out, computed = forward(*inputs)
    d_out = d_out.astype(out.dtype)
    start = time.perf_counter()
    backward = self.backward.lower(tuple(inputs), computed, d_out).compile()
    seconds += time.perf_counter() - start
    return (lambda *call_args: backward(tuple(call_args[:-1]), forward(*call_args[:-1])[1], d_out)), seconds


def ours(chunk_size=None, overrides=None):
  """Our pallas_gpu op with the default kernel configuration of its inputs, `overrides` (--config) replaced."""

  def op_fn(q, k, v, log_decay):
    config = None
    if overrides:
      config = dataclasses.replace(gpu.default_config(gpu.decay_mode(log_decay), q.shape, q.dtype), **overrides)
    return gpu.linear_attention_gpu(q, k, v, log_decay, None, None, chunk_size, config)[0]

  return op_fn


def xla_chunked(q, k, v, log_decay):
  return api.linear_attention(q, k, v, log_decay, backend="xla")


def ours_fns(op, shape, op_fn=None):
  """(forward fn, its args, forward+backward fn, its args) of our op (or op_fn) on the benchmark inputs."""
  q, k, v, log_decay, d_out = jax_inputs(op, *shape)
  op_fn = op_fn or ours()
  return (
    jax.jit(op_fn),
    (q, k, v, log_decay),
    ForwardThenBackward(op_fn, op in LEARNED_DECAY_OPS),
    (q, k, v, log_decay, d_out),
  )


def cudnn_fns(shape, document_mask=False):
  """cuDNN causal flash attention; document_mask: with the [B, 1, T, T] mask our LLaMA builds from segment ids
  (one document per row here), passed as the 4th argument so that it is formed at run time as in training."""
  q, k, v, _, d_out = jax_inputs("cosformer2", *shape)

  def attention(q, k, v, segment_ids):
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")

  segment_ids = jnp.ones(q.shape[:2], jnp.int32) if document_mask else None
  return (
    jax.jit(attention),
    (q, k, v, segment_ids),
    ForwardThenBackward(attention, False),
    (q, k, v, segment_ids, d_out),
  )


FLA_GUARD_NOTE = (
  "fla refuses its gated chunk_bwd_dqkwg on Hopper with Triton >= 3.4.0 and < 3.7.1 (fla issue #640: incorrect "
  "results); its guard is lifted for this timing, so fla's gated fwd+bwd times the same kernels with values unchecked"
)


def _allow_gated_backward_for_timing():
  """Lifts fla's Triton-version guard on the gated backward where it applies (FLA_GUARD_NOTE): the kernels launched
  are unchanged. Returns the note to record, or None where no guard stood in the way."""
  import fla.ops.common.chunk_o as chunk_o
  from fla.utils import env

  if env.TRITON_ABOVE_3_7_1:
    return None
  chunk_o.TRITON_ABOVE_3_7_1 = True
  return FLA_GUARD_NOTE


def fla_fns(op, shape):
  """(forward, forward+backward, note) of the fla op on random bf16 inputs of `shape`: closures of no arguments, and
  why its values are unchecked (or None)."""
  import torch
  from fla.ops.gla import chunk_gla
  from fla.ops.linear_attn import chunk_linear_attn
  from fla.ops.simple_gla import chunk_simple_gla

  batch, time_, heads, dim = shape
  note = None
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
  elif op == "gated_scalar":
    note = _allow_gated_backward_for_timing()
    gate = torch.nn.functional.logsigmoid(torch.randn(batch, time_, heads, device="cuda") + 4)
    gate = gate.to(torch.float32).requires_grad_()
    fn = lambda: chunk_simple_gla(q, k, v, g=gate)[0]
  else:
    fn = lambda: chunk_linear_attn(q, k, v, normalize=False)[0]

  def fn_bwd():
    fn().backward(d_out)

  return fn, fn_bwd, note


def time_fla(op, shape):
  """{"fwd"|"fwd_bwd": {"ms", "first_call_s"}, "note": why its values are unchecked, or None} of the fla op."""
  import torch
  from triton.testing import do_bench

  fn, fn_bwd, note = fla_fns(op, shape)
  results = {}
  for name, bench in (("fwd", fn), ("fwd_bwd", fn_bwd)):
    start = time.perf_counter()
    bench()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    results[name] = {"ms": do_bench(bench, warmup=25, rep=100, return_mode="median"), "first_call_s": first_call_s}
  results["note"] = note
  return results


ACCURACY_SHAPE = (1, 2048, 16, 128)  # one row of packed documents (fla's varlen form takes one row)
# A document starts at each token with this probability: short documents (16 tokens on average, testing's
# default) and long ones (512 on average).
SHORT_DOCUMENTS, LONG_DOCUMENTS = 0.06, 1 / 512
# op: the (testing.DECAY_RANGES strength, document start rate) cases it is checked at. HGRN2 at both strengths:
# its kernels take the diagonal blocks exactly where gates decay fast (strong) and by one matmul where they decay
# slowly (weak; GpuKernelConfig's diagonal_span_limit). Weak gates with long documents too: fla's varlen chunks
# restart at every document, so most short documents never pass through its stored (bf16-rounded) states, while
# ours (chunks aligned to the row) do wherever a document crosses a chunk boundary.
ACCURACY_OPS = {
  "hgrn2": (("strong", SHORT_DOCUMENTS), ("weak", SHORT_DOCUMENTS), ("weak", LONG_DOCUMENTS)),
  "gated_scalar": (("strong", SHORT_DOCUMENTS),),
  "tnl": (("weak", SHORT_DOCUMENTS),),
}


def accuracy_case(op, strength, document_start_rate):
  """The result key of one accuracy case: the op at its first case, else "op, strength gates" (and ", long
  documents")."""
  name = op if strength == ACCURACY_OPS[op][0][0] else f"{op}, {strength} gates"
  return name + (", long documents" if document_start_rate == LONG_DOCUMENTS else "")


def accuracy_inputs(op, shape, strength, document_start_rate, seed=11):
  """(q, k, v, log_decay, segment_ids, d_out) for --accuracy: bf16 q, k, v, fp32 decays of the op's mode and
  `strength`, documents as segment ids, a bf16-representable output cotangent (no initial state: fla's varlen form
  takes one per document)."""
  batch, time_, heads, dim = shape
  q, k, v, log_decay, _, segment_ids = testing.random_inputs(
    seed,
    batch=batch,
    time=time_,
    heads=heads,
    dim_k=dim,
    dim_v=dim,
    decay_mode=OP_DECAY_MODES[op],
    strength=strength,
    dtype=jnp.bfloat16,
    initial_state=False,
    document_start_rate=document_start_rate,
  )
  rng = np.random.default_rng(seed + 1)
  d_out = jnp.asarray(rng.normal(size=v.shape), jnp.bfloat16).astype(jnp.float32)
  return q, k, v, log_decay, segment_ids, d_out


def cu_seqlens(segment_ids):
  """fla's document offsets [0, starts..., T] of one row of segment ids (a document starts where the id changes)."""
  ids = np.asarray(segment_ids)
  if ids.ndim != 2 or ids.shape[0] != 1:
    raise ValueError(f"segment_ids of shape {ids.shape}; fla's varlen form takes one row, [1, T]")
  starts = np.flatnonzero(np.diff(ids[0]) != 0) + 1
  return np.concatenate([[0], starts, [ids.shape[1]]]).astype(np.int64)


def fla_with_grads(op, q, k, v, log_decay, segment_ids, d_out):
  """fla's o and gradients (q, k, v and the learned decay's) for --accuracy, as float32 numpy arrays."""
  import torch
  from fla.ops.gla import chunk_gla
  from fla.ops.simple_gla import chunk_simple_gla

  cuda = lambda x, dtype: torch.tensor(np.asarray(x, np.float32), device="cuda", dtype=dtype)
  leaves = {name: cuda(x, torch.bfloat16).requires_grad_() for name, x in dict(q=q, k=k, v=v).items()}
  offsets = torch.tensor(cu_seqlens(segment_ids), device="cuda")
  decay = cuda(log_decay, torch.float32)
  common = dict(scale=1.0, cu_seqlens=offsets)
  if op == "hgrn2":
    leaves["log_decay"] = decay.requires_grad_()
    out, _ = chunk_gla(leaves["q"], leaves["k"], leaves["v"], leaves["log_decay"], **common)
  elif op == "gated_scalar":
    _allow_gated_backward_for_timing()
    leaves["log_decay"] = decay.requires_grad_()
    out, _ = chunk_simple_gla(leaves["q"], leaves["k"], leaves["v"], g=leaves["log_decay"], **common)
  else:
    out, _ = chunk_simple_gla(leaves["q"], leaves["k"], leaves["v"], g_gamma=decay, **common)
  out.backward(cuda(d_out, torch.bfloat16))
  as_numpy = lambda x: x.detach().float().cpu().numpy()
  return as_numpy(out), {name: as_numpy(leaf.grad) for name, leaf in leaves.items()}


def accuracy_against_fla(ops=tuple(ACCURACY_OPS), shape=ACCURACY_SHAPE, overrides=None, with_fla=True):
  """{case (accuracy_case): {"ours"|"fla": {"o", "dq", ...: relative RMS error against the float64 recurrence}}}
  on the same inputs, each op at each of its ACCURACY_OPS cases; ours with the default kernel configuration, `overrides`
  (--config) replaced; fla's only `with_fla`."""
  results = {}
  for op, (strength, rate) in ((name, case) for name in ops for case in ACCURACY_OPS[name]):
    case = accuracy_case(op, strength, rate)
    q, k, v, log_decay, segment_ids, d_out = accuracy_inputs(op, shape, strength, rate)
    d_state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    ref_out, _, ref_grads = testing.reference_float64(q, k, v, log_decay, None, segment_ids, d_out, d_state)
    config = None
    if overrides:
      config = dataclasses.replace(gpu.default_config(gpu.decay_mode(log_decay), q.shape, q.dtype), **overrides)
    out, _, grads = _kernel_with_grads(q, k, v, log_decay, None, segment_ids, d_out, d_state, config)
    names = ("q", "k", "v", "log_decay") if op in LEARNED_DECAY_OPS else ("q", "k", "v")
    errors = lambda o, g: {
      "o": testing.relative_rms_error(o, ref_out),
      **{f"d{name}": testing.relative_rms_error(g[name], ref_grads[name]) for name in names},
    }
    results[case] = {"fla_op": FLA_NAMES[op], "ours": errors(out, grads)}
    try:
      if with_fla:
        results[case]["fla"] = errors(*fla_with_grads(op, q, k, v, log_decay, segment_ids, d_out))
    except Exception as error:  # fla refusing an op leaves ours reported
      results[case]["fla"] = {"error": f"{type(error).__name__}: {error}"}
    log("accuracy", case, results[case])
  return results


def _kernel_with_grads(q, k, v, log_decay, state, segment_ids, d_out, d_state, config=None):
  """pallas_gpu's (out, final state, {name: gradient}) for the loss testing.reference_float64 differentiates,
  with `config` (None: the default)."""
  inputs = (q, k, v, log_decay, state, segment_ids, d_out, d_state)
  fn = gpu.linear_attention_gpu if config is None else functools.partial(gpu.linear_attention_gpu, config=config)
  return testing.backend_with_grads(fn, None, *inputs)


def check_against_reference(modes=("scalar", "token", "vector", "none")):
  """pallas_gpu vs the float64 recurrent reference on the GPU: worst relative RMS error per mode and dtype."""
  worst = {}
  for mode, dim_k, dim_v, strength in (
    ("scalar", 64, 128, "weak"),
    ("token", 64, 128, "strong"),
    ("vector", 128, 64, "strong"),
    ("none", 256, 128, "weak"),
  ):
    if mode not in modes:
      continue
    for dtype, bound in ((jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)):
      if not gpu.fits_shared_memory(dtype, dim_k, dim_v):
        continue  # refused by the kernels ("auto" runs these on the XLA backend)
      q, k, v, log_decay, state, segments = testing.random_inputs(
        7, batch=2, time=300, heads=2, dim_k=dim_k, dim_v=dim_v, decay_mode=mode, strength=strength, dtype=dtype
      )
      rng = np.random.default_rng(3)
      # bf16-representable cotangents: the bf16 kernel sees exactly what the reference sees.
      d_out = jnp.asarray(rng.normal(size=v.shape), jnp.bfloat16).astype(jnp.float32)
      d_state = jnp.asarray(rng.normal(size=state.shape), jnp.float32)
      ref_out, ref_state, ref_grads = testing.reference_float64(q, k, v, log_decay, state, segments, d_out, d_state)
      out, final_state, grads = _kernel_with_grads(q, k, v, log_decay, state, segments, d_out, d_state)
      errors = {
        "o": testing.relative_rms_error(out, ref_out),
        "final_state": testing.relative_rms_error(final_state, ref_state),
      }
      errors.update({f"d{name}": testing.relative_rms_error(grads[name], ref_grads[name]) for name in ref_grads})
      name = f"{mode} Dk={dim_k} Dv={dim_v} {strength} {jnp.dtype(dtype).name}"
      worst[name] = {
        "max_error": max(errors.values()),
        "bound": bound,
        "errors": errors,
        "ok": max(errors.values()) <= bound,
      }
      log(
        "check",
        name,
        "max rel RMS %.2e (bound %.0e)" % (max(errors.values()), bound),
        "OK" if worst[name]["ok"] else "FAIL",
        {k_: "%.1e" % e for k_, e in errors.items()},
      )
  return worst


def _fmt(x, digits=3):
  return "—" if x is None else f"{x:.{digits}f}"


def _config_text(overrides):
  if not overrides:
    return "default configuration"
  return "default configuration with " + ", ".join(f"{name}={value}" for name, value in overrides.items())


def write_markdown(path, record):
  lines = [
    f"# Linear-attention kernels on {record['device']}",
    "",
    f"Date: {record['date']}. Commit {record.get('commit', 'not recorded')}. jax {record['jax_version']}, "
    f"fla {record.get('fla_version') or 'not installed'}. "
    f"Command: `{record['command']}`. Our kernels: {_config_text(record.get('config_overrides'))}.",
    "",
    "bf16, D=128 (cosFormer2 timed at Dk=Dv=128 to match fla). ms = median; ratio = fla_ms / ours_ms "
    "(> 1: ours faster). Floor: fused forward HBM bytes at 4.3 TB/s. Chunk: our chunk size (forward: the "
    "fastest of --chunk_sizes). Compile: seconds of our lower().compile(); fla 1st: seconds of fla's first "
    "call (Triton JIT and autotune). † fla not run in this process: its time from the reference "
    f"measurements {os.path.basename(record.get('reference_peers') or REFERENCE_PEERS)} in benchmarks/peers/ "
    "(same H200 model, fla 0.6.0, triton do_bench).",
    "",
    "| op | B×T×H×D | ours fwd | chunk | fla fwd | ratio | ours fwd+bwd | fla fwd+bwd | ratio | fwd / floor "
    "| compile fwd s | compile fwd+bwd s | fla 1st fwd s | fla 1st fwd+bwd s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in record["results"]:
    fwd, fwd_bwd = row["fwd"], row["fwd_bwd"]
    peer = lambda part: _fmt(part.get("fla_ms")) + ("†" if part.get("fla_source") == "reference" else "")
    lines.append(
      f"| {row['op']} | {row['shape']} | {_fmt(fwd.get('ours_ms'))} | {fwd.get('chunk') or '—'} | "
      f"{peer(fwd)} | {_fmt(fwd.get('ratio'))} | {_fmt(fwd_bwd.get('ours_ms'))} | "
      f"{peer(fwd_bwd)} | {_fmt(fwd_bwd.get('ratio'))} | {_fmt(row.get('fwd_over_floor'))} | "
      f"{_fmt(fwd.get('compile_s'), 1)} | {_fmt(fwd_bwd.get('compile_s'), 1)} | "
      f"{_fmt(fwd.get('fla_first_call_s'), 1)} | {_fmt(fwd_bwd.get('fla_first_call_s'), 1)} |"
    )
  for note in sorted({row["fla_note"] for row in record["results"] if row.get("fla_note")}):
    ops = dict.fromkeys(row["op"] for row in record["results"] if row.get("fla_note") == note)
    lines += ["", f"fla {', '.join(ops)}: {note}."]
  learned = [row for row in record["results"] if row["fwd_bwd"].get("over_fixed_decay")]
  if learned:
    lines += ["", "Trainable TNL decay: fwd+bwd with d log_decay over the fixed-decay tnl row at the same shape:", ""]
    lines += [f"- {row['shape']}: {row['fwd_bwd']['over_fixed_decay']:.2f}×" for row in learned]
  swept = [row for row in record["results"] if len(row["fwd"].get("by_chunk", {})) > 1]
  if swept:
    lines += [
      "",
      "Forward chunk-size sweep (ours):",
      "",
      "| op | B×T×H×D | chunk | fwd ms | compile s |",
      "|---|---|---|---|---|",
    ]
    for row in swept:
      for chunk, entry in row["fwd"]["by_chunk"].items():
        lines.append(
          f"| {row['op']} | {row['shape']} | {chunk} | {_fmt(entry['ms'])} | {_fmt(entry['compile_s'], 1)} |"
        )
  if record.get("others"):
    lines += [
      "",
      "| other (JAX) | B×T×H×D | fwd ms | fwd+bwd ms | compile fwd s | compile fwd+bwd s |",
      "|---|---|---|---|---|---|",
    ]
    for row in record["others"]:
      lines.append(
        f"| {row['name']} | {row['shape']} | {_fmt(row.get('fwd_ms'))} | {_fmt(row.get('fwd_bwd_ms'))} | "
        f"{_fmt(row.get('fwd_compile_s'), 1)} | {_fmt(row.get('fwd_bwd_compile_s'), 1)} |"
      )
  if record.get("check"):
    lines += [
      "",
      "Correctness on the device (pallas_gpu vs float64 recurrent reference, B=2 T=300 H=2, "
      "segment resets and initial state; worst relative RMS over o, final state and all gradients):",
      "",
      "| case | worst error | bound |",
      "|---|---|---|",
    ]
    for name, entry in record["check"].items():
      lines.append(f"| {name} | {entry['max_error']:.2e} | {entry['bound']:.0e} |")
  if record.get("accuracy"):
    shape = "×".join(map(str, ACCURACY_SHAPE))
    lines += [
      "",
      f"Accuracy against the float64 recurrence on the same inputs (B×T×H×D {shape}, bf16 q, k, v and output "
      "cotangent, fp32 per-step log-decays −exp(U(log lo, log hi)), strong (lo, hi) = "
      f"{testing.DECAY_RANGES['strong']} and weak {testing.DECAY_RANGES['weak']}, HGRN2 and the [B,T,H] decay "
      "strong unless named, TNL weak; packed documents: our segment ids, fla's cu_seqlens; relative RMS error):",
      "",
      "| op | kernel | o | dq | dk | dv | d log_decay |",
      "|---|---|---|---|---|---|---|",
    ]
    for op, entry in record["accuracy"].items():
      for who, label in (("ours", "ours"), ("fla", f"fla {entry['fla_op']}")):
        errors = entry[who]
        if "error" in errors:
          lines.append(f"| {op} | {label} | failed: {errors['error'][:200]} | | | | |")
          continue
        cells = " | ".join(
          f"{errors[name]:.2e}" if name in errors else "—" for name in ("o", "dq", "dk", "dv", "dlog_decay")
        )
        lines.append(f"| {op} | {label} | {cells} |")
  if record.get("skipped"):
    lines += ["", f"Not measured (--budget_s {record['budget_s']} spent): " + "; ".join(record["skipped"]) + "."]
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")


def save(out_dir, record):
  """Writes <out_dir>/<name>.{json,md}, name: the record's (--name), kernels_h200 by default."""
  name = record.get("name", "kernels_h200")
  with open(os.path.join(out_dir, name + ".json"), "w") as handle:
    json.dump(record, handle, indent=1)
  write_markdown(os.path.join(out_dir, name + ".md"), record)


class Runner(measurement.Runner):
  """measurement.Runner saving this script's files, with the --reference_peers timings at hand."""

  def __init__(self, record, out_dir, budget_s, reference_peers):
    super().__init__(record, out_dir, save, _STARTED, budget_s)
    self.reference_peers = reference_peers


def measure_op(runner, op, shape, args, chunk_sizes, overrides):
  label = "x".join(map(str, shape))
  default = overrides.get("chunk_size") or gpu.default_config(OP_DECAY_MODES[op], shape, jnp.bfloat16).chunk_size
  chunk_sizes = [chunk or default for chunk in chunk_sizes]
  row = {
    "op": op,
    "shape": label,
    "fla_op": FLA_NAMES.get(op),
    "fwd": {"by_chunk": {}},
    "fwd_bwd": {"chunk": chunk_sizes[0]},
    "fwd_floor_ms": forward_floor_ms(op, *shape),
  }
  runner.record["results"].append(row)
  for chunk in chunk_sizes:
    forward, forward_args, _, _ = ours_fns(op, shape, ours(chunk, overrides))
    result = runner.measure(
      f"ours {op} {label} fwd chunk={chunk}", lambda: time_jax(forward, forward_args, args.reps, args.calls)
    )
    if result is not None:
      row["fwd"]["by_chunk"][str(chunk)] = result
  if row["fwd"]["by_chunk"]:
    chunk, best = min(row["fwd"]["by_chunk"].items(), key=lambda item: item[1]["ms"])
    row["fwd"].update(ours_ms=best["ms"], chunk=int(chunk), compile_s=best["compile_s"])
    row["fwd_over_floor"] = best["ms"] / row["fwd_floor_ms"]
  _, _, backward, backward_args = ours_fns(op, shape, ours(chunk_sizes[0], overrides))
  result = runner.measure(
    f"ours {op} {label} fwd+bwd chunk={chunk_sizes[0]}",
    lambda: time_jax(backward, backward_args, args.reps, args.calls),
  )
  if result is not None:
    row["fwd_bwd"].update(ours_ms=result["ms"], compile_s=result["compile_s"])
  apply_reference_peer(runner, row)
  save(runner.out_dir, runner.record)
  return row


def apply_reference_peer(runner, row):
  """fla's timing from --reference_peers (marked "reference", shown †) where that file has the row's op and shape."""
  if row["op"] not in REFERENCE_PEER_NAMES:
    return
  reference = runner.reference_peers.get(f"fla {REFERENCE_PEER_NAMES[row['op']]} {row['shape']}")
  for index, part in enumerate(("fwd", "fwd_bwd")):
    if reference is not None:
      row[part].update(fla_ms=reference[index], fla_source="reference")
  _set_ratios(row)


def measure_fla(runner, row, op, shape):
  """fla in this process for a row of ours, replacing a reference timing."""
  result = runner.measure(f"fla {FLA_NAMES[op]} {row['shape']} fwd, fwd+bwd", lambda: time_fla(op, shape))
  if result is not None:
    for part in ("fwd", "fwd_bwd"):
      row[part].pop("fla_source", None)
      row[part].update(fla_ms=result[part]["ms"], fla_first_call_s=result[part]["first_call_s"])
    if result["note"]:
      row["fla_note"] = result["note"]
  _set_ratios(row)
  save(runner.out_dir, runner.record)


def _set_ratios(row):
  for part in ("fwd", "fwd_bwd"):
    mine, peer = row[part].get("ours_ms"), row[part].get("fla_ms")
    row[part]["ratio"] = None if mine is None or peer is None else peer / mine


def measure_baseline(runner, name, shape, args):
  label = "x".join(map(str, shape))
  if name.startswith("cudnn_flash_causal"):
    fns = cudnn_fns(shape, document_mask=name == "cudnn_flash_causal_document_mask")
  else:
    fns = ours_fns("tnl", shape, xla_chunked)
  forward, forward_args, backward, backward_args = fns
  row = {"name": name, "shape": label}
  runner.record["others"].append(row)
  for part, fn, fn_args in (("fwd", forward, forward_args), ("fwd_bwd", backward, backward_args)):
    result = runner.measure(f"{name} {label} {part}", lambda: time_jax(fn, fn_args, args.reps, args.calls))
    if result is not None:
      row[f"{part}_ms"], row[f"{part}_compile_s"] = result["ms"], result["compile_s"]
  save(runner.out_dir, runner.record)


def parse_config(assignments):
  """--config KNOB=VALUE assignments as GpuKernelConfig overrides, checked against every op's default config."""
  try:
    overrides = gpu.parse_overrides(assignments)
    for mode in OP_DECAY_MODES.values():
      dataclasses.replace(gpu.default_config(mode, SHAPES[0], jnp.bfloat16), **overrides)
  except (TypeError, ValueError) as error:
    raise SystemExit(f"--config: {error}") from None
  return overrides


def parse_shapes(text):
  return measurement.parse_shapes(text, SHAPES)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--name", default="kernels_h200", help="result files: <out>/<name>.{json,md}")
  parser.add_argument("--reps", type=int, default=20)
  # Each sample pays its first call's host dispatch once; 20 calls amortise it, as fla's do_bench (CUDA events)
  # does not pay it.
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--check", action="store_true", help="compare with the float64 reference first")
  parser.add_argument(
    "--accuracy",
    action="store_true",
    help="compare ours and fla with the float64 recurrence on the same inputs (" + ", ".join(ACCURACY_OPS) + ")",
  )
  parser.add_argument(
    "--config",
    action="append",
    default=[],
    metavar="KNOB=VALUE",
    help="replace one knob of our ops' default kernel configuration (repeatable): "
    + ", ".join(field.name for field in dataclasses.fields(gpu.GpuKernelConfig)),
  )
  parser.add_argument("--skip_peers", action="store_true", help="time ours only (no fla, no JAX baselines)")
  parser.add_argument("--skip_baselines", action="store_true", help="no JAX baselines (cuDNN attention, xla op)")
  parser.add_argument("--ops", default=",".join(OPS), help="subset of " + ",".join(OPS))
  parser.add_argument(
    "--skip_fla_ops",
    default="",
    help="ops timed without their fla peer, e.g. hgrn2 (chunk_gla's first-call autotuning took over 200 s on the H200)",
  )
  parser.add_argument("--shapes", default="0,1,2", help="indices into SHAPES or BxTxHxD shapes")
  parser.add_argument(
    "--fla_shapes",
    default="",
    help="shapes at which fla runs here (default: all); its first-call autotuning takes 26-200 s per op and shape",
  )
  parser.add_argument(
    "--chunk_sizes",
    default="",
    help="our forward's chunk sizes to try, e.g. 64,128 (fwd+bwd uses the first); default: the op's default chunk",
  )
  parser.add_argument(
    "--reference_peers",
    default=REFERENCE_PEERS,
    help="fla timings shown (marked †) where fla was not run here; '' for none",
  )
  parser.add_argument(
    "--budget_s", type=float, default=None, help="start no measurement after this many seconds from start-up"
  )
  args = parser.parse_args()
  ops = [op for op in args.ops.split(",") if op]
  unknown = [op for op in ops if op not in OPS]
  if unknown:
    raise SystemExit(f"--ops: unknown {unknown}; valid: {', '.join(OPS)}.")
  ops = sorted(ops, key=OPS.index)
  shapes = parse_shapes(args.shapes)
  chunk_sizes = [int(x) for x in args.chunk_sizes.split(",") if x] or [None]
  overrides = parse_config(args.config)
  device = jax.devices()[0]
  record = {
    "name": args.name,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": getattr(device, "device_kind", str(device)),
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "commit": measurement.current_commit(),
    "command": "python3 benchmarks/kernel_timing.py " + " ".join(sys.argv[1:]),
    "timing": f"JAX: median of {args.reps} x ({args.calls} calls, block_until_ready) after lower().compile(); "
    "torch: triton do_bench median",
    "budget_s": args.budget_s,
    "config_overrides": overrides,
    "results": [],
    "others": [],
    "skipped": [],
  }
  try:
    import fla

    record["fla_version"] = getattr(fla, "__version__", "?")
  except ImportError:
    record["fla_version"] = None
  log("device", record["device"], "jax", jax.__version__, "fla", record["fla_version"])
  os.makedirs(args.out, exist_ok=True)
  reference_peers = {}
  if args.reference_peers:
    with open(args.reference_peers) as handle:
      reference_peers = json.load(handle)["results"]
    record["reference_peers"] = os.path.relpath(args.reference_peers)
  runner = Runner(record, args.out, args.budget_s, reference_peers)
  if args.check:
    record["check"] = runner.measure("check against the float64 reference", check_against_reference)
  if args.accuracy:
    record["accuracy"] = {}
    for op in ops:  # one op at a time: fla's first-call autotuning per op can outlast a run, the ops before it stay
      if op in ACCURACY_OPS:
        measured = lambda: accuracy_against_fla([op], overrides=overrides, with_fla=not args.skip_peers)
        result = runner.measure(f"accuracy of ours and fla, {op}", measured)
        record["accuracy"].update(result or {})  # None: it raised (reported) or the budget was spent
        save(args.out, record)  # before the next op's fla autotuning, which may outlast the run
  rows = {(op, shape): measure_op(runner, op, shape, args, chunk_sizes, overrides) for op in ops for shape in shapes}
  for shape in shapes:
    learned, fixed = rows.get(("tnl_learned_decay", shape)), rows.get(("tnl", shape))
    if learned and fixed and learned["fwd_bwd"].get("ours_ms") and fixed["fwd_bwd"].get("ours_ms"):
      learned["fwd_bwd"]["over_fixed_decay"] = learned["fwd_bwd"]["ours_ms"] / fixed["fwd_bwd"]["ours_ms"]
  if not (args.skip_peers or args.skip_baselines):
    for shape in shapes:
      for name in ("cudnn_flash_causal", "cudnn_flash_causal_document_mask", "xla_chunked_tnl"):
        measure_baseline(runner, name, shape, args)
  # fla last: its first-call Triton autotuning (26 s to over 200 s per op and shape) never starves our rows.
  skip_fla = set(filter(None, args.skip_fla_ops.split(",")))
  fla_shapes = parse_shapes(args.fla_shapes) if args.fla_shapes else shapes
  if not args.skip_peers and record["fla_version"] is not None:
    for op in ops:
      for shape in shapes:
        if op in FLA_NAMES and op not in skip_fla and shape in fla_shapes:
          measure_fla(runner, rows[op, shape], op, shape)
  save(args.out, record)
  log(open(os.path.join(args.out, args.name + ".md")).read())


if __name__ == "__main__":
  main()
