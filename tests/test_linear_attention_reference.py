"""The recurrent reference against a float64 parallel form, the chunked "xla" backend against the float64
recurrent reference (values and gradients), and the input validation of api.py."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from pallas_kernels.linear_attention import api, chunked, reference
from pallas_kernels.linear_attention.testing import (
  backend_with_grads,
  random_inputs,
  reference_float64,
  relative_rms_error,
)

FP32_TOLERANCE = 1e-5


def _parallel_masked_float64(q, k, v, log_decay, initial_state, segment_ids):
  """O = ((QKᵀ) ⊙ D) V per (b, h) in numpy float64, with D_ij = exp(B_i − B_j) from the global cumulative
  log-decay (per key channel), masked to i >= j inside one document; the initial state feeds the first one."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, time, heads, dim_k = q.shape
  if log_decay is None:
    steps = np.zeros(q.shape)
  elif np.ndim(log_decay) == 1:
    steps = np.broadcast_to(np.asarray(log_decay, np.float64)[None, None, :, None], q.shape)
  elif np.ndim(log_decay) == 3:
    steps = np.broadcast_to(np.asarray(log_decay, np.float64)[..., None], q.shape)
  else:
    steps = np.asarray(log_decay, np.float64)
  cumulative = np.cumsum(steps, axis=1)  # [B,T,H,Dk]
  ids = np.asarray(segment_ids)
  docs = np.concatenate([np.zeros((batch, 1), int), np.cumsum(ids[:, 1:] != ids[:, :-1], axis=1)], axis=1)
  out = np.zeros(v.shape)
  for b in range(batch):
    visible = np.tril(np.ones((time, time), bool)) & (docs[b][:, None] == docs[b][None, :])
    for h in range(heads):
      decay = np.exp(cumulative[b, :, h, None, :] - cumulative[b, None, :, h, :])  # [T,T,Dk]
      scores = np.einsum("id,jd,ijd->ij", q[b, :, h], k[b, :, h], decay) * visible
      out[b, :, h] = scores @ v[b, :, h]
      first_doc = docs[b] == 0
      carried = (q[b, :, h] * np.exp(cumulative[b, :, h])) @ np.asarray(initial_state[b, h], np.float64)
      out[b, :, h] += carried * first_doc[:, None]
  return out


@pytest.mark.parametrize("decay_mode", ["none", "scalar", "token", "vector"])
def test_recurrent_reference_matches_float64_parallel_form(decay_mode):
  q, k, v, log_decay, state, segment_ids = random_inputs(
    0, batch=2, time=24, heads=2, dim_k=8, dim_v=4, decay_mode=decay_mode, strength="weak"
  )
  segment_ids = segment_ids.at[:, 10].set(1 - segment_ids[:, 10])  # ensure resets inside this short row
  expected = _parallel_masked_float64(q, k, v, log_decay, state, segment_ids)
  with jax.enable_x64(True):
    to64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    out, _ = reference.linear_attention_recurrent(to64(q), to64(k), to64(v), to64(log_decay), to64(state), segment_ids)
    assert out.dtype == jnp.float64
  assert relative_rms_error(out, expected) < 1e-12


def test_recurrent_reference_gradients_match_finite_differences():
  q, k, v, log_decay, state, segment_ids = random_inputs(
    1, batch=1, time=12, heads=1, dim_k=4, dim_v=3, decay_mode="vector", strength="weak"
  )
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    fn = lambda q, k, v, log_decay, state: reference.linear_attention_recurrent(q, k, v, log_decay, state, segment_ids)
    jax.test_util.check_grads(fn, tuple(map(to64, (q, k, v, log_decay, state))), order=1, modes=["rev"])


def _check_chunked_against_reference(
  seed, *, time, decay_mode, strength, chunk_size=None, dim_k=32, dim_v=16, segments=True, initial_state=True
):
  q, k, v, log_decay, state, segment_ids = random_inputs(
    seed,
    batch=2,
    time=time,
    heads=2,
    dim_k=dim_k,
    dim_v=dim_v,
    decay_mode=decay_mode,
    strength=strength,
    segments=segments,
    initial_state=initial_state,
  )
  rng = np.random.default_rng(seed + 100)
  output_cotangent = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
  state_cotangent = jnp.asarray(rng.normal(size=(2, 2, dim_k, dim_v)), jnp.float32)
  expected_out, expected_state, expected_grads = reference_float64(
    q, k, v, log_decay, state, segment_ids, output_cotangent, state_cotangent
  )
  out, final_state, grads = backend_with_grads(
    chunked.linear_attention_chunked,
    chunk_size,
    q,
    k,
    v,
    log_decay,
    state,
    segment_ids,
    output_cotangent,
    state_cotangent,
  )
  assert out.dtype == jnp.float32 and final_state.dtype == jnp.float32
  errors = {
    "out": relative_rms_error(out, expected_out),
    "final_state": relative_rms_error(final_state, expected_state),
  }
  errors.update({f"d{name}": relative_rms_error(grads[name], expected_grads[name]) for name in expected_grads})
  assert set(grads) == set(expected_grads)
  assert max(errors.values()) <= FP32_TOLERANCE, errors


@pytest.mark.parametrize(
  "decay_mode,strength",
  [
    ("none", "weak"),
    ("scalar", "weak"),
    ("scalar", "strong"),
    ("vector", "weak"),
    ("vector", "strong"),
  ],
)
def test_chunked_matches_reference_with_resets_and_states(decay_mode, strength):
  # T=150 is not a multiple of the chunk (64); Dk != Dv; resets inside chunks and on a chunk boundary.
  _check_chunked_against_reference(2, time=150, decay_mode=decay_mode, strength=strength)


def test_chunked_token_decay_matches_reference_and_vector_decay_broadcast_over_dim_k():
  # Against the float64 recurrence (T=40 over chunks of 16, documents, an initial state), and against a second
  # code path: the per-key-channel scores with the decay repeated over Dk, whose gradient summed over Dk is the
  # per-token one.
  _check_chunked_against_reference(10, time=40, decay_mode="token", strength="strong", chunk_size=16, dim_k=16)
  q, k, v, log_decay, state, segment_ids = random_inputs(
    10, batch=2, time=40, heads=2, dim_k=16, dim_v=16, decay_mode="token", strength="strong"
  )
  d_out = jnp.asarray(np.random.default_rng(10).normal(size=v.shape), jnp.float32)
  d_state = jnp.ones(state.shape, jnp.float32)
  run = functools.partial(backend_with_grads, chunked.linear_attention_chunked, 16)
  token = run(q, k, v, log_decay, state, segment_ids, d_out, d_state)
  vector = run(q, k, v, jnp.broadcast_to(log_decay[..., None], q.shape), state, segment_ids, d_out, d_state)
  vector[2]["log_decay"] = vector[2]["log_decay"].sum(axis=-1)
  for got, expected in [(token[0], vector[0]), (token[1], vector[1])] + [(token[2][n], vector[2][n]) for n in token[2]]:
    assert relative_rms_error(got, expected) < 1e-5


def test_chunked_vector_decay_shorter_than_a_chunk():
  _check_chunked_against_reference(3, time=21, decay_mode="vector", strength="strong")


def test_chunked_vector_decay_with_small_chunk_and_no_segments():
  _check_chunked_against_reference(
    4, time=40, decay_mode="vector", strength="weak", chunk_size=8, segments=False, initial_state=False
  )


def test_chunked_handles_extreme_vector_decay_without_overflow():
  # Per-step log-decay of -80 gives cumulative exponents down to -2560 within the chunk: any factor e^{-b}
  # would overflow. Outputs and gradients must stay finite, and outputs match the closed form.
  q, k, v, _, _, _ = random_inputs(
    5, batch=1, time=32, heads=1, dim_k=8, dim_v=8, decay_mode="none", segments=False, initial_state=False
  )
  log_decay = jnp.full(q.shape, -80.0)
  run = lambda q, k, v, log_decay: chunked.linear_attention_chunked(q, k, v, log_decay, None, None, None)[0]

  @jax.jit
  def forward_and_backward(*args):
    out, vjp = jax.vjp(run, *args)
    return out, vjp(jnp.ones_like(out))

  out, grads = forward_and_backward(q, k, v, log_decay)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  # With decay ~0 every token only sees itself: o_t = (q_t·k_t) v_t.
  expected = jnp.sum(q * k, axis=-1, keepdims=True) * v
  assert relative_rms_error(out, expected) < 1e-6


def test_documents_never_share_state():
  # Second code path for the reset semantics: a document run alone (zero state) gives the same outputs as
  # inside the packed row.
  q, k, v, log_decay, state, _ = random_inputs(
    6, batch=1, time=100, heads=2, dim_k=16, dim_v=8, decay_mode="vector", segments=False
  )
  segment_ids = jnp.asarray([[3] * 37 + [5] * 40 + [3] * 23], jnp.int32)
  run = jax.jit(chunked.linear_attention_chunked, static_argnums=6)
  packed = run(q, k, v, log_decay, state, segment_ids, None)[0]
  # The third document reuses id 3 and starts mid-chunk.
  piece = lambda x: x[:, 77:]
  alone = run(piece(q), piece(k), piece(v), piece(log_decay), None, None, None)[0]
  assert relative_rms_error(packed[:, 77:], alone) < 1e-6


def test_bfloat16_inputs_keep_output_dtype_and_float32_state():
  q, k, v, log_decay, state, segment_ids = random_inputs(
    7, batch=1, time=70, heads=2, dim_k=16, dim_v=16, decay_mode="scalar", dtype=jnp.bfloat16
  )
  out, final_state = jax.jit(functools.partial(api.linear_attention, return_final_state=True, backend="xla"))(
    q, k, v, log_decay, initial_state=state, segment_ids=segment_ids
  )
  assert out.dtype == jnp.bfloat16 and final_state.dtype == jnp.float32
  expected, expected_state = reference.linear_attention_recurrent(q, k, v, log_decay, state, segment_ids)
  assert relative_rms_error(out.astype(jnp.float32), expected.astype(jnp.float32)) < 1e-2
  assert relative_rms_error(final_state, expected_state) < 1e-5  # same bf16 inputs, float32 arithmetic


@pytest.mark.parametrize("decay_mode", ["vector", "token"])
def test_decoding_steps_continue_the_chunked_prefill(decay_mode):
  # log_decay[:, t] is the step's [B,H,Dk] or [B,H] decay.
  q, k, v, log_decay, _, _ = random_inputs(
    8, batch=2, time=30, heads=2, dim_k=16, dim_v=8, decay_mode=decay_mode, segments=False, initial_state=False
  )
  run = jax.jit(functools.partial(api.linear_attention, return_final_state=True, backend="auto"))
  out, final_state = run(q, k, v, log_decay)
  prefix_out, state = run(q[:, :20], k[:, :20], v[:, :20], log_decay[:, :20])
  step = jax.jit(api.linear_attention_step)
  for t in range(20, 30):
    step_out, state = step(q[:, t], k[:, t], v[:, t], state, log_decay[:, t])
    assert relative_rms_error(step_out, out[:, t]) < 1e-5
  assert relative_rms_error(prefix_out, out[:, :20]) < 1e-6
  assert relative_rms_error(state, final_state) < 1e-5


def test_auto_backend_is_xla_on_cpu():
  assert api.resolve_backend("auto") == "xla"


def _valid_inputs():
  return random_inputs(9, batch=1, time=8, heads=2, dim_k=4, dim_v=4, decay_mode="vector")


@pytest.mark.parametrize(
  "mutate,error,message",
  [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, "rank 4"),
    (lambda a: {**a, "k": a["k"][:, :4]}, ValueError, "q and k must have the same shape"),
    (lambda a: {**a, "v": a["v"][:, :4]}, ValueError, "v must share"),
    (lambda a: {**a, "v": a["v"].astype(jnp.int32)}, TypeError, "v has dtype int32"),
    (lambda a: {**a, "log_decay": a["log_decay"][..., :2]}, ValueError, "log_decay has shape"),
    (lambda a: {**a, "log_decay": jnp.zeros((3,))}, ValueError, "log_decay has shape"),
    (
      lambda a: {**a, "log_decay": a["log_decay"][..., 0, 0]},
      ValueError,
      r"log_decay has shape \(1, 8\); valid: .*\[batch, time, heads\]=\(1, 8, 2\) \(per head and token\)",
    ),
    (lambda a: {**a, "initial_state": a["initial_state"][:, :1]}, ValueError, "initial_state has shape"),
    (lambda a: {**a, "segment_ids": a["segment_ids"][:, :4]}, ValueError, "segment_ids has shape"),
    (lambda a: {**a, "segment_ids": a["segment_ids"].astype(jnp.float32)}, TypeError, "segment_ids has dtype"),
    (lambda a: {**a, "backend": "cuda"}, ValueError, "Unknown linear-attention backend 'cuda'"),
    (lambda a: {**a, "chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    (lambda a: {**a, "chunk_size": 24}, ValueError, "multiple of 16"),
  ],
)
def test_invalid_inputs_raise_one_clear_error(mutate, error, message):
  q, k, v, log_decay, state, segment_ids = _valid_inputs()
  args = mutate(
    {
      "q": q,
      "k": k,
      "v": v,
      "log_decay": log_decay,
      "initial_state": state,
      "segment_ids": segment_ids,
      "backend": "xla",
      "chunk_size": None,
    }
  )
  with pytest.raises(error, match=message):
    api.linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay"), **args)


@pytest.mark.parametrize(
  "mutate,error,message",
  [
    (lambda a: {**a, "qkv": a["qkv"][:, :, :2]}, ValueError, r"qkv has shape \(1, 8, 2, 2, 4\); expected"),
    (lambda a: {**a, "qkv": a["qkv"][..., 0]}, ValueError, "qkv has shape"),
    (lambda a: {**a, "feature_map": "relu"}, ValueError, "Unknown feature map 'relu'; valid: None, 'silu'"),
    (lambda a: {**a, "log_decay": jnp.zeros((3,))}, ValueError, "log_decay has shape"),
    (lambda a: {**a, "qkv": a["qkv"].astype(jnp.int32)}, TypeError, "q has dtype int32"),
  ],
)
def test_invalid_packed_inputs_raise_one_clear_error(mutate, error, message):
  q, k, v, log_decay, _, segment_ids = random_inputs(9, batch=1, time=8, heads=2, dim_k=4, dim_v=4, decay_mode="scalar")
  args = mutate({"qkv": jnp.stack([q, k, v], axis=2), "log_decay": log_decay, "feature_map": "silu"})
  with pytest.raises(error, match=message):
    api.linear_attention_qkv(args.pop("qkv"), args.pop("log_decay"), segment_ids=segment_ids, backend="xla", **args)


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_packed_op_is_the_op_of_the_mapped_slices(backend):
  """linear_attention_qkv = linear_attention(SiLU(q), SiLU(k), v) on every backend but the GPU kernels (tested in
  interpret mode in test_linear_attention_gpu), values and final state."""
  q, k, v, log_decay, state, segment_ids = random_inputs(
    10, batch=2, time=40, heads=2, dim_k=8, dim_v=8, decay_mode="scalar"
  )
  kwargs = dict(initial_state=state, segment_ids=segment_ids, return_final_state=True, backend=backend)
  out, final_state = api.linear_attention_qkv(jnp.stack([q, k, v], axis=2), log_decay, feature_map="silu", **kwargs)
  expected_out, expected_state = api.linear_attention(jax.nn.silu(q), jax.nn.silu(k), v, log_decay, **kwargs)
  assert relative_rms_error(out, expected_out) < 1e-6 and relative_rms_error(final_state, expected_state) < 1e-6
