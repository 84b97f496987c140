r"""Training-step benchmark: the trainer's own program (`trainer.build_train_program`) on the available devices.

For each architecture × size × sequence length at a fixed number of tokens per step (default 32,768, the peers'
setting), bf16 compute with fp32 parameters and AdamW: compile time (separately), step time (median of --steps
after --warmup of the intervals between step completions, the host running one step ahead as the trainer's loop
does; `synced_step_s` also records each step alone, dispatched and waited for), tokens/s, MFU (Appendix A.1
model FLOPs from `lsm_jax.flops.flops_per_step(..., ffn_dim=, vocab_size=)` over the lsm_jax.metrics peak) and
peak device memory (`device.memory_stats()['peak_bytes_in_use']`, where the backend reports it; the peak is
process-wide, so it never decreases from row to row: run one shape per process for exact per-shape peaks). Batches
are synthetic (random tokens, one document per row). Rows are appended to
benchmarks/results/train_step_<device>.json and the .md table is rewritten after every row, so a run cut off by
a time limit keeps what it measured. Failures (e.g. out of memory) become rows with an error.

On a GPU host (jax[cuda]), then the PyTorch peers of benchmarks/peers/ at the same shapes and tokens per step:
  python3 benchmarks/train_step.py --out_dir $OUT                       # 4 archs × 410M, 1B × 2K, 8K, 32K
  python3 benchmarks/train_step.py --out_dir $OUT --archs hgrn2,llama --sizes 1b --seq_lens 8192 \
      --remat_policy dots_saveable --per_device_microbatch 2
  python3 benchmarks/train_step.py --out_dir $OUT --archs hgrn2_hybrid,hgrn2,tnl_hybrid,tnl,llama --sizes 1b \
      --seq_lens 8192,32768                                              # 7:1 hybrids beside the pure rows
  python3 benchmarks/train_step.py --out_dir $OUT --archs tnl --sizes 1b --seq_lens 8192 \
      --gpu_overrides fused_forward_states=true,packed_operands=true    # GPU kernel knobs (docs/tuning.md)
  python3 benchmarks/train_step.py --out_dir $OUT --archs tnl --sizes 1b --seq_lens 8192 \
      --compiler_options xla_gpu_enable_cublaslt=true                   # XLA options (trainer.train.compiler_options)
  python3 benchmarks/peers/torch_models.py --out benchmarks/peers/torch_models_h200.json   # fla HGRN2, HF LLaMA
  python3 benchmarks/peers/torch_models.py --out benchmarks/peers/torch_models_h200_retnet.json --models retnet
The markdown's "peer" columns are read from --peers (comma-separated files, default the two above; the peer of
hgrn2 is fla's HGRN2, of tnl fla's RetNet, of llama HF's LLaMA), labelled with each file's provenance; rows match
by (arch, size, seq_len). Every row records the date and commit it was measured at ($LSM_JAX_COMMIT, else git
describe), so a table assembled with --append from several runs says which row comes from which.

CPU check (tiny shapes, known to run here):
  python benchmarks/train_step.py --archs hgrn2,llama --sizes tiny --seq_lens 128 --tokens_per_step 1024 \
      --steps 2 --warmup 1 --out_dir /tmp/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peak memory then reflects the program
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lsm_jax import losses, metrics, optim, sharding, trainer  # noqa: E402
from lsm_jax.models import configs  # noqa: E402
from pallas_kernels import cross_entropy, glu, rms_norm  # noqa: E402
from pallas_kernels.linear_attention import gpu  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measurement  # noqa: E402  (benchmarks/measurement.py: the commit measured)
import profile_kernels  # noqa: E402  (benchmarks/profile_kernels.py: trace → device time per kernel)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PATH = ",".join(
  os.path.join(REPO_ROOT, "benchmarks", "peers", name)
  for name in ("torch_models_h200.json", "torch_models_h200_retnet.json")
)
# "tiny": a CPU-sized shape with 128-wide heads, for checking that the script runs.
PROFILE_TOP = 30  # kernels listed per profiled row
TINY_SHAPE = dict(num_layers=2, d_model=256, num_heads=2, ffn_dim=512, vocab_size=1024)


def model_config(
  arch: str,
  size: str,
  remat_policy: str,
  scan_layers: bool = True,
  unroll_layers: bool = False,
  gpu_overrides=(),
  fused_mlp: bool | None = None,
  norm_backend: str | None = None,
  glu_backend: str | None = None,
) -> configs.ModelConfig:
  """The model file's configuration of (arch, size) with these settings; fused_mlp, norm_backend and glu_backend
  None keep the file's."""
  settings = dict(
    remat_policy=remat_policy,
    scan_layers=scan_layers,
    unroll_layers=unroll_layers,
    linear_attention_gpu_overrides=gpu_overrides,
  )
  if fused_mlp is not None:
    settings["fused_mlp"] = fused_mlp
  if norm_backend is not None:
    settings["norm_backend"] = norm_backend
  if glu_backend is not None:
    settings["glu_backend"] = glu_backend
  if size == "tiny":
    # The family's gin settings (a hybrid's layer pattern) at the tiny shape; hybrids get the four layers their
    # pattern needs to hold a softmax layer.
    shape = {**TINY_SHAPE, "num_layers": 4} if arch in configs.HYBRID_ARCHS else TINY_SHAPE
    return dataclasses.replace(configs.get_config(arch, "70m", **settings, **shape), size="tiny")
  return configs.get_config(arch, size, **settings)


def packed_documents(rng, shape, mean_document: int):
  """(segment_ids, positions) [B, T] of rows packed with documents of lognormal lengths (sigma 1, mean
  `mean_document` tokens; the last one cut at the row's end); mean_document 0: one document per row."""
  if not mean_document:
    return np.ones(shape, np.int32), np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
  segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  for row in range(shape[0]):
    start, document = 0, 1
    while start < shape[1]:
      length = max(1, int(rng.lognormal(np.log(mean_document) - 0.5, 1.0)))
      end = min(shape[1], start + length)
      segment_ids[row, start:end] = document
      positions[row, start:end] = np.arange(end - start)
      start, document = end, document + 1
  return segment_ids, positions


def synthetic_batch(program: trainer.TrainProgram, seed: int, mean_document: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  shape = (program.global_batch_size, program.seq_len)
  tokens = rng.integers(0, program.model_config.vocab_size, size=(shape[0], shape[1] + 1), dtype=np.int32)
  segment_ids, positions = packed_documents(rng, shape, mean_document)
  host = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": segment_ids,
    "positions": positions,
    "loss_mask": np.ones(shape, np.float32),
  }
  return {key: jax.device_put(value, program.batch_sharding) for key, value in host.items()}


LOSS_CHUNK_LENGTH = 1024  # positions per loss chunk, as gin/runs/pretrain.gin trains
LOSS_LOGITS_DTYPE = "bfloat16"  # the training loss's logits, as gin/runs/pretrain.gin trains
GPU_NORM_BACKEND = rms_norm.resolve_backend("auto", "gpu")  # what ModelConfig.norm_backend "auto" runs on a GPU
GPU_GLU_BACKEND = glu.resolve_backend("auto", "gpu")  # what ModelConfig.glu_backend "auto" runs on a GPU
# what the loss's softmax gradient runs on a GPU
GPU_SOFTMAX_GRADIENT_BACKEND = cross_entropy.resolve_backend("auto", "gpu", cross_entropy.api.GPU_GRADIENT_DEFAULT)


def peak_memory_bytes(devices) -> int | None:
  peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in devices]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


def _layers_label(row) -> str:
  """The remat column's suffix: how the layers and the GLU run and any GPU kernel overrides."""
  label = ""
  if not row.get("scan_layers", True):
    label = ", unrolled layers"
  elif row.get("unroll_layers"):
    label = ", stacked layers unrolled"
  if row.get("fused_mlp"):
    label += ", fused mlp"
  norm_backend = row.get("norm_backend", "xla")  # rows without one were measured with XLA's norms
  if row.get("arch") != "llama" and norm_backend != GPU_NORM_BACKEND:
    label += f", {norm_backend} norms"
  glu_backend = row.get("glu_backend", "xla")  # rows without one were measured with XLA's autodiff
  if row.get("fused_mlp") and glu_backend != GPU_GLU_BACKEND:
    label += f", {glu_backend} GLU gradient"
  softmax_gradient_backend = row.get("softmax_gradient_backend", "xla")  # likewise, XLA's fusion
  if softmax_gradient_backend != GPU_SOFTMAX_GRADIENT_BACKEND:
    label += f", {softmax_gradient_backend} softmax gradient"
  if row.get("loss_chunk_length") not in (None, LOSS_CHUNK_LENGTH):
    label += f", loss chunks of {row['loss_chunk_length']}"
  logits_dtype = row.get("loss_logits_dtype", "float32")  # rows without one were measured with fp32 logits
  if logits_dtype != LOSS_LOGITS_DTYPE:
    label += f", {logits_dtype} logits"
  overrides = row.get("linear_attention_gpu_overrides")
  if overrides:
    label += ", kernels: " + " ".join(f"{knob}={str(value).lower()}" for knob, value in overrides.items())
  if row.get("compiler_options"):
    label += ", XLA: " + " ".join(f"{name}={str(value).lower()}" for name, value in row["compiler_options"].items())
  return label


def parse_compiler_options(text: str) -> dict:
  """'name=value,...' as {name: value}: true/false as bools, integers and decimals as numbers, else the string."""
  options = {}
  for item in filter(None, text.split(",")):
    name, separator, value = item.partition("=")
    if not separator or not name:
      raise ValueError(f"--compiler_options item {item!r} is not name=value")
    if value.lower() in ("true", "false"):
      options[name] = value.lower() == "true"
    else:
      try:
        options[name] = int(value)
      except ValueError:
        try:
          options[name] = float(value)
        except ValueError:
          options[name] = value
  return options


def cli_spec(arch, size, seq_len, args, mesh) -> dict:
  """What one row trains, from the command-line grid."""
  global_batch = args.tokens_per_step // seq_len
  per_shard_microbatch = args.per_device_microbatch
  if per_shard_microbatch is not None and per_shard_microbatch * sharding.batch_shards(mesh) >= global_batch:
    per_shard_microbatch = None  # the whole batch already fits in one microbatch
  return dict(
    model_config=model_config(
      arch,
      size,
      args.remat_policy,
      not args.unrolled_layers,
      args.unroll_stacked_layers,
      gpu.parse_overrides(filter(None, args.gpu_overrides.split(","))),
      args.fused_mlp,
      args.norm_backend,
      args.glu_backend,
    ),
    mesh=mesh,
    seq_len=seq_len,
    global_batch_size=global_batch,
    per_shard_microbatch_size=per_shard_microbatch,
    loss_chunk_length=args.loss_chunk_length if args.loss_chunk_length < seq_len else None,
    loss_logits_dtype=args.loss_logits_dtype,
    optimizer=optim.OptimizerConfig(warmup_steps=10),
    compiler_options=parse_compiler_options(args.compiler_options),
  )


def gin_spec(gin_files, bindings) -> dict:
  """What one row trains, from an experiment's gin files: the model, mesh, batch, microbatching, loss chunking
  and optimizer that `python -m lsm_jax.train` would use (data and run directory are not needed)."""
  import gin

  from lsm_jax import train as train_cli

  with gin.unlock_config():
    gin.clear_config()
    train_cli.parse_gin(gin_files, ["MODEL_DIR = '/tmp/unused'", "DATA_DIR = 'unused'", *bindings])
  bound = gin.get_bindings(trainer.train)
  missing = [name for name in ("model_config", "seq_len", "global_batch_size") if name not in bound]
  if missing:
    raise ValueError(f"--gin_file {gin_files}: trainer.train has no binding for {missing}")
  mesh = sharding.make_mesh(bound.get("mesh_config", sharding.MeshConfig()))
  return dict(
    model_config=bound["model_config"],
    mesh=mesh,
    seq_len=bound["seq_len"],
    global_batch_size=bound["global_batch_size"],
    train_steps=bound.get("train_steps", 1000),
    per_shard_microbatch_size=bound.get("per_shard_microbatch_size"),
    loss_chunk_length=bound.get("loss_chunk_length"),
    loss_logits_dtype=bound.get(
      "loss_logits_dtype", inspect.signature(trainer.train).parameters["loss_logits_dtype"].default
    ),
    optimizer=bound.get("optimizer", optim.OptimizerConfig()),
    compiler_options=bound.get("compiler_options"),
  )


def compile_spec(spec: dict) -> tuple[trainer.TrainProgram, jax.stages.Compiled, dict]:
  """The program of one row, its compiled step and the row's description (with XLA's memory plan)."""
  config, mesh, seq_len = spec["model_config"], spec["mesh"], spec["seq_len"]
  global_batch = spec["global_batch_size"]
  program = trainer.build_train_program(
    config,
    mesh=mesh,
    train_steps=spec.get("train_steps", 1000),
    seq_len=seq_len,
    global_batch_size=global_batch,
    optimizer=spec["optimizer"],
    per_shard_microbatch_size=spec["per_shard_microbatch_size"],
    loss_chunk_length=spec["loss_chunk_length"],
    loss_logits_dtype=spec["loss_logits_dtype"],
    compiler_options=spec.get("compiler_options"),
  )
  row = {
    "arch": config.arch,
    "size": config.size,
    "seq_len": seq_len,
    "global_batch_size": global_batch,
    "num_microbatches": program.num_microbatches,
    "num_params": program.num_params,
    "mesh": dict(mesh.shape),
    "remat_policy": config.remat_policy,
    "scan_layers": config.scan_layers,
    "unroll_layers": config.unroll_layers,
    "fused_mlp": config.fused_mlp,
    "norm_backend": program.model_config.norm_backend,
    "glu_backend": program.model_config.glu_backend,
    "linear_attention_backend": program.model_config.linear_attention_backend,
    "linear_attention_gpu_overrides": dict(config.linear_attention_gpu_overrides),
    "attention_impl": program.model_config.attention_impl,
    "loss_chunk_length": spec["loss_chunk_length"],
    "loss_logits_dtype": spec["loss_logits_dtype"],
    "softmax_gradient_backend": cross_entropy.resolve_backend(
      "auto", jax.default_backend(), cross_entropy.api.GPU_GRADIENT_DEFAULT
    ),
    "compiler_options": dict(spec.get("compiler_options") or {}),
  }
  start = time.perf_counter()
  compiled = program.lower_train_step().compile()
  row["compile_s"] = time.perf_counter() - start
  planned = metrics.compiled_memory_bytes(compiled)
  row["planned_gib"] = None if planned is None else planned["total"] / 2**30
  return program, compiled, row


def measure(spec: dict, args) -> dict:
  program, compiled, row = compile_spec(spec)
  return time_compiled(program, compiled, row, args)


def time_compiled(program: trainer.TrainProgram, compiled, row: dict, args) -> dict:
  """`row` completed with the step's median time, tokens/s, MFU, loss and the process's peak memory."""
  mesh, seq_len, global_batch = program.mesh, program.seq_len, program.global_batch_size
  state, rest = program.init()
  batch = synthetic_batch(program, seed=0, mean_document=args.mean_document)
  if args.mean_document:
    row["mean_document"] = args.mean_document
  # As the trainer's loop runs: the host dispatches step s + 1, then reads step s's metrics while s + 1 runs, so
  # the dispatch of a step overlaps the device's work on the one before. A step's time is the interval between
  # the completions of consecutive steps.
  completions = []
  state, unread = compiled(state, rest, batch)
  for _ in range(args.warmup + args.steps):
    state, step_metrics = compiled(state, rest, batch)
    jax.device_get(unread)
    completions.append(time.perf_counter())
    unread = step_metrics
  jax.device_get(unread)
  completions.append(time.perf_counter())
  times = np.diff(completions)[args.warmup :].tolist()
  # Each step alone (dispatched, then waited for): adds the host's dispatch latency to the device time.
  synced_times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, step_metrics = compiled(state, rest, batch)
    jax.block_until_ready((state, step_metrics))
    synced_times.append(time.perf_counter() - start)
  loss = float(step_metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"loss {loss}")
  if args.profile_steps:
    carried = [state]

    def next_step():  # the step donates its state: each call continues from the last
      carried[0], step_metrics = compiled(carried[0], rest, batch)
      return carried[0], step_metrics

    kernels, events = profile_kernels.profile(next_step, (), args.profile_steps)
    row["profile"] = {"events": events, "total_us": sum(k["us"] for k in kernels), "kernels": kernels[:PROFILE_TOP]}
    state = carried[0]
  step_s = statistics.median(times)
  devices = list(mesh.devices.flat)
  peak_flops = metrics.peak_flops_per_device(devices[0].device_kind, args.peak_flops_per_device)
  peak = peak_memory_bytes(devices)
  row.update(
    step_s=step_s,
    tokens_per_s=global_batch * seq_len / step_s,
    timing="run_ahead",
    synced_step_s=statistics.median(synced_times),
    mfu=program.flops_per_step_model / step_s / (peak_flops * len(devices)),
    model_flops_per_step=program.flops_per_step_model,
    loss=loss,
    peak_gib=None if peak is None else peak / 2**30,
  )
  return row


# The PyTorch peer of each architecture in the peers' files: TNL's is fla's RetNet (fixed decay per head).
PEER_MODELS = {"hgrn2": "hgrn2", "tnl": "retnet", "llama": "llama"}


def load_peers(paths: str) -> tuple[dict, str]:
  """{(arch, size, seq_len, timing): peer row} and a provenance label from comma-separated peer files (later files
  win). A row's timing is 'run_ahead' or 'synced' (rows that name none): a row is compared with its peer's row of
  the same timing."""
  table, labels = {}, []
  for path in filter(None, paths.split(",")):
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      peers = json.load(f)
    by_model = {(r["model"], r["size"], r["seq"], _timing(r)): r for r in peers.get("results", [])}
    for arch, model in PEER_MODELS.items():
      table.update(
        {(arch, size, seq, timing): row for (name, size, seq, timing), row in by_model.items() if name == model}
      )
    provenance = peers.get("provenance", {})
    packages = ", ".join(f"{name} {version}" for name, version in provenance.get("packages", {}).items())
    labels.append(
      f"{os.path.basename(path)} ({provenance.get('script', 'script unknown')}; {packages or 'versions unknown'}; "
      f"{provenance.get('device', 'device unknown')}; {provenance.get('date', 'date unknown')})"
    )
  return table, "; ".join(labels)


def _timing(row) -> str:
  return row.get("timing", "synced")


def _format(value, pattern):
  return "" if value is None else format(value, pattern)


def _mesh_label(mesh) -> str:
  return "" if not mesh else " ".join(f"{axis}{size}" for axis, size in mesh.items() if size > 1) or "1 device"


def write_markdown(path: str, header: dict, rows: list[dict], peers: dict, peer_label: str) -> None:
  lines = [
    f"# Training step on {header['device']}",
    "",
    f"Date of the first row: {header['date']}. {header['versions']}. "
    f"Command(s): {'; '.join(f'`{c}`' for c in header['commands'])}.",
    "",
    "Tokens per step = batch × T; bf16 compute, fp32 parameters and AdamW, synthetic batches. step = median "
    "after warm-up of: (run-ahead) the interval between consecutive steps' completions with the host dispatching "
    "step s + 1 before it reads step s's loss, as lsm_jax's trainer loop runs and for the peers the same loop "
    "(the loss read by .item()); (synced) one step from dispatch to completion, waited for before the next. "
    "MFU = Appendix A.1 FLOPs / (step time × peak × devices); peak memory = the largest "
    "per-device peak of the process so far.",
    *([header["note"]] if header.get("note") else []),
    f"Peer columns: PyTorch (fla HGRN2 for hgrn2, fla RetNet for tnl, HF LLaMA for llama) from {peer_label or 'n/a'}.",
    "",
    "| arch | size | T | measured (date, commit) | timing | batch (micro) | mesh | remat | compile s | step s "
    "| tokens/s | MFU | XLA plan GiB | peak GiB | peer tokens/s | ours / peer | peer peak GiB |",
    "|---|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    # Peers train one document per row: a row of packed documents has no peer.
    key = (row["arch"], row["size"], row["seq_len"], _timing(row))
    peer = {} if row.get("mean_document") else peers.get(key, {})
    timing = _timing(row).replace("_", "-")
    peer_tokens = _format(peer.get("tokens_per_s"), ",.0f") or ("error" if "error" in peer else "")
    measured = f"{row.get('date', header['date'])[:10]}, {row.get('commit') or 'commit unknown'}"
    if "error" in row:
      lines.append(
        f"| {row['arch']} | {row['size']} | {row['seq_len']} | {measured} | {timing} | | | "
        f"{row.get('remat_policy') or ''} | | | "
        f"error: {row['error'][:80]} | | | | {peer_tokens} | | {_format(peer.get('peak_gib'), '.1f')} |"
      )
      continue
    length = row["seq_len"]
    if row.get("mean_document"):
      length = f"{length}, documents of mean {row['mean_document']}"
    lines.append(
      f"| {row['arch']} | {row['size']} | {length} | {measured} | {timing} | {row['global_batch_size']} "
      f"({row['num_microbatches']}) | {_mesh_label(row.get('mesh'))} | {row['remat_policy']}"
      f"{_layers_label(row)} | "
      f"{row['compile_s']:.1f} | {row['step_s']:.4f} | "
      f"{row['tokens_per_s']:,.0f} | {100 * row['mfu']:.1f}% | "
      f"{_format(row.get('planned_gib'), '.1f')} | "
      f"{_format(row['peak_gib'], '.1f')} | {peer_tokens} | "
      f"{_format(row['tokens_per_s'] / peer['tokens_per_s'] if peer.get('tokens_per_s') else None, '.2f')} | "
      f"{_format(peer.get('peak_gib'), '.1f')} |"
    )
  for row in rows:
    if "profile" in row:
      profile = row["profile"]
      lines += [
        "",
        f"## Profile: {row['arch']} {row['size']} T={row['seq_len']} ({row['remat_policy']}{_layers_label(row)})",
        "",
        f"Device time per step by kernel ({profile['events']} events; {profile['total_us'] / 1e3:.1f} ms "
        f"in all; the {len(profile['kernels'])} longest):",
        "",
        "| kernel | launches | ms | share |",
        "|---|---:|---:|---:|",
      ]
      lines += [
        f"| {k['kernel'][:70]} | {k['launches']:g} | {k['us'] / 1e3:.2f} | {k['us'] / profile['total_us']:.1%} |"
        for k in profile["kernels"]
      ]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _error_row(arch, size, seq_len, error, remat_policy=None) -> dict:
  return {
    "arch": arch,
    "size": size,
    "seq_len": seq_len,
    "remat_policy": remat_policy,
    "error": f"{type(error).__name__}: {error}"[:500],
  }


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--archs", default=",".join(configs.ARCHS))
  parser.add_argument("--sizes", default="410m,1b", help="comma-separated sizes, or 'tiny' (CPU check)")
  parser.add_argument("--seq_lens", default="2048,8192,32768")
  parser.add_argument("--tokens_per_step", type=int, default=32768)
  parser.add_argument(
    "--mean_document",
    type=int,
    default=0,
    help="pack each row with documents of lognormal lengths of this mean (tokens); 0: one document per row",
  )
  parser.add_argument("--remat_policy", default="none", choices=configs.REMAT_POLICIES)
  parser.add_argument(
    "--remat_fallbacks",
    default="",
    help="remat policies to retry a shape with when it runs out of memory, e.g. dots_saveable,full",
  )
  parser.add_argument(
    "--per_device_microbatch",
    type=int,
    default=None,
    help="rows per batch shard per microbatch (gradient accumulation); default: one microbatch",
  )
  parser.add_argument("--loss_chunk_length", type=int, default=LOSS_CHUNK_LENGTH)
  parser.add_argument(
    "--loss_logits_dtype",
    default=LOSS_LOGITS_DTYPE,
    choices=losses.LOGITS_DTYPES,
    help="dtype of the training loss's logits (trainer.train.loss_logits_dtype)",
  )
  parser.add_argument(
    "--gpu_overrides",
    default="",
    help="GpuKernelConfig knobs of the linear-attention GPU kernels (ModelConfig.linear_attention_gpu_overrides), "
    "e.g. fused_forward_states=true,packed_operands=true",
  )
  parser.add_argument(
    "--compiler_options",
    default="",
    help="XLA options the step compiles with (trainer.train.compiler_options), e.g. xla_gpu_enable_cublaslt=true",
  )
  parser.add_argument(
    "--gin_file",
    action="append",
    default=[],
    help="measure one experiment file instead of the grid (e.g. gin/hgrn2_7b.gin); repeatable",
  )
  parser.add_argument("--gin", action="append", default=[], help="gin binding for --gin_file, e.g. GLOBAL_BATCH_SIZE=8")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--budget_s", type=float, default=None, help="start no new row after this many seconds (a time-limited job)"
  )
  parser.add_argument(
    "--unrolled_layers",
    action="store_true",
    help="compile every layer (scan_layers=False) instead of one scanned layer",
  )
  parser.add_argument(
    "--unroll_stacked_layers",
    action="store_true",
    help="stacked layers applied one by one (ModelConfig.unroll_layers) instead of by lax.scan",
  )
  parser.add_argument(
    "--fused_mlp",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="the GLU's up and gate projections as one matmul or not (ModelConfig.fused_mlp); default: the model file's",
  )
  parser.add_argument(
    "--norm_backend",
    choices=configs.NORM_BACKENDS,
    default=None,
    help="the linear architectures' residual RMS norms (ModelConfig.norm_backend); default: the model file's",
  )
  parser.add_argument(
    "--glu_backend",
    choices=configs.GLU_BACKENDS,
    default=None,
    help="the fused GLU's product gradient (ModelConfig.glu_backend); default: the model file's",
  )
  parser.add_argument(
    "--profile_steps",
    type=int,
    default=0,
    help="after timing, trace this many steps and list the longest kernels (per step)",
  )
  parser.add_argument("--peak_flops_per_device", type=float, default=None)
  parser.add_argument("--peers", default=PEERS_PATH)
  parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
  parser.add_argument("--name", default=None, help="results file stem (default train_step_<device>)")
  parser.add_argument(
    "--append", action="store_true", help="add rows to an existing results file (one process per row gives exact peaks)"
  )
  parser.add_argument(
    "--render",
    default=None,
    metavar="JSON",
    help="only rewrite the markdown of an existing results file (e.g. with --peers)",
  )
  args = parser.parse_args(argv)
  peers, peer_label = load_peers(args.peers)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      results = json.load(f)
    write_markdown(os.path.splitext(args.render)[0] + ".md", results, results["rows"], peers, peer_label)
    return results["rows"]

  device = jax.devices()[0]
  os.makedirs(args.out_dir, exist_ok=True)
  base = os.path.join(args.out_dir, args.name or f"train_step_{measurement.device_name()}")
  command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
  header = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": f"{jax.device_count()} × {device.device_kind}",
    "versions": f"jax {jax.__version__}, Python {platform.python_version()}",
    "commands": [command],
  }
  commit = measurement.current_commit()
  rows = []
  if args.append and os.path.exists(base + ".json"):
    with open(base + ".json", encoding="utf-8") as f:
      previous = json.load(f)
    rows = previous["rows"]
    header["date"] = previous["date"]
    header["commands"] = previous["commands"] + [command]
  if args.gin_file:
    jobs = [("gin", lambda: gin_spec(args.gin_file, args.gin), "", "", 0)]
  else:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
    jobs = [
      ("grid", functools.partial(cli_spec, arch, size, seq_len, args, mesh), arch, size, seq_len)
      for size in args.sizes.split(",")
      for seq_len in (int(t) for t in args.seq_lens.split(","))
      for arch in args.archs.split(",")
    ]
  started = time.perf_counter()
  for _, make_spec, arch, size, seq_len in jobs:
    if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
      print(f"--- budget of {args.budget_s:.0f} s spent; rows not started: from {arch} {size} {seq_len}", flush=True)
      break
    print(f"--- {arch or args.gin_file} {size} T={seq_len or ''}", flush=True)
    try:
      spec = make_spec()
    except Exception as error:
      traceback.print_exc()
      spec = None
      outcomes = [_error_row(arch, size, seq_len, error)]
    if spec is not None:
      arch, size, seq_len = spec["model_config"].arch, spec["model_config"].size, spec["seq_len"]
      outcomes = []
      # The configured remat policy first; a shape that runs out of memory is retried with the fallbacks.
      for policy in [None, *filter(None, args.remat_fallbacks.split(","))]:
        if policy is not None:
          spec["model_config"] = dataclasses.replace(spec["model_config"], remat_policy=policy)
        try:
          outcomes.append(measure(spec, args))
          break
        except Exception as error:  # one failing shape (e.g. out of memory) must not stop the table
          traceback.print_exc()
          outcomes.append(_error_row(arch, size, seq_len, error, spec["model_config"].remat_policy))
          if not metrics.is_out_of_memory(error):
            break
    for row in outcomes:
      row["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
      row["commit"] = commit
      if args.gin_file:
        row["gin_files"] = args.gin_file + [f"--gin={binding}" for binding in args.gin]
      print(json.dumps(row), flush=True)
      rows.append(row)
    with open(base + ".json", "w", encoding="utf-8") as f:
      json.dump({**header, "peers": peer_label, "rows": rows}, f, indent=2)
    write_markdown(base + ".md", header, rows, peers, peer_label)
  return rows


if __name__ == "__main__":
  main()
