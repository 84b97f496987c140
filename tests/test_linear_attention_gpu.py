"""The "pallas_gpu" backend (Pallas Triton kernels, interpret mode on CPU) against the float64 recurrence.

Each case compares the output, the final state and the gradients of q, k, v, log_decay and the initial state
of the loss Σ o·do + Σ S_T·dS_T. Shapes are tiny (interpret mode is slow) but cover several chunks, T not a
multiple of the chunk, Dk ≠ Dv, segment resets with repeating ids, strong decay and bf16."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_tools import equations, pallas_kernel_name, pallas_kernel_names

from pallas_kernels.linear_attention import api, gpu, testing
from pallas_kernels.linear_attention.gpu import blocks
from pallas_kernels.linear_attention.gpu.forward import FUSED_FORWARD_STATES

FP32_BOUND = 1e-4
BF16_BOUND = 1e-2


def _cotangents(seed, v, state_shape):
  """do and dS_T drawn bf16-representable, so bf16 runs see exactly the cotangents the reference sees."""
  rng = np.random.default_rng(seed)
  draw = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)
  return draw(v.shape), draw(state_shape)


def _config(decay_mode, q, **overrides):
  """The default kernel configuration of these inputs with `overrides`."""
  return dataclasses.replace(gpu.default_config(decay_mode, q.shape, q.dtype), **overrides)


def _kernel_with_grads(chunk_size, q, k, v, log_decay, initial_state, segment_ids, d_out, d_state, config=None):
  op = gpu.linear_attention_gpu if config is None else functools.partial(gpu.linear_attention_gpu, config=config)
  return testing.backend_with_grads(op, chunk_size, q, k, v, log_decay, initial_state, segment_ids, d_out, d_state)


def _packed_op(config, feature_map):
  """linear_attention_gpu_qkv as a backend of separate q, k, v: they are stacked into the packed projection."""

  def op(q, k, v, log_decay, initial_state, segment_ids, chunk_size):
    qkv = jnp.stack([q, k, v], axis=2)
    return gpu.linear_attention_gpu_qkv(qkv, log_decay, initial_state, segment_ids, chunk_size, feature_map, config)

  return op


def _assert_matches_reference(
  seed,
  *,
  decay_mode,
  dim_k,
  dim_v,
  time,
  chunk_size,
  dtype=jnp.float32,
  strength="weak",
  segments=True,
  initial_state=True,
  batch=2,
  heads=2,
  packed_feature_map=False,
  **overrides,
):
  """The op's values and gradients against the float64 recurrence; packed_feature_map (False: the op of separate
  q, k, v): linear_attention_gpu_qkv with that feature map (None or a name), through its stacked q, k, v."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    seed,
    batch=batch,
    time=time,
    heads=heads,
    dim_k=dim_k,
    dim_v=dim_v,
    decay_mode=decay_mode,
    strength=strength,
    dtype=dtype,
    segments=segments,
    initial_state=initial_state,
  )
  d_out, d_state = _cotangents(seed + 1, v, (batch, heads, dim_k, dim_v))
  packed = packed_feature_map is not False
  expected_out, expected_state, expected_grads = testing.reference_float64(
    q, k, v, log_decay, state, segment_ids, d_out, d_state, feature_map=packed_feature_map if packed else None
  )
  config = _config(decay_mode, q, **overrides) if overrides else None
  if packed:
    out, final_state, grads = testing.backend_with_grads(
      _packed_op(config, packed_feature_map), chunk_size, q, k, v, log_decay, state, segment_ids, d_out, d_state
    )
  else:
    out, final_state, grads = _kernel_with_grads(
      chunk_size, q, k, v, log_decay, state, segment_ids, d_out, d_state, config
    )
  assert out.dtype == v.dtype and final_state.dtype == jnp.float32
  bound = FP32_BOUND if dtype == jnp.float32 else BF16_BOUND
  errors = {
    "o": testing.relative_rms_error(out, expected_out),
    "final_state": testing.relative_rms_error(final_state, expected_state),
  }
  errors.update({f"d{name}": testing.relative_rms_error(grads[name], expected_grads[name]) for name in expected_grads})
  assert set(grads) == set(expected_grads)
  assert max(errors.values()) <= bound, errors


@pytest.mark.parametrize("decay_mode,dim_k,dim_v", [("scalar", 32, 16), ("none", 32, 16)])
def test_matches_reference_fp32(decay_mode, dim_k, dim_v):
  # T=40 with chunk 16: three chunks, the last one padded; a reset lands in every chunk on average.
  _assert_matches_reference(0, decay_mode=decay_mode, dim_k=dim_k, dim_v=dim_v, time=40, chunk_size=16)


def test_vector_decay_strong_gates_fp32():
  # Per-step decays down to e^-10 (HGRN2 gates near 0) with 16-token sub-chunks inside 32-token chunks.
  _assert_matches_reference(1, decay_mode="vector", dim_k=32, dim_v=16, time=72, chunk_size=32, strength="strong")


@pytest.mark.parametrize(
  "overrides",
  [
    dict(split_sub_chunks=False),
    dict(split_sub_chunks=True, key_tile=32),
  ],
)
def test_vector_decay_four_sub_chunks_fp32(overrides):
  # 64-token chunks: the middle sub-chunks (start − 1 inside the chunk, earlier and later rows on both sides) only
  # exist at chunk >= 48; their start is traced, from the loop or (split) from the grid. Dk = 64: one dq/dk key
  # tile (nested diagonal levels over all of Dk), or two. Paired 16-row blocks: 0 to 3 per sub-chunk and side.
  _assert_matches_reference(
    4, decay_mode="vector", dim_k=64, dim_v=16, time=150, chunk_size=64, strength="strong", heads=1, **overrides
  )


def _chunk_spans(log_decay, chunk):
  """Per (batch, chunk, head): the largest decay in nats over the key channels from the chunk's first row to its
  middle row or from there to its last row (what GpuKernelConfig.diagonal_span_limit bounds)."""
  batch, time, heads, dim = log_decay.shape
  padded = np.zeros((batch, -(-time // chunk) * chunk, heads, dim))
  padded[:, :time] = log_decay
  g = np.cumsum(padded.reshape(batch, -1, chunk, heads, dim), axis=2)
  middle = g[:, :, chunk // 2 - 1]
  return np.maximum(g[:, :, 0] - middle, middle - g[:, :, -1]).max(axis=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vector_decay_chunks_on_both_sides_of_the_span_limit(dtype):
  # One call takes some chunks' pairs by single matmuls referenced to their middle row (the short last chunks here
  # span 36 to 45 nats) and the others' by the exact sub-chunk forms (strong gates, documents, 64-token chunks;
  # the dq/dk kernel's two Dk tiles decide apart).
  args = dict(batch=2, time=200, heads=2, dim_k=64, dim_v=16, decay_mode="vector", strength="strong")
  spans = _chunk_spans(np.asarray(testing.random_inputs(21, **args)[3]), 64)
  limit = 45
  assert 0 < np.mean(spans <= limit) < 1, spans
  _assert_matches_reference(21, **args, chunk_size=64, dtype=dtype, diagonal_span_limit=limit, decay_key_tile=32)


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    dict(three_pass_diagonal=False, matched_rounding=False),
    dict(three_pass_diagonal=False),
    dict(split_sub_chunks=False),
  ],
)
def test_vector_decay_within_the_span_limit_bf16(overrides):
  # Weak gates: every chunk within the default limit (checked), so every pair comes from the single matmuls, with
  # the decay gradient's roundings matched or not, in one or three TF32 passes.
  args = dict(batch=2, time=150, heads=2, dim_k=32, dim_v=16, decay_mode="vector", strength="weak")
  spans = _chunk_spans(np.asarray(testing.random_inputs(22, **args)[3]), 64)
  assert np.all(spans <= gpu.default_config("vector", (1, 150, 1, 32), jnp.bfloat16).diagonal_span_limit)
  _assert_matches_reference(22, **args, chunk_size=64, dtype=jnp.bfloat16, **overrides)


@pytest.mark.parametrize("score_levels", [0, 3])
def test_vector_decay_score_levels(score_levels):
  # The forward's diagonal score blocks wholly elementwise (16 keys one by one) or with three halvings as matmuls
  # (2-row blocks left; the default is one), with strong gates, documents and four sub-chunks per chunk.
  _assert_matches_reference(
    14, decay_mode="vector", dim_k=32, dim_v=16, time=100, chunk_size=64, strength="strong", score_levels=score_levels
  )


@pytest.mark.parametrize(
  "overrides",
  [{}, dict(three_pass_diagonal=False, matched_rounding=False), dict(three_pass_diagonal=False)],
)
def test_vector_decay_bf16_with_decay_gradient(overrides):
  _assert_matches_reference(
    2,
    decay_mode="vector",
    dim_k=16,
    dim_v=32,
    time=48,
    chunk_size=32,
    dtype=jnp.bfloat16,
    strength="strong",
    **overrides,
  )


@pytest.mark.parametrize("decay_mode", ["scalar", "token", "vector", "none"])
def test_unrolled_state_scans_bf16(decay_mode):
  # Six chunks through scans unrolled by 4: one unrolled step, then two chunks one at a time. The forward scans
  # unroll in every mode; the reverse scan only with 16-bit operands, i.e. without a decay gradient ("none").
  _assert_matches_reference(
    8,
    decay_mode=decay_mode,
    dim_k=16,
    dim_v=32,
    time=90,
    chunk_size=16,
    dtype=jnp.bfloat16,
    strength="strong",
    scan_unroll=4,
  )


def _segmented_grad_launches(seed, decay_mode, dtype, **overrides):
  """The Pallas launches of q's gradient for 2×120 tokens in 16-token chunks (the segment tests' inputs)."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    seed, batch=2, time=120, heads=2, dim_k=32, dim_v=16, decay_mode=decay_mode, dtype=dtype
  )
  config = _config(decay_mode, q, **overrides)
  op = lambda q: gpu.linear_attention_gpu(q, k, v, log_decay, state, segment_ids, 16, config)[0].sum()
  return pallas_kernel_names(jax.make_jaxpr(jax.grad(op))(q).jaxpr)


@pytest.mark.parametrize(
  "decay_mode,dtype,kernel_overrides",
  [
    ("scalar", jnp.float32, {}),
    ("scalar", jnp.float32, {"fused_forward_states": False}),
    ("token", jnp.float32, {}),
    ("vector", jnp.float32, {"fused_forward": True}),
    ("vector", jnp.float32, {}),
    ("none", jnp.bfloat16, {}),
  ],
)
def test_segment_parallel_scans_and_fused_forward(decay_mode, dtype, kernel_overrides):
  # Eight 16-token chunks in four segments of two: the two-level scans (forward and reverse: level 1 from zero,
  # the combine, level 2 from the true starts) and the fused forward from its segments' starts (the default
  # without per-key-channel decay), with documents and strong decay crossing segment edges and an initial state.
  overrides = dict(min_segment_chunks=2) | kernel_overrides
  _assert_matches_reference(
    9, decay_mode=decay_mode, dim_k=32, dim_v=16, time=120, chunk_size=16, dtype=dtype, strength="strong", **overrides
  )
  launches = _segmented_grad_launches(9, decay_mode, dtype, **overrides)
  # level 1 of the forward's scan (fused or not), of the backward's reverse scan, and of its recomputed states
  # unless the forward stored them (the unfused forward; the fused one with fused_forward_states)
  config = _config(decay_mode, jnp.zeros((2, 120, 2, 32), dtype), **overrides)
  stored = not config.fused_forward or config.fused_forward_states
  assert launches.count("linear_attention_state_scan_segments") == (1 if stored else 2)
  assert launches.count("linear_attention_state_scan_reverse_segments") == 1


@pytest.mark.parametrize(
  "decay_mode,dtype",
  [
    ("vector", jnp.bfloat16),
    ("vector", jnp.float32),
    ("token", jnp.bfloat16),
    ("scalar", jnp.float32),
    ("scalar", jnp.bfloat16),
  ],
)
def test_backward_reuses_the_unfused_forward_states(decay_mode, dtype):
  # The unfused forward's per-chunk states and chunk-local gates are residuals: forward+backward runs one forward
  # state scan and one gate cumulative sum (vector decay; the decay gradient's suffix sums are the second
  # chunk_sums launch), also with a decay gradient, whose terms all take the bf16 states of bf16 inputs. (The
  # gradients against the float64 reference: the tests above, which take these paths.)
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    11, batch=1, time=64, heads=2, dim_k=16, dim_v=16, decay_mode=decay_mode, dtype=dtype
  )
  config = _config(decay_mode, q, fused_forward=False)
  op = lambda q, log_decay: gpu.linear_attention_gpu(q, k, v, log_decay, state, segment_ids, 16, config)[0].sum()
  launches = pallas_kernel_names(jax.make_jaxpr(jax.grad(op, argnums=(0, 1)))(q, log_decay).jaxpr)
  assert launches.count("linear_attention_state_scan") == 1
  if decay_mode == "vector":
    assert launches.count("linear_attention_chunk_sums") == 2


@pytest.mark.parametrize(
  "decay_mode,dtype,min_segment_chunks",
  [("scalar", jnp.float32, 2), ("token", jnp.bfloat16, 2), ("none", jnp.bfloat16, 8)],
)
def test_fused_forward_states_feed_the_backward(decay_mode, dtype, min_segment_chunks):
  # The fused forward that also stores the state entering each chunk (config.fused_forward_states), over four
  # segments of two chunks (documents and strong decay crossing their edges) or one segment: values and gradients
  # (the decay's too) against the float64 recurrence, and the backward runs no forward state scan.
  overrides = dict(fused_forward_states=True, min_segment_chunks=min_segment_chunks)
  _assert_matches_reference(
    14, decay_mode=decay_mode, dim_k=32, dim_v=16, time=120, chunk_size=16, dtype=dtype, strength="strong", **overrides
  )
  launches = _segmented_grad_launches(14, decay_mode, dtype, **overrides)
  assert launches.count(FUSED_FORWARD_STATES) == 1 and "linear_attention_fused_forward" not in launches
  assert "linear_attention_state_scan" not in launches
  # level 1 of the two-level scan: the fused forward's segments alone, no rescan of its states
  assert launches.count("linear_attention_state_scan_segments") == (1 if min_segment_chunks == 2 else 0)


@pytest.mark.parametrize(
  "decay_mode,dtype,feature_map,overrides",
  [
    ("scalar", jnp.float32, "silu", dict(min_segment_chunks=2)),
    ("scalar", jnp.bfloat16, "silu", {}),
    ("token", jnp.bfloat16, "silu", dict(fused_forward_states=True)),
    ("none", jnp.float32, None, dict(fused_forward=False)),
  ],
)
def test_packed_operands_match_reference(decay_mode, dtype, feature_map, overrides):
  # linear_attention_gpu_qkv with config.packed_operands: v read in place from the packed projection, q and k from
  # it or from the SiLU's output [B,T,2,H,D]: values and gradients (the decay's too) against the float64 recurrence
  # of (SiLU(q), SiLU(k), v) differentiated through the SiLU; four segments of two chunks, the fused forward storing
  # its states, or the state scan + output kernel forward. Apart from the one slice the SiLU maps, every kernel
  # reading q, k or v takes a packed array itself, and the gradient leaves the dq/dk kernel as one packed array (no
  # concatenation, the SiLU's gradient applied there).
  overrides = dict(packed_operands=True) | overrides
  _assert_matches_reference(
    15,
    decay_mode=decay_mode,
    dim_k=32,
    dim_v=32,
    time=120,
    chunk_size=16,
    dtype=dtype,
    strength="strong",
    packed_feature_map=feature_map,
    **overrides,
  )
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    15, batch=2, time=128, heads=2, dim_k=32, dim_v=32, decay_mode=decay_mode, dtype=dtype
  )
  qkv = jnp.stack([q, k, v], axis=2)
  config = _config(decay_mode, q, **overrides)
  op = lambda qkv: gpu.linear_attention_gpu_qkv(qkv, log_decay, state, segment_ids, 16, feature_map, config)[0].sum()
  jaxpr = jax.make_jaxpr(jax.grad(op))(qkv).jaxpr
  flat = list(equations(jaxpr))
  readers = [eqn for eqn in flat if any(getattr(x.aval, "shape", None) == qkv.shape for x in eqn.invars)]
  slices = [eqn for eqn in readers if eqn.primitive.name != "pallas_call"]
  assert [eqn.primitive.name for eqn in slices] == (["slice"] if feature_map else [])
  mapped_shape = (*qkv.shape[:2], 2, *qkv.shape[3:])
  if feature_map:  # the map's output, one array, is read by the kernels alone
    kernels = [eqn for eqn in flat if eqn.primitive.name == "pallas_call"]
    (mapped,) = {x for eqn in kernels for x in eqn.invars if getattr(x.aval, "shape", None) == mapped_shape}
    assert {eqn.primitive.name for eqn in flat if mapped in eqn.invars} == {"pallas_call"}
  packed_readers = [
    eqn for eqn in flat if any(getattr(x.aval, "shape", None) in (qkv.shape, mapped_shape) for x in eqn.invars)
  ]
  reading = {"linear_attention_grad_qk", "linear_attention_state_scan_reverse"}
  if not config.fused_backward_dv:  # otherwise dv leaves the dq/dk kernel (no decay gradient is taken here)
    reading.add("linear_attention_grad_v")
  assert reading <= {pallas_kernel_name(eqn.params) for eqn in packed_readers if eqn.primitive.name == "pallas_call"}
  (gradient,) = jaxpr.outvars
  (producer,) = [eqn for eqn in flat if gradient in eqn.outvars]
  assert pallas_kernel_name(producer.params) == "linear_attention_grad_qk"


@pytest.mark.parametrize(
  "decay_mode,dtype,packed",
  [("scalar", jnp.float32, False), ("token", jnp.bfloat16, True), ("none", jnp.bfloat16, False)],
)
def test_dv_from_the_dqdk_kernel(decay_mode, dtype, packed):
  # config.fused_backward_dv: with no decay gradient the dq/dk kernel also writes dv (into the packed gradient's
  # third slot when packed), and no dv kernel runs. Gradients of q, k, v and the initial state against the float64
  # recurrence (of SiLU(q), SiLU(k), v when packed), strong decay and documents, the decay a fixed input.
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    16, batch=2, time=120, heads=2, dim_k=32, dim_v=32, decay_mode=decay_mode, strength="strong", dtype=dtype
  )
  d_out, d_state = _cotangents(17, v, (2, 2, 32, 32))
  feature_map = "silu" if packed else None
  _, _, expected = testing.reference_float64(
    q, k, v, log_decay, state, segment_ids, d_out, d_state, feature_map=feature_map
  )
  config = _config(decay_mode, q, fused_backward_dv=True, packed_operands=packed)

  def op(q, k, v, state):
    if packed:
      qkv = jnp.stack([q, k, v], axis=2)
      return gpu.linear_attention_gpu_qkv(qkv, log_decay, state, segment_ids, 16, feature_map, config)
    return gpu.linear_attention_gpu(q, k, v, log_decay, state, segment_ids, 16, config)

  def loss(*args):
    out, final_state = op(*args)
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(final_state * d_state)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, state)
  errors = {
    name: testing.relative_rms_error(got, expected[name]) for name, got in zip(("q", "k", "v", "initial_state"), grads)
  }
  assert max(errors.values()) <= (FP32_BOUND if dtype == jnp.float32 else BF16_BOUND), errors
  launches = pallas_kernel_names(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, state).jaxpr)
  assert "linear_attention_grad_qk" in launches and "linear_attention_grad_v" not in launches


@pytest.mark.parametrize("decay_mode,strength", [("scalar", "weak"), ("vector", "strong")])
def test_no_initial_state_and_unused_final_state(decay_mode, strength):
  # Without an initial state and with the final state unused (its cotangent a symbolic zero), the kernels start
  # from zero without a zero array, here through four segments (the last segment alone stores the fused forward's
  # final state); gradients of Σ o·do against the float64 reference with dS_T = 0. (One fixed decay per head
  # with e^-10-per-step decays and dS_T = 0: 4.8e-4 of error in its gradient, a whole-sequence sum that cancels.)
  q, k, v, log_decay, _, segment_ids = testing.random_inputs(
    12, batch=2, time=120, heads=2, dim_k=32, dim_v=16, decay_mode=decay_mode, strength=strength, initial_state=False
  )
  config = _config(decay_mode, q, min_segment_chunks=2)
  d_out, d_state = _cotangents(13, v, (2, 2, 32, 16))
  expected_out, expected_state, expected_grads = testing.reference_float64(
    q, k, v, log_decay, None, segment_ids, d_out, jnp.zeros_like(d_state)
  )
  op = lambda q, k, v, log_decay: gpu.linear_attention_gpu(q, k, v, log_decay, None, segment_ids, 16, config)
  out, final_state = jax.jit(op)(q, k, v, log_decay)
  loss = lambda *args: jnp.sum(op(*args)[0] * d_out)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, log_decay)
  errors = [testing.relative_rms_error(out, expected_out), testing.relative_rms_error(final_state, expected_state)]
  errors += [
    testing.relative_rms_error(got, expected_grads[name]) for name, got in zip(("q", "k", "v", "log_decay"), grads)
  ]
  assert max(errors) <= FP32_BOUND, errors


def test_unfused_forward_fixed_decay_fp32():
  # The state scan + output kernel forward (the default for per-key-channel decay) with a fixed decay.
  _assert_matches_reference(10, decay_mode="scalar", dim_k=32, dim_v=16, time=72, chunk_size=32, fused_forward=False)


def test_no_decay_bf16_sequence_shorter_than_chunk():
  # T=9 < chunk 64: the chunk shrinks to 16 and most of it is padding; no initial state, no segments.
  _assert_matches_reference(
    3,
    decay_mode="none",
    dim_k=32,
    dim_v=16,
    time=9,
    chunk_size=64,
    dtype=jnp.bfloat16,
    segments=False,
    initial_state=False,
  )


def test_fixed_decay_bf16_without_decay_gradient():
  # TNL's decay is a buffer: with no decay gradient asked for, the backward takes the bf16 path (bf16 states
  # and matmul operands) that the benchmark times.
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    5, batch=1, time=50, heads=2, dim_k=16, dim_v=16, decay_mode="scalar", dtype=jnp.bfloat16
  )
  d_out, _ = _cotangents(6, v, state.shape)
  op = functools.partial(gpu.linear_attention_gpu, chunk_size=16)
  loss = lambda q, k, v: jnp.sum(op(q, k, v, log_decay, state, segment_ids)[0].astype(jnp.float32) * d_out)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  _, _, expected = testing.reference_float64(q, k, v, log_decay, state, segment_ids, d_out, jnp.zeros_like(state))
  for name, grad in zip("qkv", grads):
    assert testing.relative_rms_error(grad, expected[name]) <= BF16_BOUND, name


@pytest.mark.parametrize(
  "bad,message",
  [
    (dict(chunk_size=24), "chunk_size=24; valid: a power of two >= 16"),
    (dict(dim_k=24), "dim_k=24"),
    (dict(dtype=jnp.float64), "float64"),
    (dict(dim_k=256), "float32 inputs with dim_k=256"),  # over the H200's shared memory per block
  ],
)
def test_bad_input_names_the_problem(bad, message):
  dim_k = bad.get("dim_k", 16)
  with jax.enable_x64(True):
    dtype = bad.get("dtype", jnp.float32)
    q = jnp.ones((1, 8, 1, dim_k), dtype)
    v = jnp.ones((1, 8, 1, 16), dtype)
    with pytest.raises((ValueError, TypeError), match=message):
      gpu.linear_attention_gpu(q, q, v, None, None, None, bad.get("chunk_size"))


@pytest.mark.slow  # five interpret-mode kernel gradients, up to 1,024 tokens
def test_bf16_decay_gradient_error_does_not_grow_with_sequence_length():
  """The decay gradient's suffix sum of q·dq − k·dk cancels heavily. Summed over the whole sequence with bf16
  states its error grew with T (9.0e-3 at T=1024 here, 1.7e-1 with bf16 dq/dk operands too); telescoped only to
  each chunk's end it was 2.5e-3 at T=1024 (32-token chunks) while the chunk's stored bf16 leaving state closed
  the sum. With that state written as the entering state carried over plus the chunk's own k·dk terms, the
  one-pass TF32 matmuls of the intra-chunk terms are what is left: 1.2e-3 (the H200 gave 1.19e-3 on
  kernel_timing's accuracy inputs, fla's chunk_gla 3.3e-4) at T=1024, 3.8e-4 with the diagonal blocks' in three
  passes or with the nearest pairs' rounding matched, 2.6e-4 with both."""
  # The defaults at both lengths; the variants, each cutting the error on its own, at the longer one.
  variants = (
    (dict(three_pass_diagonal=False, matched_rounding=False), 1.5e-3),
    (dict(three_pass_diagonal=True, matched_rounding=False), 5e-4),
    (dict(three_pass_diagonal=False, matched_rounding=True), 5e-4),
  )
  for time, cases in ((300, ()), (1024, variants)):
    q, k, v, log_decay, state, segment_ids = testing.random_inputs(
      7, batch=1, time=time, heads=2, dim_k=64, dim_v=32, decay_mode="vector", strength="strong", dtype=jnp.bfloat16
    )
    d_out, d_state = _cotangents(3, v, state.shape)
    _, _, expected = testing.reference_float64(q, k, v, log_decay, state, segment_ids, d_out, d_state)
    for overrides, bound in (*cases, ({}, 3.5e-4)):  # the defaults: both
      config = _config("vector", q, **overrides)
      _, _, grads = _kernel_with_grads(None, q, k, v, log_decay, state, segment_ids, d_out, d_state, config)
      error = testing.relative_rms_error(grads["log_decay"], expected["log_decay"])
      assert error <= bound, (time, overrides, error)


def test_one_pass_matmuls_in_interpret_mode_round_to_tf32():
  """Interpret mode gives one-pass fp32 matmuls the tensor cores' TF32 operands (10-bit mantissa, to nearest), so
  the CPU tests see the GPU's error: against a float64 rounding of the mantissa."""
  x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32) * np.float32(1e3)
  exponent = np.floor(np.log2(np.abs(x.astype(np.float64))))
  step = 2.0 ** (exponent - 10)
  expected = np.sign(x) * np.floor(np.abs(x.astype(np.float64)) / step + 0.5) * step
  np.testing.assert_array_equal(np.asarray(blocks.tf32(jnp.asarray(x)), np.float64), expected)
  identity = jnp.eye(64, dtype=jnp.float32)
  np.testing.assert_array_equal(blocks.matmul(jnp.asarray(x), identity, one_pass=True), blocks.tf32(jnp.asarray(x)))
  np.testing.assert_array_equal(blocks.matmul(jnp.asarray(x), identity), x)


@pytest.mark.parametrize("decay_mode", ["vector", "token", "scalar"])
def test_bf16_decay_gradient_with_an_unrounded_final_state_cotangent(decay_mode):
  """dS_T in fp32 (as a loss on the final state gives it), while the kernels' state gradients are bf16: the last
  chunk's terms must all see dS_T alike. Decay gradient errors with one-pass TF32 intra-chunk terms: 1.3e-3
  (vector; 9.3e-4 with three-pass diagonal blocks), 9.5e-4 (token), against 2.6e-3 and 2.9e-3 with the final
  state's Σ_v S_T·dS_T closing the sum (exact fp32 intra-chunk terms). A fixed decay's gradient, a sum over the whole
  sequence, takes its pair-weighted terms that do not cancel: 1.8e-3 with bf16 states and dq/dk operands (the
  per-row gradients summed gave 1.0e-2 with bf16 states, 4.1e-2 with a bf16-rounded dS_T)."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    5, batch=1, time=200, heads=2, dim_k=64, dim_v=32, decay_mode=decay_mode, strength="strong", dtype=jnp.bfloat16
  )
  rng = np.random.default_rng(3)
  d_out = jnp.asarray(rng.normal(size=v.shape), jnp.bfloat16).astype(jnp.float32)
  d_state = jnp.asarray(rng.normal(size=state.shape), jnp.float32)
  _, _, expected = testing.reference_float64(q, k, v, log_decay, state, segment_ids, d_out, d_state)
  _, _, grads = _kernel_with_grads(None, q, k, v, log_decay, state, segment_ids, d_out, d_state)
  errors = {name: testing.relative_rms_error(grads[name], expected[name]) for name in expected}
  assert errors["log_decay"] <= 2e-3 and max(errors.values()) <= 5e-3, errors


def test_trainable_fixed_decay_near_one_bf16_long_sequence():
  """A trainable fixed decay per head with bf16 inputs: decay 1 − 2^-8 per step over T=1024, so pairs of tokens
  hundreds of steps apart weigh in its gradient, with bf16 states: 4.6e-4 of error in it (2.3e-3 from fp32 states
  with the per-row gradients summed)."""
  q, k, v, _, state, segment_ids = testing.random_inputs(
    7, batch=1, time=1024, heads=2, dim_k=64, dim_v=32, decay_mode="scalar", dtype=jnp.bfloat16, segments=False
  )
  log_decay = jnp.full((2,), np.log1p(-(2.0**-8)), jnp.float32)
  d_out, d_state = _cotangents(3, v, state.shape)
  _, _, expected = testing.reference_float64(q, k, v, log_decay, state, segment_ids, d_out, d_state)
  _, _, grads = _kernel_with_grads(None, q, k, v, log_decay, state, segment_ids, d_out, d_state)
  errors = {name: testing.relative_rms_error(grads[name], expected[name]) for name in expected}
  assert errors.pop("log_decay") <= 1e-3 and max(errors.values()) <= BF16_BOUND, errors


@pytest.mark.parametrize("dtype,bound", [(jnp.float32, FP32_BOUND), (jnp.bfloat16, BF16_BOUND)])
def test_vector_forward_forward_only_matches_reference(dtype, bound):
  """The forward alone (no VJP: the primal rule, as in evaluation) with strong gates, resets inside chunks and
  four sub-chunks per chunk, whose earlier keys go through the per-sub-chunk matmul."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    11, batch=2, time=150, heads=2, dim_k=32, dim_v=16, decay_mode="vector", strength="strong", dtype=dtype
  )
  expected_out, expected_state = testing.reference_float64(
    q, k, v, log_decay, state, segment_ids, jnp.zeros(v.shape), jnp.zeros(state.shape)
  )[:2]
  out, final_state = gpu.linear_attention_gpu(q, k, v, log_decay, state, segment_ids, 64)
  assert testing.relative_rms_error(out, expected_out) <= bound
  assert testing.relative_rms_error(final_state, expected_state) <= bound


def test_auto_backend_falls_back_to_xla_where_the_gpu_blocks_would_not_fit(monkeypatch):
  """float32 with Dk = 256 (cosFormer2) on a GPU: "auto" takes the chunked XLA path instead of failing."""
  from pallas_kernels.linear_attention import api, chunked

  monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
  calls = []
  original = chunked.linear_attention_chunked
  monkeypatch.setattr(chunked, "linear_attention_chunked", lambda *a, **k: calls.append(1) or original(*a, **k))
  q = jnp.ones((1, 8, 1, 256), jnp.float32)
  v = jnp.ones((1, 8, 1, 128), jnp.float32)
  out = api.linear_attention(q, q, v)
  assert calls and out.shape == (1, 8, 1, 128)


@pytest.mark.parametrize(
  "knob,value,error,message",
  [
    ("chunk_size", 48, ValueError, "chunk_size=48; valid: a power of two >= 16"),
    ("key_tile", 8, ValueError, "key_tile=8; valid: a power of two >= 16"),
    ("num_warps", 3, ValueError, r"num_warps=3; valid: one of \(1, 2, 4, 8, 16, 32\)"),
    ("score_levels", 5, ValueError, "score_levels=5; valid: 0 to 4"),
    ("diagonal_span_limit", 61, ValueError, "diagonal_span_limit=61; valid: 0 to 60"),
    ("min_segment_chunks", 0, ValueError, "min_segment_chunks=0; valid: an int >= 1"),
    ("scan_stages", 0, ValueError, "scan_stages=0; valid: an int >= 1"),
    ("segment_programs", -1, ValueError, "segment_programs=-1; valid: an int >= 0"),
    ("fused_forward", 1, TypeError, "fused_forward=1; valid: True or False"),
    ("scan_tile", 64.0, TypeError, "scan_tile=64.0; valid: an int"),
  ],
)
def test_config_rejects_a_bad_knob_naming_it(knob, value, error, message):
  config = gpu.default_config("vector", (1, 64, 1, 16), jnp.bfloat16)
  with pytest.raises(error, match=message):
    dataclasses.replace(config, **{knob: value})


def test_default_config_table():
  """The tuned defaults per decay mode and dtype, equal configurations equal and hashing alike (one compile)."""
  hgrn2 = gpu.default_config("vector", (8, 2048, 16, 128), jnp.bfloat16)
  assert (hgrn2.chunk_size, hgrn2.num_warps, hgrn2.key_tile, hgrn2.key_warps, hgrn2.value_tile) == (64, 4, 64, 4, 128)
  assert hgrn2.split_sub_chunks and not hgrn2.fused_forward and hgrn2.one_pass_tf32
  assert (hgrn2.num_stages, hgrn2.scan_stages, hgrn2.scores_warps, hgrn2.diagonal_span_limit) == (2, 3, 4, 40)
  assert hgrn2.three_pass_diagonal and hgrn2.matched_rounding
  tnl = gpu.default_config("scalar", (8, 2048, 16, 128), jnp.bfloat16)
  assert (tnl.chunk_size, tnl.num_warps, tnl.key_tile, tnl.value_tile) == (64, 4, 128, 128)
  assert tnl.fused_forward and not tnl.split_sub_chunks and tnl.decay_key_tile == 64  # a trainable decay: 64
  assert tnl.scan_stages == 2 and not (tnl.three_pass_diagonal or tnl.matched_rounding)
  assert tnl.fused_forward_states and tnl.fused_backward_dv and tnl.packed_operands  # measured in TNL training
  # The fixed decay's kernels and tuning, without the three options measured only for it.
  token = gpu.default_config("token", (8, 2048, 16, 128), jnp.bfloat16)
  assert token == dataclasses.replace(tnl, fused_forward_states=False, fused_backward_dv=False, packed_operands=False)
  none = gpu.default_config("none", (8, 2048, 16, 128), jnp.bfloat16)
  # cosFormer2 was slower with the first two; packed operands were measured for TNL alone
  assert not (none.fused_forward_states or none.fused_backward_dv or none.packed_operands)
  wide = gpu.default_config("none", (1, 4096, 2, 64), jnp.float32)
  assert (wide.key_tile, wide.value_tile, wide.one_pass_tf32) == (64, 64, False)
  assert gpu.default_config("none", (1, 9, 2, 64), jnp.bfloat16).chunk_size == 16  # shorter than a chunk
  assert hash(hgrn2) == hash(gpu.default_config("vector", (2, 4096, 4, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="mode='gated'; valid: none, scalar, token, vector"):
    gpu.default_config("gated", (1, 64, 1, 16), jnp.bfloat16)


def _kernels_and_warps(closed_jaxpr):
  """(kernel name, warps) of every Pallas launch, in program order."""
  return [
    (pallas_kernel_name(eqn.params), eqn.params["compiler_params"].num_warps)
    for eqn in equations(closed_jaxpr.jaxpr)
    if eqn.primitive.name == "pallas_call"
  ]


def test_config_overrides_change_the_launched_kernels():
  """A config reaches the kernels: its forward form in the launches' names, its warps in their compiler params."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    15, batch=1, time=64, heads=2, dim_k=16, dim_v=16, decay_mode="scalar", dtype=jnp.bfloat16
  )

  def launches(config):
    return _kernels_and_warps(
      jax.make_jaxpr(lambda q: gpu.linear_attention_gpu(q, k, v, log_decay, state, segment_ids, 16, config))(q)
    )

  assert launches(None) == [("linear_attention_fused_forward_states", 4)]
  default = gpu.default_config("scalar", q.shape, q.dtype)
  unfused = dataclasses.replace(default, fused_forward=False, num_warps=8, scan_warps=2)
  assert launches(unfused) == [("linear_attention_state_scan", 2), ("linear_attention_output", 8)]


def test_public_api_overrides_reach_the_kernels_and_are_checked_on_every_backend():
  """`linear_attention(..., gpu_overrides=)` replaces knobs of the tuned defaults: the same launches as that config
  given whole, the same values; a bad knob is refused whatever the backend, before anything runs."""
  q, k, v, log_decay, _, segment_ids = testing.random_inputs(
    17, batch=1, time=64, heads=2, dim_k=16, dim_v=16, decay_mode="scalar", dtype=jnp.bfloat16
  )
  overrides = {"fused_forward": False, "num_warps": 8, "scan_warps": 2}

  def call(**kwargs):
    return api.linear_attention(q, k, v, log_decay, segment_ids=segment_ids, chunk_size=16, **kwargs)

  launched = _kernels_and_warps(jax.make_jaxpr(lambda q: call(backend="pallas_gpu", gpu_overrides=overrides))(q))
  assert launched == [("linear_attention_state_scan", 2), ("linear_attention_output", 8)]
  np.testing.assert_allclose(
    np.asarray(call(backend="pallas_gpu", gpu_overrides=overrides), np.float32),
    np.asarray(call(backend="pallas_gpu"), np.float32),
    rtol=2e-2,
    atol=2e-2,
  )
  for backend in ("xla", "reference", "pallas_gpu"):
    with pytest.raises(ValueError, match="unknown GpuKernelConfig knob 'fused'; valid: .*fused_forward"):
      call(backend=backend, gpu_overrides={"fused": False})


@pytest.mark.parametrize("trainable_decay", [False, True])
def test_dqdk_key_tile_follows_whether_the_decay_gradient_is_taken(trainable_decay):
  """The dq/dk kernel tiles Dk by key_tile, or by decay_key_tile when the decay's gradient is taken."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    16, batch=1, time=64, heads=2, dim_k=64, dim_v=16, decay_mode="scalar", dtype=jnp.bfloat16
  )
  config = dataclasses.replace(gpu.default_config("scalar", q.shape, q.dtype), key_tile=64, decay_key_tile=16)

  def loss(q, log_decay):
    return jnp.sum(gpu.linear_attention_gpu(q, k, v, log_decay, state, segment_ids, 16, config)[0].astype(jnp.float32))

  grad = jax.grad(loss, argnums=(0, 1) if trainable_decay else 0)
  jaxpr = jax.make_jaxpr(grad)(q, log_decay)
  (grid,) = [
    eqn.params["grid_mapping"].grid
    for eqn in equations(jaxpr.jaxpr)
    if eqn.primitive.name == "pallas_call" and pallas_kernel_name(eqn.params) == "linear_attention_grad_qk"
  ]
  assert grid[0] == (64 // 16 if trainable_decay else 64 // 64)


def test_two_pass_scan_updates_and_state_products_cut_the_weak_gate_decay_gradient_error():
  """With weak gates the decay gradient's error is the bf16 rounding of the state scans' decayed keys and queries
  (split_scan_updates) and of the stored per-chunk states and state gradients in do·h and v·dS (fp32 states and
  state gradients with split_state_products): documents crossing chunk boundaries pass through them. Here 1.75e-3
  with none of them, 1.21e-3 with the two-pass scans, 8.3e-4 adding fp32 state gradients, and 2.5e-6 with all:
  the intra-chunk terms are exact to fp32, so nothing else rounds. The initial state's gradient, the reverse
  scan's last state, becomes exact with the two-pass scans; every other output stays within the bf16 bound."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    5,
    batch=1,
    time=300,
    heads=2,
    dim_k=32,
    dim_v=32,
    decay_mode="vector",
    strength="weak",
    dtype=jnp.bfloat16,
    document_start_rate=0.01,
  )
  d_out, d_state = _cotangents(6, v, state.shape)
  expected_out, _, expected = testing.reference_float64(q, k, v, log_decay, state, segment_ids, d_out, d_state)
  errors = []
  for overrides in (
    dict(split_scan_updates=False),
    dict(split_scan_updates=True),
    dict(split_scan_updates=True, fp32_state_grads=True, split_state_products=True),
    dict(split_scan_updates=True, fp32_states=True, fp32_state_grads=True, split_state_products=True),
  ):
    config = _config("vector", q, **overrides)
    out, _, grads = _kernel_with_grads(None, q, k, v, log_decay, state, segment_ids, d_out, d_state, config)
    assert testing.relative_rms_error(out, expected_out) <= BF16_BOUND
    errors.append({name: testing.relative_rms_error(grads[name], expected[name]) for name in expected})
    assert max(errors[-1].values()) <= BF16_BOUND, errors[-1]
  one_pass, two_pass, grads_split, all_split = (e["log_decay"] for e in errors)
  assert two_pass <= 0.75 * one_pass and grads_split <= 0.75 * two_pass and all_split <= 1e-5, errors
  assert errors[0]["initial_state"] > 1e-4 and errors[1]["initial_state"] <= 1e-5, errors


@pytest.mark.parametrize("decay_mode", ["scalar", "token"])
def test_fused_forward_two_pass_updates_make_the_final_state_exact(decay_mode):
  """The fused forward's state update takes the decayed keys in two passes too (split_scan_updates): the final
  state then matches the float64 recurrence to fp32 accumulation (2e-6 here, 1.6e-3 in one pass)."""
  q, k, v, log_decay, state, segment_ids = testing.random_inputs(
    5, batch=1, time=300, heads=2, dim_k=32, dim_v=32, decay_mode=decay_mode, strength="weak", dtype=jnp.bfloat16
  )
  d_out, d_state = _cotangents(6, v, state.shape)
  expected_out, expected_state, _ = testing.reference_float64(q, k, v, log_decay, state, segment_ids, d_out, d_state)
  state_errors = []
  for split in (False, True):
    config = _config(decay_mode, q, split_scan_updates=split)
    assert config.fused_forward
    out, final_state = gpu.linear_attention_gpu(q, k, v, log_decay, state, segment_ids, config=config)
    assert testing.relative_rms_error(out, expected_out) <= BF16_BOUND
    state_errors.append(testing.relative_rms_error(final_state, expected_state))
  assert state_errors[0] > 1e-4 and state_errors[1] <= 1e-5, state_errors
