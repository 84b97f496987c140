r"""Ahead-of-time compile check: does a gin training configuration compile and fit on a TPU topology?

  python -m lsm_jax.aot --gin_file=gin/hgrn2_7b.gin --topology=v5p:4x4x4 [--gin.SEQ_LEN=2048 ...] \
      [--json_out=result.json] [--results=benchmarks/results/aot_tpu]

Runs on any host with libtpu installed (`pip install 'jax[tpu]'`; no TPU needed): the topology's devices come
from `jax.experimental.topologies.get_topology_desc`, the mesh is the gin MeshConfig over them, and the
trainer's own program (`trainer.build_train_program`, the same code `train()` runs) is lowered with abstract
inputs carrying the shardings and compiled by the TPU compiler. Prints the per-device memory analysis
(arguments, outputs, temporaries, generated code), XLA's FLOP count, the number of Mosaic kernels in the
program and whether it fits the chip's HBM. `--results` upserts the record into <path>.json and rewrites
<path>.md.

Gin: the same files as `lsm_jax.train`; the trainer.train bindings that shape the program are read (model
config, seq_len, global batch, microbatch, loss chunk, mesh, optimizer, seed); MODEL_DIR and DATA_DIR need not
be set.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform as host_platform
import shlex
import sys
import time
from typing import Sequence

from lsm_jax import errors

GIB = 1 << 30
# HBM per chip (one JAX device per chip; v4 and v5p run their two TensorCores as one megacore device).
# Matched as a case-insensitive substring of device_kind, first match wins: "TPU v5 lite" is v5e.
HBM_BYTES_BY_DEVICE_KIND: tuple[tuple[str, int], ...] = (
  ("tpu v6 lite", 32 * GIB),  # v6e (Trillium)
  ("tpu v5 lite", 16 * GIB),  # v5e
  ("tpu v5e", 16 * GIB),
  ("tpu v5p", 95 * GIB),
  ("tpu v5", 95 * GIB),  # v5p reports "TPU v5"
  ("tpu v4", 32 * GIB),
)
PROGRAM_ARGUMENTS = (
  "model_config",
  "train_steps",
  "seq_len",
  "global_batch_size",
  "optimizer",
  "per_shard_microbatch_size",
  "loss_chunk_length",
  "loss_logits_dtype",
  "seed",
  "compiler_options",
)
LIBTPU_MISSING = (
  "compiling for a TPU topology needs libtpu on this host (no TPU is needed): "
  "pip install 'jax[tpu]' (or the libtpu release matching jax {jax_version})"
)


class LibtpuMissingError(RuntimeError):
  pass


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_topology(topology_name: str):
  """The TopologyDescription of e.g. "v5p:4x4x4" or "v5e:2x2"; one clear error without libtpu."""
  import jax
  from jax.experimental import topologies

  if not libtpu_installed():
    raise LibtpuMissingError(LIBTPU_MISSING.format(jax_version=jax.__version__))
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  except Exception as error:  # libtpu reports bad names as a generic XlaRuntimeError
    raise ValueError(
      f"TPU topology {topology_name!r} is not known to libtpu ({error}); use "
      "<version>:<chips per axis>, e.g. v4:2x2x2, v5e:2x2, v5p:4x4x4, v6e:4x4"
    ) from error


def hbm_bytes(device_kind: str) -> int:
  kind = device_kind.lower()
  for pattern, size in HBM_BYTES_BY_DEVICE_KIND:
    if pattern in kind:
      return size
  raise ValueError(
    f"no HBM size known for device kind {device_kind!r}; known: {', '.join(p for p, _ in HBM_BYTES_BY_DEVICE_KIND)}"
  )


def program_arguments_from_gin() -> dict:
  """The trainer.train arguments that shape the program: gin's bindings, else train()'s defaults."""
  import gin

  from lsm_jax import trainer

  bindings = gin.get_bindings(trainer.train, resolve_references=True)
  defaults = inspect.signature(trainer.train).parameters
  arguments = {}
  for name in (*PROGRAM_ARGUMENTS, "mesh_config"):
    if name in bindings:
      arguments[name] = bindings[name]
    elif defaults[name].default is not inspect.Parameter.empty:
      arguments[name] = defaults[name].default
    else:
      raise ValueError(f"trainer.train.{name} is not bound in the gin files; the AOT check needs it")
  return arguments


def topology_mesh(mesh_config, devices):
  """The gin MeshConfig over the topology's devices, laid out for the physical ICI links."""
  import jax

  from lsm_jax import sharding

  devices = list(devices)
  if mesh_config.num_devices is not None:
    devices = devices[: mesh_config.num_devices]
  sizes = mesh_config.resolve(len(devices))
  return jax.make_mesh(
    tuple(sizes[axis] for axis in sharding.MESH_AXES),
    sharding.MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES),
    devices=devices,
  )


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def compile_for_topology(topology_name: str, arguments: dict) -> dict:
  """Builds, lowers and compiles the train step for `topology_name`; returns the measurements."""
  import jax

  from lsm_jax import metrics, trainer

  topology = tpu_topology(topology_name)
  mesh = topology_mesh(arguments["mesh_config"], topology.devices)
  program = trainer.build_train_program(mesh=mesh, **{name: arguments[name] for name in PROGRAM_ARGUMENTS})
  device_kind = mesh.devices.flat[0].device_kind
  start = time.perf_counter()
  lowered = program.lower_train_step()
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  capacity = hbm_bytes(device_kind)
  num_devices = mesh.devices.size
  model_config = program.model_config
  record = {
    "topology": topology_name,
    "device_kind": device_kind,
    "num_devices": int(num_devices),
    "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
    "host_default_backend": jax.default_backend(),
    "target_platform": program.platform,
    "arch": model_config.arch,
    "size": model_config.size,
    "layer_mixers": sorted(set(model_config.layer_mixers)),
    "num_params": program.num_params,
    "linear_attention_backend": model_config.linear_attention_backend,
    "attention_impl": model_config.attention_impl,
    "remat_policy": model_config.remat_policy,
    "seq_len": program.seq_len,
    "global_batch_size": program.global_batch_size,
    "num_microbatches": program.num_microbatches,
    "microbatch_size": program.microbatch_size,
    "loss_chunk_length": arguments["loss_chunk_length"],
    "loss_logits_dtype": arguments["loss_logits_dtype"],
    "lower_seconds": round(lower_seconds, 2),
    "hbm_bytes_per_device": capacity,
    "model_flops_per_device": program.flops_per_step_model / num_devices,
  }
  try:
    compiled = lowered.compile()
  except Exception as error:  # the compiler's out-of-memory verdict is a result: the step does not fit
    if not metrics.is_out_of_memory(error):
      raise
    return {
      **record,
      "fits": False,
      "compile_error": str(error).strip().splitlines()[0][:300],
      "compile_seconds": round(time.perf_counter() - start, 2),
    }
  compile_seconds = time.perf_counter() - start
  memory_bytes = metrics.compiled_memory_bytes(compiled)
  if memory_bytes is None:
    raise RuntimeError(f"the {device_kind} compiler reported no memory plan for {topology_name}")
  hlo_text = compiled.as_text()
  return {
    **record,
    "compile_seconds": round(compile_seconds, 2),
    # Mosaic kernels appear as tpu_custom_call; XLA's FLOP count does not see inside them.
    "mosaic_kernel_calls": hlo_text.count('custom_call_target="tpu_custom_call"'),
    "memory_bytes_per_device": memory_bytes,
    "fits": memory_bytes["total"] <= capacity,
    "xla_flops_per_device": _cost_flops(compiled),
  }


def _gib(value: float) -> str:
  return f"{value / GIB:.2f}"


def _mixer_kernels(record: dict) -> str:
  """The kernels of the record's token mixers: softmax attention's, the linear-attention op's, or both (hybrids).
  Records written before layer mixers were recorded have one mixer, their arch's."""
  mixers = record.get("layer_mixers") or [record["arch"]]
  kernels = [record["attention_impl"]] if "llama" in mixers else []
  if any(mixer != "llama" for mixer in mixers):
    kernels.append(record["linear_attention_backend"])
  return " + ".join(kernels)


def summary_text(record: dict) -> str:
  lines = [
    f"{record['arch']} {record['size']} ({record['num_params']:,} params) on {record['topology']} "
    f"({record['num_devices']} × {record['device_kind']}), mesh {record['mesh']}",
    f"  seq_len {record['seq_len']}, global batch {record['global_batch_size']} = {record['num_microbatches']} "
    f"microbatch(es) of {record['microbatch_size']}; linear attention {record['linear_attention_backend']}, "
    f"attention {record['attention_impl']}, remat {record['remat_policy']}",
  ]
  if "compile_error" in record:
    lines.append(f"  DOES NOT FIT: the compiler gave up after {record['compile_seconds']} s: {record['compile_error']}")
    return "\n".join(lines)
  memory = record["memory_bytes_per_device"]
  xla_flops = record["xla_flops_per_device"]
  lines += [
    f"  host jax.default_backend() = {record['host_default_backend']}, target platform = "
    f"{record['target_platform']}; Mosaic kernel calls in the compiled step: {record['mosaic_kernel_calls']}",
    f"  lowered in {record['lower_seconds']} s, compiled in {record['compile_seconds']} s",
    f"  memory per device (GiB): arguments {_gib(memory['argument'])}, outputs {_gib(memory['output'])} "
    f"(aliased {_gib(memory['alias'])}), temporaries {_gib(memory['temp'])}, generated code "
    f"{_gib(memory['generated_code'])}; total {_gib(memory['total'])} of {_gib(record['hbm_bytes_per_device'])} "
    f"HBM → {'fits' if record['fits'] else 'DOES NOT FIT'}",
    f"  FLOPs per device and step: XLA cost analysis "
    f"{'n/a' if xla_flops is None else f'{xla_flops:.4g}'}, model (Appendix A.1) "
    f"{record['model_flops_per_device']:.4g}",
  ]
  return "\n".join(lines)


def _markdown(records: list[dict]) -> str:
  lines = [
    "# Ahead-of-time TPU compile check (lsm_jax.aot)",
    "",
    "Each row: the trainer's own train step (`trainer.build_train_program`) lowered with abstract, sharded "
    "inputs and compiled by libtpu for a TPU topology from a CPU host (no TPU attached). Memory is XLA's "
    "per-device analysis of the compiled step; total = arguments + outputs − aliased (donated state) + "
    "temporaries + generated code, compared with the chip's HBM. XLA's FLOP count is far below the model's "
    "Appendix A.1 count: it counts a loop body once (the microbatch and layer scans) and sees nothing inside "
    "Mosaic kernels (custom calls), so only the model column is a per-step figure. Mixer kernels: the linear "
    "models' linear-attention backend, LLaMA's attention implementation. A row whose compile the TPU compiler "
    "refused for memory shows its message instead of a memory plan.",
    "",
    "| date (UTC) | command | model | topology | mesh | T × batch (microbatches) | mixer kernels | Mosaic calls "
    "| args GiB | out GiB | temp GiB | code GiB | total GiB | HBM GiB | fits | compile s | XLA TFLOP/dev | "
    "model TFLOP/dev |",
    "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
  ]
  for record in records:
    mesh = "×".join(f"{axis}{size}" for axis, size in record["mesh"].items() if size > 1) or "1"
    row = (
      f"| {record['date'][:16]} | `{record['command']}` | {record['arch']} {record['size']} | "
      f"{record['topology']} ({record['device_kind']}) | {mesh} | {record['seq_len']} × "
      f"{record['global_batch_size']} ({record['num_microbatches']}) | {_mixer_kernels(record)} | "
    )
    if "compile_error" in record:
      lines.append(
        row + f"| {record['compile_error']} | | | | | {_gib(record['hbm_bytes_per_device'])} | no | "
        f"{record['compile_seconds']} | | {record['model_flops_per_device'] / 1e12:.1f} |"
      )
      continue
    memory = record["memory_bytes_per_device"]
    xla_flops = record["xla_flops_per_device"]
    lines.append(
      row + f"{record['mosaic_kernel_calls']} | {_gib(memory['argument'])} | {_gib(memory['output'])} | "
      f"{_gib(memory['temp'])} | {_gib(memory['generated_code'])} | {_gib(memory['total'])} | "
      f"{_gib(record['hbm_bytes_per_device'])} | {'yes' if record['fits'] else 'no'} | "
      f"{record['compile_seconds']} | {'n/a' if xla_flops is None else f'{xla_flops / 1e12:.1f}'} | "
      f"{record['model_flops_per_device'] / 1e12:.1f} |"
    )
  machines = sorted({(record["machine"], record["versions"]) for record in records})
  lines += ["", "Machines: " + "; ".join(f"{machine} ({versions})" for machine, versions in machines) + "."]
  return "\n".join(lines) + "\n"


def write_results(results_path: str, record: dict) -> None:
  """Upserts `record` (keyed by its command) into <results_path>.json and rewrites <results_path>.md."""
  json_path = results_path + ".json"
  records = []
  if os.path.exists(json_path):
    with open(json_path, encoding="utf-8") as f:
      records = json.load(f)
  records = [existing for existing in records if existing["command"] != record["command"]] + [record]
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(records, f, indent=2)
    f.write("\n")
  with open(results_path + ".md", "w", encoding="utf-8") as f:
    f.write(_markdown(records))


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  from lsm_jax import train

  parser = argparse.ArgumentParser(prog="python -m lsm_jax.aot", description=__doc__.split("\n\n")[0])
  parser.add_argument("--gin_file", action="append", required=True, help="repeatable; later files win")
  parser.add_argument("--gin_bindings", action="append", default=[], help="e.g. 'SEQ_LEN = 2048'; repeatable")
  parser.add_argument("--gin_search_paths", default="", help="comma-separated extra gin directories")
  parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4, v5e:2x2, v6e:4x4")
  parser.add_argument("--json_out", help="also write the record to this JSON file")
  parser.add_argument("--results", help="upsert into <path>.json and rewrite <path>.md")
  return parser.parse_args(train.rewrite_gin_args(list(argv)))


def main(argv: Sequence[str]) -> dict:
  """Runs the check for the command line `argv` (without the program name); returns the record."""
  import jax

  from lsm_jax import train

  args = _parse_args(argv)
  # Before gin or any model work: without libtpu nothing else can succeed.
  if not libtpu_installed():
    raise LibtpuMissingError(LIBTPU_MISSING.format(jax_version=jax.__version__))
  # Not finalized: MODEL_DIR and DATA_DIR stay unset (REQUIRED), which only train() needs; everything else the
  # training CLI refuses is refused here too.
  search_paths = [path for path in args.gin_search_paths.split(",") if path]
  try:
    train.parse_gin(args.gin_file, args.gin_bindings, search_paths, finalize=False)
  except (ValueError, FileNotFoundError) as error:
    raise errors.UserError(str(error)) from error
  record = compile_for_topology(args.topology, program_arguments_from_gin())
  record.update(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    command="python -m lsm_jax.aot " + shlex.join(argv),
    machine=f"{host_platform.node()}: {host_platform.processor() or host_platform.machine()}, {os.cpu_count()} CPUs",
    versions=f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}",
    model_config=dataclasses.asdict(program_arguments_from_gin()["model_config"]),
  )
  print(summary_text(record), flush=True)
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)
  if args.results:
    write_results(args.results, record)
  return record


def run(argv: Sequence[str] | None = None) -> None:
  try:
    main(sys.argv[1:] if argv is None else argv)
  except (LibtpuMissingError, errors.UserError) as error:
    sys.exit(f"lsm_jax.aot: error: {error}")


if __name__ == "__main__":
  run()
