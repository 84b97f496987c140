"""lsm_jax.aot: one clear error without libtpu; with libtpu, a tiny configuration compiled for a TPU topology.

The compile test needs libtpu (`pip install 'jax[tpu]'`, no TPU needed), e.g. the /tmp/aotenv venv:
  /tmp/aotenv/bin/python -m pytest -q tests/test_aot.py
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from lsm_jax import aot

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
# The smoke model with 128-wide heads (the Mosaic kernels' lane width) and bf16 compute, on 4 v5e chips.
TINY = [
  "--gin_file=gin/smoke/hgrn2.gin",
  "--topology=v5e:2x2",
  "--gin.configs.ModelConfig.head_dim=128",
  "--gin.configs.ModelConfig.d_model=256",
  "--gin.configs.ModelConfig.dtype='bfloat16'",
  "--gin_bindings=trainer.train.loss_chunk_length = None",
]


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
  with pytest.raises(SystemExit) as exit_info:
    aot.run(TINY)
  message = str(exit_info.value.code)
  assert message.startswith("lsm_jax.aot: error: compiling for a TPU topology needs libtpu")
  assert "pip install 'jax[tpu]'" in message
  with pytest.raises(aot.LibtpuMissingError, match="libtpu"):
    aot.tpu_topology("v5e:2x2")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here; the no-libtpu path is covered in-process above")
def test_cli_without_libtpu_fails_with_one_line():
  result = subprocess.run(
    [sys.executable, "-m", "lsm_jax.aot", *TINY], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
  )
  assert result.returncode != 0
  assert "pip install 'jax[tpu]'" in result.stderr and "Traceback" not in result.stderr


def test_a_gin_mistake_is_one_line_before_any_compile(monkeypatch):
  import gin

  monkeypatch.setattr(aot, "libtpu_installed", lambda: True)  # the gin check comes before anything needs libtpu
  try:
    for argv, expected in [
      (["--gin_file=gin/smoke/hgrn2.gin", "--topology=v5e:2x2", "--gin.SEQ_LENN=64"], "sets the macro SEQ_LENN"),
      (["--gin_file=gin/smoke/hgrn3.gin", "--topology=v5e:2x2"], "gin file 'gin/smoke/hgrn3.gin' not found"),
    ]:
      gin.clear_config()
      with pytest.raises(SystemExit) as exit_info:
        aot.run(argv)
      assert str(exit_info.value.code).startswith("lsm_jax.aot: error: ") and expected in str(exit_info.value.code)
  finally:
    gin.clear_config()


def test_hbm_table():
  assert aot.hbm_bytes("TPU v5 lite") == 16 * aot.GIB
  assert aot.hbm_bytes("TPU v5") == 95 * aot.GIB
  assert aot.hbm_bytes("TPU v4") == 32 * aot.GIB
  assert aot.hbm_bytes("TPU v6 lite") == 32 * aot.GIB
  with pytest.raises(ValueError, match="no HBM size known"):
    aot.hbm_bytes("cpu")


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]'; no TPU needed) to compile for a TPU topology"
)
def test_tiny_hgrn2_compiles_for_tpu_with_mosaic_kernels(tmp_path):
  import gin

  gin.clear_config()
  try:
    record = aot.main([*TINY, f"--results={tmp_path / 'aot'}"])
  finally:
    gin.clear_config()
  # The host is a CPU, but "auto" must follow the target: Mosaic kernels (forward, dq, dk/dv) in the step.
  assert record["host_default_backend"] == "cpu" and record["target_platform"] == "tpu"
  assert record["linear_attention_backend"] == "pallas_tpu"
  assert record["mosaic_kernel_calls"] >= 3
  assert record["num_devices"] == 4 and record["mesh"]["fsdp"] == 4
  memory = record["memory_bytes_per_device"]
  assert memory["argument"] > 0 and memory["temp"] > 0 and record["fits"]
  assert record["xla_flops_per_device"] > 0
  assert (tmp_path / "aot.json").exists() and "hgrn2" in (tmp_path / "aot.md").read_text()


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]'; no TPU needed) to compile for a TPU topology"
)
def test_tiny_llama_compiles_for_tpu_with_splash_attention(tmp_path):
  import gin

  gin.clear_config()
  llama = [flag.replace("hgrn2", "llama") for flag in TINY] + ["--gin.SEQ_LEN=256"]
  try:
    record = aot.main([*llama, f"--results={tmp_path / 'aot'}"])
  finally:
    gin.clear_config()
  # "auto" attention follows the target: splash's Mosaic kernels (forward, dq, dk/dv), no [T, T] mask.
  assert record["attention_impl"] == "splash" and record["mosaic_kernel_calls"] >= 3 and record["fits"]


@pytest.mark.parametrize("decay_mode", ["head", "vector"])
def test_pallas_backends_run_per_shard_on_a_mesh(monkeypatch, decay_mode):
  """XLA cannot partition Mosaic calls (the AOT check found this): layers.sharded_linear_attention runs them in a
  shard_map, batch over data × fsdp and heads over tensor. The kernel is stood in for by the chunked XLA op
  (TPU interpret mode deadlocks across devices), which records the per-shard shapes it is called with."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lsm_jax import sharding
  from lsm_jax.models import layers
  from pallas_kernels.linear_attention import api, chunked

  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  seen_shapes = []

  def per_shard_kernel(q, *args):
    seen_shapes.append(q.shape)
    return chunked.linear_attention_chunked(q, *args)

  rng = np.random.default_rng(0)
  batch, time, heads, dim = 4, 64, 2, 16
  q, k, v = (jnp.asarray(rng.normal(size=(batch, time, heads, dim)) * 0.3, jnp.float32) for _ in range(3))
  log_decay = jnp.asarray(-rng.uniform(0.01, 0.2, size=(heads,) if decay_mode == "head" else q.shape), jnp.float32)
  segment_ids = jnp.asarray(np.repeat([[1, 2]], batch, 0).repeat(time // 2, axis=1), jnp.int32)
  expected = layers.sharded_linear_attention(q, k, v, log_decay, segment_ids=segment_ids, backend="xla")
  original_impl = api._impl
  monkeypatch.setattr(
    api, "_impl", lambda backend: per_shard_kernel if backend == "pallas_tpu" else original_impl(backend)
  )
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  with sharding.activate(mesh):
    out = jax.jit(lambda *args: layers.sharded_linear_attention(*args[:4], segment_ids=args[4], backend="pallas_tpu"))(
      q, k, v, log_decay, segment_ids
    )
  assert seen_shapes == [(batch // 4, time, heads // 2, dim)]
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
  # Without a mesh (or on one device) the op is called whole.
  seen_shapes.clear()
  layers.sharded_linear_attention(q, k, v, log_decay, segment_ids=segment_ids, backend="pallas_tpu")
  assert seen_shapes == [q.shape]


def test_a_step_the_compiler_refuses_for_memory_is_a_row_that_does_not_fit():
  record = {
    "date": "2026-11-29T05:10:00",
    "command": "python -m lsm_jax.aot x",
    "arch": "llama",
    "size": "1b",
    "num_params": 10,
    "topology": "v5p:2x2x1",
    "device_kind": "TPU v5",
    "num_devices": 4,
    "mesh": {"data": 1, "fsdp": 4},
    "seq_len": 8192,
    "global_batch_size": 480,
    "num_microbatches": 40,
    "microbatch_size": 12,
    "linear_attention_backend": "pallas_tpu",
    "attention_impl": "xla",
    "remat_policy": "none",
    "hbm_bytes_per_device": 95 * aot.GIB,
    "model_flops_per_device": 2e15,
    "fits": False,
    "compile_seconds": 2.0,
    "machine": "vm",
    "versions": "jax",
    "compile_error": "RESOURCE_EXHAUSTED: Ran out of memory on HBM (509.74G)",
  }
  assert "DOES NOT FIT" in aot.summary_text(record) and "509.74G" in aot.summary_text(record)
  row = [line for line in aot._markdown([record]).splitlines() if line.startswith("| 2026")][0]
  cells = [cell.strip() for cell in row.strip("|").split("|")]
  assert len(cells) == 18  # as many cells as the header
  assert cells[6] == "xla" and cells[8].startswith("RESOURCE_EXHAUSTED") and cells[14] == "no"
