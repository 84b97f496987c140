"""The Pallas TPU kernels, run in TPU interpret mode on CPU, against the float64 recurrent reference:
outputs, final state and every gradient, for the four decay modes, fp32 and bf16; and their Mosaic lowering."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_attention import api, tpu
from pallas_kernels.linear_attention.testing import (
  backend_with_grads,
  random_inputs,
  reference_float64,
  relative_rms_error,
)

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}


def _check_tpu_against_reference(
  seed, *, time, decay_mode, strength, dtype, dim_k=128, dim_v=128, heads=2, block=None, batch=1
):
  q, k, v, log_decay, state, segment_ids = random_inputs(
    seed,
    batch=batch,
    time=time,
    heads=heads,
    dim_k=dim_k,
    dim_v=dim_v,
    decay_mode=decay_mode,
    strength=strength,
    dtype=dtype,
  )
  rng = np.random.default_rng(seed + 100)
  output_cotangent = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
  state_cotangent = jnp.asarray(rng.normal(size=state.shape), jnp.float32)
  expected_out, expected_state, expected_grads = reference_float64(
    q, k, v, log_decay, state, segment_ids, output_cotangent, state_cotangent
  )
  try:
    with pltpu.force_tpu_interpret_mode():
      out, final_state, grads = backend_with_grads(
        tpu.linear_attention_tpu, block, q, k, v, log_decay, state, segment_ids, output_cotangent, state_cotangent
      )
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  assert out.dtype == dtype and final_state.dtype == jnp.float32
  assert all(grads[name].dtype == x.dtype for name, x in (("q", q), ("k", k), ("v", v)))
  errors = {
    "out": relative_rms_error(out, expected_out),
    "final_state": relative_rms_error(final_state, expected_state),
  }
  errors.update({f"d{name}": relative_rms_error(grads[name], expected_grads[name]) for name in expected_grads})
  assert set(grads) == set(expected_grads)
  assert max(errors.values()) <= TOLERANCE[dtype], errors


def test_vector_decay_strong_fp32_two_blocks_and_dk_not_dv():
  # HGRN2 gates near 0 (log-decay to -10 per step), T=150: two 128-token grid steps, the second padded.
  _check_tpu_against_reference(0, time=150, decay_mode="vector", strength="strong", dtype=jnp.float32, dim_v=64)


@pytest.mark.slow
def test_vector_decay_weak_bf16_shorter_than_a_block():
  _check_tpu_against_reference(1, time=80, decay_mode="vector", strength="weak", dtype=jnp.bfloat16)


def test_scalar_decay_strong_bf16_two_blocks():
  _check_tpu_against_reference(2, time=200, decay_mode="scalar", strength="strong", dtype=jnp.bfloat16)


def test_token_decay_strong_fp32_two_blocks_two_rows():
  # One decay per head and token (Mamba-2), log-decay to -10 per step, T=200: the second block padded; two
  # batch rows with different decays and documents, so a decay block read from the wrong row fails.
  _check_tpu_against_reference(5, time=200, decay_mode="token", strength="strong", dtype=jnp.float32, batch=2)


def test_token_decay_weak_bf16_two_chunks_per_block():
  # Blocks of 256 tokens: the cumulative decay restarts at the second 128-token chunk of a grid step.
  _check_tpu_against_reference(6, time=260, decay_mode="token", strength="weak", dtype=jnp.bfloat16, block=256)


def test_no_decay_fp32_two_chunks_per_block():
  # Blocks of 256 tokens: two 128-token chunks per grid step, the second block padded.
  _check_tpu_against_reference(3, time=300, decay_mode="none", strength="weak", dtype=jnp.float32, block=256)


def test_block_size_must_be_a_multiple_of_128():
  q = jnp.zeros((1, 16, 1, 8))
  with pytest.raises(ValueError, match="multiple of 128"):
    api.linear_attention(q, q, q, backend="pallas_tpu", chunk_size=64)


@pytest.mark.parametrize("decay_mode", ["none", "scalar", "token", "vector"])
def test_forward_and_backward_lower_to_mosaic(decay_mode):
  # Interpret mode does not run Mosaic's lowering rules; exporting for the TPU platform does (no TPU needed),
  # so unsupported ops, layouts or block shapes fail here.
  q, k, v, log_decay, state, segment_ids = random_inputs(
    4, batch=1, time=300, heads=2, dim_k=256, dim_v=128, decay_mode=decay_mode, dtype=jnp.bfloat16
  )

  def loss(q, k, v, log_decay, state):
    out, final_state = tpu.linear_attention_tpu(q, k, v, log_decay, state, segment_ids, 256)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(final_state**2)

  argnums = (0, 1, 2, 4) if log_decay is None else (0, 1, 2, 3, 4)
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums)), platforms=["tpu"])(q, k, v, log_decay, state)
  kernels = re.findall(r'kernel_name = "(\w+)"', exported.mlir_module())
  assert sorted(kernels) == ["_backward_dkv_kernel", "_backward_dq_kernel", "_forward_kernel"]
