"""The benchmark scripts' own logic: --config parsing and the per-kernel profile's trace reduction."""

import argparse
import datetime
import gzip
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import kernel_timing  # noqa: E402
import measurement  # noqa: E402
import profile_kernels  # noqa: E402


def test_parse_config():
  # --config KNOB=VALUE: converted to each knob's type, checked against the ops' default configurations.
  assert kernel_timing.parse_config([]) == {}
  assert kernel_timing.parse_config(
    ["num_warps=8", "fused_forward=false", "split_sub_chunks=True", "segment_programs=0"]
  ) == {"num_warps": 8, "fused_forward": False, "split_sub_chunks": True, "segment_programs": 0}
  with pytest.raises(SystemExit, match="unknown GpuKernelConfig knob 'warps'; valid: chunk_size, num_warps"):
    kernel_timing.parse_config(["warps=8"])
  with pytest.raises(SystemExit, match="num_warps=eight; valid: an integer"):
    kernel_timing.parse_config(["num_warps=eight"])
  with pytest.raises(SystemExit, match="fused_forward=yes; valid: true or false"):
    kernel_timing.parse_config(["fused_forward=yes"])
  with pytest.raises(SystemExit, match="num_warps=3; valid: one of"):
    kernel_timing.parse_config(["num_warps=3"])
  with pytest.raises(SystemExit, match="'num_warps'; valid: knob=value"):
    kernel_timing.parse_config(["num_warps"])


def test_config_overrides_reach_our_op():
  # The op kernel_timing.py times takes the default configuration of its inputs with the overrides replaced.
  import jax
  from jaxpr_tools import pallas_kernel_names

  q, k, v, log_decay, _ = kernel_timing.jax_inputs("tnl", 1, 64, 2, 16)
  launches = lambda op_fn: pallas_kernel_names(jax.make_jaxpr(op_fn)(q, k, v, log_decay).jaxpr)  # noqa: E731
  assert launches(kernel_timing.ours()) == ["linear_attention_fused_forward_states"]  # TNL's default
  assert launches(kernel_timing.ours(overrides=kernel_timing.parse_config(["fused_forward=false"]))) == [
    "linear_attention_state_scan",
    "linear_attention_output",
  ]


def _write_trace(directory, events):
  path = os.path.join(directory, "plugins", "profile", "run")
  os.makedirs(path)
  with gzip.open(os.path.join(path, "perfetto_trace.json.gz"), "wt") as handle:
    json.dump({"traceEvents": events}, handle)


def _metadata(kind, pid, name, tid=None):
  event = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
  if tid is not None:
    event["tid"] = tid
  return event


def test_device_kernel_times_sum_stream_events_only(tmp_path):
  # A GPU trace: kernels on two streams, the same kernels again on the device's "XLA Ops" line, host events.
  _write_trace(
    str(tmp_path),
    [
      _metadata("process_name", 1, "/host:CPU"),
      _metadata("process_name", 7, "/device:GPU:0"),
      _metadata("thread_name", 7, "Stream #13(Compute)", 13),
      _metadata("thread_name", 7, "Stream #14", 14),
      _metadata("thread_name", 7, "XLA Ops", 2),
      {"ph": "X", "name": "linear_attention_output", "pid": 7, "tid": 13, "dur": 10.0},
      {"ph": "X", "name": "linear_attention_output", "pid": 7, "tid": 14, "dur": 12.0},
      {"ph": "X", "name": "loop_add_fusion", "pid": 7, "tid": 13, "dur": 1.5},
      {"ph": "X", "name": "linear_attention_output", "pid": 7, "tid": 2, "dur": 22.0},
      {"ph": "X", "name": "PjitFunction(op)", "pid": 1, "tid": 5, "dur": 99.0},
    ],
  )
  durations, source = profile_kernels.device_kernel_us(str(tmp_path))
  assert source == "device"
  assert dict(durations) == {"linear_attention_output": [10.0, 12.0], "loop_add_fusion": [1.5]}


def test_host_only_trace_is_marked_host(tmp_path):
  _write_trace(
    str(tmp_path),
    [_metadata("process_name", 1, "/host:CPU"), {"ph": "X", "name": "while.5", "pid": 1, "tid": 3, "dur": 4.0}],
  )
  durations, source = profile_kernels.device_kernel_us(str(tmp_path))
  assert source == "host" and dict(durations) == {"while.5": [4.0]}


def test_forward_then_backward_gives_the_gradients_of_one_jitted_grad():
  # A stand-in op with a learned decay: the two-call path (forward with residuals, then backward) and its compiled
  # form return exactly the gradients of Σ o·do that one jitted grad returns.
  import jax
  import jax.numpy as jnp

  op = lambda q, k, v, log_decay: jnp.cumsum(q * k * jnp.exp(log_decay), axis=1) * v  # noqa: E731
  keys = jax.random.split(jax.random.key(0), 5)
  args = [jax.random.normal(key, (2, 8, 3, 4)) for key in keys]
  expected = kernel_timing.gradient_fn(op, True)(*args)
  two_calls = kernel_timing.ForwardThenBackward(op, True)
  compiled, seconds = kernel_timing.compile_jax(two_calls, args)
  assert seconds > 0
  for grads in (two_calls(*args), compiled(*args)):
    assert len(grads) == 4
    for got, want in zip(grads, expected):
      assert jnp.allclose(got, want, rtol=1e-6, atol=1e-6)
  fixed = kernel_timing.ForwardThenBackward(op, False)(*args)  # no decay gradient asked for: q, k, v only
  assert len(fixed) == 3 and jnp.allclose(fixed[2], expected[2], rtol=1e-6, atol=1e-6)
  # Residuals that are inputs (the op saves q, k and v) are not forward outputs: a jit output aliasing an
  # input would be a device copy, which a training step does not pay.
  _, sources = two_calls._structure
  assert {0, 1, 2} <= set(sources)
  _, computed = two_calls.forward(*args[:4])
  assert len(computed) == sources.count(None)


def test_train_step_table_states_each_rows_date_and_commit_and_its_peer(tmp_path):
  import train_step

  row = {
    "arch": "hgrn2",
    "size": "1b",
    "seq_len": 8192,
    "global_batch_size": 4,
    "num_microbatches": 1,
    "mesh": {"data": 1},
    "remat_policy": "full",
    "compile_s": 1.0,
    "step_s": 0.5,
    "tokens_per_s": 60000.0,
    "mfu": 0.4,
    "planned_gib": 50.0,
    "peak_gib": 51.0,
    "date": "2026-11-29T06:00:00+00:00",
    "commit": "abc1234",
  }
  header = {"device": "1 × GPU", "date": "2026-11-28T01:00:00+00:00", "versions": "jax", "commands": ["x"]}
  peers_file = tmp_path / "peers.json"
  peers_file.write_text(
    json.dumps(
      {
        "provenance": {
          "script": "benchmarks/peers/torch_models.py",
          "packages": {"fla": "0.6.0"},
          "device": "1x GPU",
          "date": "2026-11-27",
        },
        "results": [
          {"model": "hgrn2", "size": "1b", "seq": 8192, "tokens_per_s": 50000.0, "peak_gib": 99.0},
          {"model": "hgrn2", "size": "1b", "seq": 2048, "error": "OutOfMemoryError()"},
          {"model": "retnet", "size": "1b", "seq": 8192, "tokens_per_s": 40000.0, "peak_gib": 80.0},
          {"model": "retnet", "size": "1b", "seq": 8192, "tokens_per_s": 42000.0, "timing": "run_ahead"},
        ],
      }
    )
  )
  peers, label = train_step.load_peers(f"{peers_file},{tmp_path / 'absent.json'}")
  assert label == "peers.json (benchmarks/peers/torch_models.py; fla 0.6.0; 1x GPU; 2026-11-27)"
  # Each architecture meets its own peer: TNL fla's RetNet; no architecture takes another's.
  # A row meets the peer row timed the same way (rows that name no timing were timed synced).
  assert peers[("tnl", "1b", 8192, "synced")]["tokens_per_s"] == 40000.0
  assert peers[("tnl", "1b", 8192, "run_ahead")]["tokens_per_s"] == 42000.0
  assert ("llama", "1b", 8192, "synced") not in peers
  path = tmp_path / "table.md"
  older = {key: value for key, value in row.items() if key not in ("date", "commit")}
  run_ahead = dict(row, arch="tnl", timing="run_ahead", tokens_per_s=63000.0)
  train_step.write_markdown(str(path), header, [row, dict(older, seq_len=2048), run_ahead], peers, label)
  lines = path.read_text().splitlines()
  assert f"Peer columns: PyTorch (fla HGRN2 for hgrn2, fla RetNet for tnl, HF LLaMA for llama) from {label}." in lines
  measured = next(line for line in lines if line.startswith("| hgrn2 | 1b | 8192 "))
  assert measured.startswith("| hgrn2 | 1b | 8192 | 2026-11-29, abc1234 | synced | 4 (1) |")
  assert "| 60,000 | 40.0% |" in measured and "| 50,000 | 1.20 | 99.0 |" in measured
  tnl = next(line for line in lines if line.startswith("| tnl | 1b | 8192 "))
  assert "| run-ahead |" in tnl and "| 42,000 | 1.50 |" in tnl
  # A row without its own date and commit shows the file's date; a peer that failed shows its error, no ratio.
  assert next(line for line in lines if line.startswith("| hgrn2 | 1b | 2048 ")).startswith(
    "| hgrn2 | 1b | 2048 | 2026-11-28, commit unknown | synced |"
  )
  assert "| error |  |" in path.read_text()


def test_train_step_rows_take_and_state_gpu_kernel_overrides(tmp_path):
  # --gpu_overrides and --fused_mlp reach the model config of every row, and its row's remat column names them.
  import train_step

  args = argparse.Namespace(
    tokens_per_step=1024,
    per_device_microbatch=None,
    remat_policy="none",
    unrolled_layers=False,
    unroll_stacked_layers=True,
    loss_chunk_length=1024,
    loss_logits_dtype="float32",
    gpu_overrides="packed_operands=true,fused_forward_states=true",
    fused_mlp=True,
    norm_backend="pallas_gpu",
    glu_backend="pallas_gpu",
    compiler_options="",
  )
  spec = train_step.cli_spec("tnl", "tiny", 128, args, mesh=None)
  assert spec["model_config"].glu_backend == "pallas_gpu"
  assert spec["model_config"].norm_backend == "pallas_gpu"
  assert spec["model_config"].linear_attention_gpu_overrides == (
    ("fused_forward_states", True),
    ("packed_operands", True),
  )
  assert spec["model_config"].fused_mlp
  row = {
    "arch": "tnl",
    "size": "tiny",
    "seq_len": 128,
    "global_batch_size": 8,
    "num_microbatches": 1,
    "remat_policy": "none",
    "unroll_layers": True,
    "fused_mlp": True,
    "norm_backend": train_step.GPU_NORM_BACKEND,
    "glu_backend": train_step.GPU_GLU_BACKEND,
    "softmax_gradient_backend": train_step.GPU_SOFTMAX_GRADIENT_BACKEND,
    "linear_attention_gpu_overrides": dict(spec["model_config"].linear_attention_gpu_overrides),
    "loss_logits_dtype": spec["loss_logits_dtype"],
    "compile_s": 1.0,
    "step_s": 0.5,
    "tokens_per_s": 2048.0,
    "mfu": 0.1,
    "peak_gib": None,
  }
  header = {"device": "1 × cpu", "date": "2026-12-04T00:00:00+00:00", "versions": "jax", "commands": ["x"]}
  train_step.write_markdown(str(tmp_path / "t.md"), header, [row], {}, "")
  assert (
    "| none, stacked layers unrolled, fused mlp, float32 logits, kernels: fused_forward_states=true "
    "packed_operands=true |" in (tmp_path / "t.md").read_text()
  )
  # A row whose norms are not the GPU default names them.
  other = "xla" if train_step.GPU_NORM_BACKEND == "pallas_gpu" else "pallas_gpu"
  train_step.write_markdown(str(tmp_path / "t.md"), header, [{**row, "norm_backend": other}], {}, "")
  assert (
    f"| none, stacked layers unrolled, fused mlp, {other} norms, float32 logits," in (tmp_path / "t.md").read_text()
  )
  # A fused GLU whose gradient is not the GPU default's names its backend.
  other = "xla" if train_step.GPU_GLU_BACKEND == "pallas_gpu" else "pallas_gpu"
  train_step.write_markdown(str(tmp_path / "t.md"), header, [{**row, "glu_backend": other}], {}, "")
  assert (
    f"| none, stacked layers unrolled, fused mlp, {other} GLU gradient, float32 logits,"
    in (tmp_path / "t.md").read_text()
  )
  # So does a loss whose softmax gradient is not the GPU default's; a row without the field ran XLA's.
  other = "xla" if train_step.GPU_SOFTMAX_GRADIENT_BACKEND == "pallas_gpu" else "pallas_gpu"
  train_step.write_markdown(str(tmp_path / "t.md"), header, [{**row, "softmax_gradient_backend": other}], {}, "")
  assert (
    f"| none, stacked layers unrolled, fused mlp, {other} softmax gradient, float32 logits,"
    in (tmp_path / "t.md").read_text()
  )
  with pytest.raises(ValueError, match="unknown GpuKernelConfig knob 'packed'"):
    train_step.cli_spec("tnl", "tiny", 128, argparse.Namespace(**{**vars(args), "gpu_overrides": "packed=true"}), None)


def test_train_step_rows_take_and_state_compiler_options(tmp_path):
  import train_step

  options = train_step.parse_compiler_options("xla_gpu_enable_cublaslt=true,xla_gpu_autotune_level=4,xla_dump_to=/x")
  assert options == {"xla_gpu_enable_cublaslt": True, "xla_gpu_autotune_level": 4, "xla_dump_to": "/x"}
  with pytest.raises(ValueError, match="--compiler_options item 'xla_gpu_enable_cublaslt' is not name=value"):
    train_step.parse_compiler_options("xla_gpu_enable_cublaslt")
  row = {
    "arch": "tnl",
    "remat_policy": "none",
    "norm_backend": train_step.GPU_NORM_BACKEND,
    "compiler_options": options,
  }
  assert train_step._layers_label(row).endswith(
    ", XLA: xla_gpu_enable_cublaslt=true xla_gpu_autotune_level=4 xla_dump_to=/x"
  )


def test_committed_peer_files_carry_their_provenance():
  # The peers the benchmarks compare against are data in the repository, each with how it was measured.
  peers_dir = os.path.join(REPO, "benchmarks", "peers")
  for name, script in (("torch_models_h200.json", "torch_models.py"), ("fla_kernels_h200.json", "fla_kernels.py")):
    with open(os.path.join(peers_dir, name), encoding="utf-8") as f:
      record = json.load(f)
    provenance = record["provenance"]
    assert provenance["script"] == f"benchmarks/peers/{script}"
    assert os.path.exists(os.path.join(peers_dir, script))
    assert provenance["packages"]["fla"].startswith("0.6.0") and "H200" in provenance["device"]
    assert datetime.date.fromisoformat(provenance["date"][:10])
    assert record["results"]
  import train_step

  assert train_step.PEERS_PATH.split(",")[0] == os.path.join(peers_dir, "torch_models_h200.json")
  assert train_step.load_peers(train_step.PEERS_PATH)[0][("hgrn2", "1b", 8192, "synced")]["tokens_per_s"] > 0
  with open(os.path.join(peers_dir, "fla_kernels_h200.json"), encoding="utf-8") as f:
    timings = json.load(f)["results"]
  assert all(
    f"fla {name} {shape}" in timings
    for name in kernel_timing.REFERENCE_PEER_NAMES.values()
    for shape in ("8x2048x16x128", "2x8192x16x128", "1x32768x16x128")
  )


def test_peer_scripts_baseline_and_arguments(tmp_path):
  # The plain-XLA chunked baseline the kernel peers time computes the op it stands for (against the recurrence),
  # and the model peers' script refuses an unknown size before touching a GPU.
  sys.path.insert(0, os.path.join(REPO, "benchmarks", "peers"))
  import fla_kernels
  import jax
  import jax.numpy as jnp
  import torch_models

  from pallas_kernels.linear_attention import api

  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(keys[i], (2, 128, 2, 16), jnp.float32) * 0.3 for i in range(3))
  log_decay = -jnp.exp(jax.random.uniform(keys[3], (2,), minval=-6, maxval=-1))
  ours = fla_kernels.chunk_simple_gla_jax(q, k, v, log_decay, chunk=32)
  reference = api.linear_attention(q, k, v, log_decay, backend="reference")
  assert float(jnp.abs(ours - reference).max()) < 1e-4
  with pytest.raises(SystemExit):
    torch_models.main(["--out", str(tmp_path / "peers.json"), "--sizes", "2b"])
  assert not (tmp_path / "peers.json").exists()


def test_fla_measured_in_process_replaces_the_reference_timing(tmp_path, monkeypatch):
  # A row first carries the reference file's fla timing (†); fla run later in this process replaces it and the
  # ratios follow; a failed fla run leaves the reference in place.
  record = {
    "device": "cpu",
    "date": "2026-11-29",
    "jax_version": "x",
    "command": "c",
    "results": [],
    "others": [],
    "variants": [],
    "skipped": [],
  }
  runner = kernel_timing.Runner(record, str(tmp_path), None, {"fla chunk_gla (HGRN2-like) 8x2048x16x128": [2.0, 6.0]})
  row = {"op": "hgrn2", "shape": "8x2048x16x128", "fwd": {"ours_ms": 1.0}, "fwd_bwd": {"ours_ms": 3.0}}
  record["results"].append(row)
  kernel_timing.apply_reference_peer(runner, row)
  assert row["fwd_bwd"]["fla_source"] == "reference"
  assert (row["fwd"]["ratio"], row["fwd_bwd"]["ratio"]) == (2.0, 2.0)
  monkeypatch.setattr(kernel_timing, "time_fla", lambda op, shape: (_ for _ in ()).throw(RuntimeError("no GPU")))
  kernel_timing.measure_fla(runner, row, "hgrn2", (8, 2048, 16, 128))
  assert row["fwd_bwd"]["fla_source"] == "reference" and row["fwd_bwd"]["ratio"] == 2.0
  monkeypatch.setattr(
    kernel_timing,
    "time_fla",
    lambda op, shape: {
      "fwd": {"ms": 1.5, "first_call_s": 9.0},
      "fwd_bwd": {"ms": 4.5, "first_call_s": 30.0},
      "note": "guard lifted" if op == "gated_scalar" else None,
    },
  )
  kernel_timing.measure_fla(runner, row, "hgrn2", (8, 2048, 16, 128))
  assert "fla_source" not in row["fwd"] and "fla_source" not in row["fwd_bwd"]
  assert (row["fwd"]["ratio"], row["fwd_bwd"]["ratio"]) == (1.5, 1.5)
  text = (tmp_path / "kernels_h200.md").read_text()
  assert "| 1.500 | 1.500 |" in text and "†" not in text.split("| hgrn2 |")[1] and "guard" not in text
  # A peer timed with a caveat (fla's lifted guard) carries it into the table.
  gated = {"op": "gated_scalar", "shape": "8x2048x16x128", "fwd": {"ours_ms": 1.0}, "fwd_bwd": {"ours_ms": 3.0}}
  record["results"].append(gated)
  kernel_timing.measure_fla(runner, gated, "gated_scalar", (8, 2048, 16, 128))
  assert "fla gated_scalar: guard lifted." in (tmp_path / "kernels_h200.md").read_text().splitlines()


def test_cu_seqlens_start_a_document_wherever_the_segment_id_changes():
  assert kernel_timing.cu_seqlens([[0, 0, 1, 1, 1, 0, 0, 3]]).tolist() == [0, 2, 5, 7, 8]
  assert kernel_timing.cu_seqlens([[4] * 6]).tolist() == [0, 6]
  with pytest.raises(ValueError, match="one row"):
    kernel_timing.cu_seqlens([[0, 1], [0, 1]])


def test_accuracy_against_a_peer_on_the_same_inputs(tmp_path, monkeypatch):
  """--accuracy: ours and the peer (here the xla backend in fla's place, a second code path) scored against the
  float64 recurrence on the same packed-document inputs; a peer that fails leaves ours reported."""
  import jax
  import numpy as np

  from pallas_kernels.linear_attention import api

  def xla_peer(op, q, k, v, log_decay, segment_ids, d_out):
    def run(q, k, v, log_decay):
      return api.linear_attention(q, k, v, log_decay, segment_ids=segment_ids, backend="xla")

    learned = op in kernel_timing.LEARNED_DECAY_OPS
    out, vjp = jax.vjp(run, q, k, v, log_decay)
    grads = dict(zip(("q", "k", "v", "log_decay"), vjp(d_out.astype(out.dtype))))
    names = ("q", "k", "v", "log_decay") if learned else ("q", "k", "v")
    return np.asarray(out, np.float32), {name: np.asarray(grads[name], np.float32) for name in names}

  def peer(op, *inputs):
    if op == "tnl":
      raise RuntimeError("no GPU")
    return xla_peer(op, *inputs)

  monkeypatch.setattr(kernel_timing, "fla_with_grads", peer)
  results = kernel_timing.accuracy_against_fla(("hgrn2", "tnl"), shape=(1, 64, 2, 16))
  assert set(results["hgrn2"]["ours"]) == set(results["hgrn2"]["fla"]) == {"o", "dq", "dk", "dv", "dlog_decay"}
  assert set(results["tnl"]["ours"]) == {"o", "dq", "dk", "dv"}  # TNL's decay is a fixed buffer
  for errors in (results["hgrn2"]["ours"], results["hgrn2"]["fla"], results["tnl"]["ours"]):
    assert 0 < max(errors.values()) < 1e-2, errors  # bf16 inputs: rounding, no more
  assert results["tnl"]["fla"] == {"error": "RuntimeError: no GPU"}
  record = {"device": "cpu", "date": "d", "jax_version": "x", "command": "c", "results": [], "skipped": []}
  record["accuracy"] = results
  kernel_timing.write_markdown(tmp_path / "k.md", record)
  text = (tmp_path / "k.md").read_text()
  assert "| tnl | fla chunk_simple_gla(g_gamma) | failed: RuntimeError: no GPU |" in text
  tnl_ours = results["tnl"]["ours"]
  assert f"| tnl | ours | {tnl_ours['o']:.2e} | {tnl_ours['dq']:.2e} |" in text and "| — |" in text


def test_attention_timing_documents_flops_and_table(tmp_path):
  # attention_timing.py's packed rows, its causal + document FLOP count, its --config parsing and its table.
  import attention_timing
  import numpy as np

  ids, lengths = attention_timing.document_ids(2, 4096, 300, seed=1)
  assert sum(lengths) == ids.size and min(lengths) >= 1 and 100 < sum(lengths) / len(lengths) < 1000
  assert all(np.all(np.diff(row) >= 0) for row in ids)  # ids non-decreasing along each row, as packed
  assert np.array_equal(np.bincount(ids.ravel()), lengths)
  assert attention_timing.forward_flops([1, 3], heads=2, dim=4) == 4 * 4 * 2 * (1 + 6)
  assert attention_timing.parse_config(["block_q=64", "num_warps=4"]) == {"block_q": 64, "num_warps": 4}
  with pytest.raises(SystemExit, match="valid: knob=int"):
    attention_timing.parse_config(["blocks=64"])
  assert attention_timing.parse_shapes("2,1x64x2x64") == [(1, 32768, 16, 128), (1, 64, 2, 64)]
  record = {
    "device": "cpu",
    "date": "2026-12-04",
    "commit": "abc",
    "jax_version": "x",
    "command": "c",
    "config": "default configuration",
    "mean_document": 1000,
    "seed": 0,
    "budget_s": 1.0,
    "results": [
      {
        "shape": "1x64x2x64",
        "documents": 3,
        "variant": variant,
        "fwd": {"ms": ms, "tflops": 1.0, "over_mask": 2.0 / ms, "compile_s": 1.0},
        "fwd_bwd": {},
      }
      for variant, ms in (("cudnn_document_mask", 2.0), ("pallas_segment_ids", 1.0))
    ],
    "checks": {"1x64x2x64": {"error": "OOM"}},
    "skipped": ["pallas_causal fwd 1x64x2x64"],
  }
  attention_timing.save(str(tmp_path), record)
  text = (tmp_path / "attention_timing.md").read_text()
  assert "| 1x64x2x64 | 3 | pallas_segment_ids | 1.000 | 1.0 | 2.00 | — |" in text
  assert "failed: OOM" in text and "Not measured (--budget_s 1.0 spent): pallas_causal fwd 1x64x2x64." in text
  assert json.loads((tmp_path / "attention_timing.json").read_text()) == record


def test_budgeted_runner_saves_after_each_measurement_and_records_failures_and_skips():
  # A failing measurement records what the script's failed() makes of it and the next one still runs; once the
  # budget is spent nothing starts, and the skipped names are kept. The record is saved after every measurement.
  saves = []
  record = {"skipped": []}

  def broken():
    raise RuntimeError("out of memory\nmore detail")

  runner = measurement.Runner(
    record, "out", lambda out_dir, rec: saves.append((out_dir, len(rec["skipped"]))), 0.0, None, lambda e: str(e)
  )
  assert runner.measure("broken", broken) == "out of memory\nmore detail"
  assert runner.measure("fine", lambda: {"ms": 1.0}) == {"ms": 1.0}
  spent = measurement.Runner(record, "out", lambda out_dir, rec: saves.append((out_dir, len(rec["skipped"]))), 0.0, 0)
  assert spent.measure("late", lambda: {"ms": 2.0}) is None
  assert record["skipped"] == ["late"] and saves == [("out", 0), ("out", 0), ("out", 1)]
  assert measurement.parse_shapes("1,2x64x2x16", ((8, 2048, 16, 128), (1, 4096, 2, 64))) == [
    (1, 4096, 2, 64),
    (2, 64, 2, 16),
  ]
  with pytest.raises(SystemExit, match="'2x64'; valid: an index 0..1 or BxTxHxD"):
    measurement.parse_shapes("2x64", ((8, 2048, 16, 128), (1, 4096, 2, 64)))


def test_train_step_rows_keep_the_model_files_fused_mlp_unless_told():
  import train_step

  from lsm_jax.models import configs

  for arch in ("tnl", "hgrn2", "llama", "cosformer2"):
    assert train_step.model_config(arch, "1b", "none").fused_mlp == configs.get_config(arch, "1b").fused_mlp
  assert configs.get_config("tnl", "1b").fused_mlp and not configs.get_config("llama", "1b").fused_mlp
  assert not train_step.model_config("tnl", "1b", "none", fused_mlp=False).fused_mlp
  assert train_step.model_config("llama", "1b", "none", fused_mlp=True).fused_mlp
