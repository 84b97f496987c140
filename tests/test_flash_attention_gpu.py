"""Flash attention (Pallas GPU kernels, interpret mode on CPU) against jax.nn.dot_product_attention (XLA) with
the dense causal + document mask: outputs and the gradients of q, k, v, in float32 (tight) and 16 bits
(bounds), over packed documents (boundaries inside and on blocks, single-token documents), unsorted ids, one
document, no ids, grouped-query heads with D = 128, no causal mask; T = 72 is no multiple of the blocks (the op
pads). The block ranges the kernels loop over skip the blocks the mask hides. Last, LLaMA's "pallas_gpu"
attention against its "xla" attention.

Shapes are tiny and cases share compiled functions (interpret mode compiles slowly, runs fast)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_tools import pallas_kernel_names

from lsm_jax.models import build_model, get_config
from pallas_kernels.attention import FlashConfig, block_ranges, default_config, flash_attention

BATCH, TIME, HEADS = 2, 72, 2
# Unequal forward blocks and backward blocks of their own: the ranges of every kernel differ.
CONFIG = FlashConfig(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
FP32_BOUND = 1e-5
BF16_BOUND = 2e-2


def _ids(starts):
  """[B, T] segment ids from each row's document starts."""
  ids = np.zeros((len(starts), TIME), np.int32)
  for row, row_starts in enumerate(starts):
    for start in row_starts:
      ids[row, start:] += 1
  return ids


LAYOUTS = {
  # Boundaries inside blocks and on one (16), single-token documents (29, 30, the last token), a long last one.
  "documents": _ids([(0, 5, 16, 29, 30, 31, 50, 71), (0, 40)]),
  "one_document": np.zeros((BATCH, TIME), np.int32),
  # Ids need not be sorted (padding 0 after a document, a document in two pieces): the ranges stay exact.
  "unsorted": np.stack([np.repeat([2, 1, 0], [30, 30, 12]), np.repeat([1, 0, 1], [10, 50, 12])]).astype(np.int32),
}


def _inputs(seed, heads=HEADS, kv_heads=HEADS, dim=64, dtype=jnp.float32):
  """q, k, v and the output cotangent, bf16-representable so that every dtype sees the same values."""
  rng = np.random.default_rng(seed)
  draw = lambda h: jnp.asarray(rng.normal(size=(BATCH, TIME, h, dim)), jnp.bfloat16).astype(dtype)  # noqa: E731
  return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def _reference(q, k, v, segment_ids, causal):
  mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


@functools.lru_cache(maxsize=None)
def _with_grads(attention, causal, config):
  """jit of (output, (dq, dk, dv)) of Σ attention(q, k, v)·do; cached so that cases of one shape compile once."""

  def run(q, k, v, segment_ids, d_out):
    def op(q, k, v):
      if attention == "xla":
        return _reference(q, k, v, segment_ids, causal)
      return flash_attention(q, k, v, segment_ids, causal=causal, config=config)

    out, vjp = jax.vjp(op, q, k, v)
    return out, vjp(d_out.astype(out.dtype))

  return jax.jit(run)


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.sqrt(np.mean((actual - expected) ** 2) / np.mean(expected**2))


def _compare(inputs, segment_ids, bound, causal=True, config=CONFIG, message=""):
  q, k, v, d_out = inputs
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  full = lambda x: x.astype(jnp.float32)  # noqa: E731
  expected = _with_grads("xla", causal, None)(full(q), full(k), full(v), segment_ids, d_out)
  actual = _with_grads("pallas", causal, config)(q, k, v, segment_ids, d_out)
  for name, a, e in zip(("o", "dq", "dk", "dv"), (actual[0], *actual[1]), (expected[0], *expected[1])):
    assert a.dtype == q.dtype and a.shape == e.shape, (message, name)
    error = _relative_error(a, e)
    assert error <= bound, f"{message} {name}: relative RMS error {error:.2e} > {bound:.0e}"


def test_documents_match_xla_in_float32():
  # One test for every layout: they share one compiled function (a parametrized test could compile it on each
  # pytest-xdist worker).
  for layout in sorted(LAYOUTS):
    _compare(_inputs(0), LAYOUTS[layout], FP32_BOUND, message=layout)


def test_no_segment_ids_match_xla_in_float32():
  _compare(_inputs(1), None, FP32_BOUND)


def test_bfloat16_matches_float32_xla_within_bounds():
  _compare(_inputs(2, dtype=jnp.bfloat16), LAYOUTS["documents"], BF16_BOUND)


def test_float16_grouped_query_heads_head_dim_128_match_within_bounds():
  # Four query heads on two key/value heads: dk and dv sum over each pair.
  _compare(_inputs(3, heads=4, kv_heads=2, dim=128, dtype=jnp.float16), LAYOUTS["documents"], BF16_BOUND)


def test_non_causal_matches_xla():
  # Without the causal mask the padded keys (T = 72 -> 96) are hidden by a segment id of their own, which also
  # lets the last key block be skipped by the query blocks before it.
  _compare(_inputs(4), None, FP32_BOUND, causal=False)


def test_block_ranges_skip_hidden_blocks():
  ids = jnp.asarray(np.pad(LAYOUTS["documents"], [(0, 0), (0, 24)], mode="edge"))  # padded to 96 as the op does
  ranges = jax.jit(block_ranges, static_argnums=(1, 2, 3, 4, 5))  # one compile, not one per operation
  first, end = ranges(ids, 96, 32, 16, True)
  causal_first, causal_end = ranges(None, 96, 32, 16, True)
  np.testing.assert_array_equal(causal_first, [[0, 0, 0]])
  np.testing.assert_array_equal(causal_end, [[2, 4, 6]])
  # Row 0: queries 64-95 are in the documents from 50 and 71 on, so key blocks 0-2 (keys 0-47) are skipped;
  # queries 32-63 start in the document 31-49: key block 0 is skipped. Row 1: queries 64-95 are all in the
  # document from 40 on: key blocks 0-1 are skipped.
  np.testing.assert_array_equal(first, [[0, 1, 3], [0, 0, 2]])
  np.testing.assert_array_equal(end, causal_end[0][None].repeat(2, 0))
  # The dk/dv kernel's query ranges per 32-key block (16-query steps): keys 0-31 of row 0 end at the document
  # 31-49, whose last query is in query block 3 (48-63); row 1's first document ends at 39 (query block 2).
  first, end = ranges(ids, 96, 16, 32, True, True)
  np.testing.assert_array_equal(first, [[0, 2, 4], [0, 2, 4]])
  np.testing.assert_array_equal(end, [[4, 5, 6], [3, 6, 6]])


def test_bad_inputs_are_refused():
  q = jnp.zeros((1, 32, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="head_dim 64 or 128"):
    flash_attention(q[..., :32], q[..., :32], q[..., :32])
  with pytest.raises(ValueError, match="one dtype"):
    flash_attention(q, q.astype(jnp.bfloat16), q)
  with pytest.raises(ValueError, match="one dtype"):
    flash_attention(q.astype(jnp.int32), q.astype(jnp.int32), q.astype(jnp.int32))
  with pytest.raises(ValueError, match="multiple of k and v's heads"):
    flash_attention(q, q[:, :, :1].repeat(3, 2), q[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match="self-attention"):
    flash_attention(q, q[:, :16], q[:, :16])
  with pytest.raises(ValueError, match="segment_ids of shape"):
    flash_attention(q, q, q, jnp.zeros((1, 16), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids of shape"):
    flash_attention(q, q, q, jnp.zeros((1, 32), jnp.float32))
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    FlashConfig(block_q=48)
  with pytest.raises(ValueError, match="num_warps must be"):
    FlashConfig(num_warps=3)


def test_default_config_and_short_sequences():
  assert default_config(128, jnp.bfloat16).num_warps == 8 and default_config(64, jnp.bfloat16).num_warps == 4
  assert default_config(128, jnp.float32).block_q == 64
  fitted = default_config(64, jnp.bfloat16).fitted(40)  # blocks capped at 64, T padded to 64
  assert (fitted.block_q, fitted.block_k, fitted.multiple) == (64, 64, 64)


def test_llama_pallas_gpu_attention_matches_xla():
  tiny = dict(num_layers=1, d_model=128, num_heads=2, head_dim=64, ffn_dim=96, vocab_size=64, dtype="float32")
  ids = jnp.asarray(LAYOUTS["documents"])
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, ids.shape), jnp.int32)

  def loss_and_grads(attention_impl):
    model = build_model(get_config("llama", "70m", attention_impl=attention_impl, **tiny), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens, segment_ids=ids)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(logits**2)

    step = jax.value_and_grad(loss)
    return jax.jit(step)(params), pallas_kernel_names(jax.make_jaxpr(step)(params).jaxpr)

  (loss, grads), kernels = loss_and_grads("pallas_gpu")
  (loss_ref, grads_ref), reference_kernels = loss_and_grads("xla")
  assert sorted(kernels) == ["flash_attention_dkv", "flash_attention_dq", "flash_attention_forward"]
  assert reference_kernels == []
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref)
