"""The Pallas kernels lowered for their hardware on a CPU-only machine. Interpret mode runs a kernel's body as jax
ops, so it cannot tell whether Pallas's Triton (GPU) or Mosaic (TPU) lowering accepts it; lowering for the "cuda"
or "tpu" platform runs that lowering without the device, for every launch of the forward and the backward."""

import dataclasses
import importlib
import pkgutil
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from lsm_jax import losses
from lsm_jax.models import build_model, get_config
from pallas_kernels.attention import flash
from pallas_kernels.cross_entropy import gpu as cross_entropy_gpu
from pallas_kernels.glu import gpu as glu_gpu
from pallas_kernels.linear_attention import gpu, tpu
from pallas_kernels.linear_attention.gpu.forward import FUSED_FORWARD_STATES
from pallas_kernels.rms_norm import gpu as rms_norm_gpu

BATCH, TIME, HEADS = 1, 100, 2  # T not a multiple of the chunk: the padded path


@pytest.fixture
def lowering_for_the_gpu(monkeypatch):
  """The kernels' interpret-mode switch turned off, as on a GPU."""
  modules = [importlib.import_module(f"{gpu.__name__}.{info.name}") for info in pkgutil.iter_modules(gpu.__path__)]
  for module in [*modules, flash, rms_norm_gpu, cross_entropy_gpu, glu_gpu]:
    if hasattr(module, "interpret_mode"):
      monkeypatch.setattr(module, "interpret_mode", lambda: False)


def lowered_kernel_names(fn, *args, platform="cuda"):
  """Names of the Pallas kernels in fn's lowering for `platform` ("cuda": each lowered to Triton IR on the way;
  "tpu": to Mosaic)."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  if platform == "cuda":
    assert "__gpu$xla.gpu.triton" in text
    return set(
      re.findall(
        r"linear_attention_[a-z_]+|flash_attention_[a-z_]+|rms_norm_(?:gated_)?(?:forward|backward)|cross_entropy_[a-z_]+"
        r"|glu_gradient",
        text,
      )
    )
  return set(re.findall(r'kernel_name = "([A-Za-z_]+)"', text))


def spec(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def linear_attention_gradients(op, decay_mode, dtype, dim):
  """(value-and-grad fn, abstract args) of Σ o + Σ S_T through `op` (a backend's linear_attention(q, k, v, log_decay,
  initial_state, segment_ids)) with documents, an initial state and every gradient: q, k, v, the initial state and
  any decay (HGRN2's, a per-token one, a trainable TNL decay)."""
  q = spec(BATCH, TIME, HEADS, dim, dtype=dtype)
  decay_shape = {"none": None, "scalar": (HEADS,), "token": (BATCH, TIME, HEADS), "vector": q.shape}[decay_mode]

  def loss(q, k, v, log_decay, initial_state, segment_ids):
    out, final_state = op(q, k, v, log_decay, initial_state, segment_ids)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final_state)

  args = (
    q,
    q,
    q,
    None if decay_shape is None else spec(*decay_shape, dtype=jnp.float32),
    spec(BATCH, HEADS, dim, dim, dtype=jnp.float32),
    spec(BATCH, TIME, dtype=jnp.int32),
  )
  # The loss is returned too, as a train step does: otherwise the forward kernel may be eliminated as unused.
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4) if decay_shape else (0, 1, 2, 4)), args


BACKWARD = {"linear_attention_state_scan_reverse", "linear_attention_grad_v", "linear_attention_grad_qk"}


@pytest.mark.parametrize(
  "decay_mode,dtype,overrides",
  [
    ("none", jnp.bfloat16, {}),
    ("scalar", jnp.bfloat16, {}),
    ("scalar", jnp.bfloat16, {"fused_forward": False}),
    ("scalar", jnp.bfloat16, {"fused_forward_states": True}),
    ("none", jnp.bfloat16, {"fused_backward_dv": True}),
    ("token", jnp.bfloat16, {}),
    ("vector", jnp.bfloat16, {}),
    ("vector", jnp.bfloat16, {"split_sub_chunks": False, "score_levels": 0}),
    ("vector", jnp.bfloat16, {"three_pass_diagonal": True}),
    ("vector", jnp.bfloat16, {"matched_rounding": True}),
    ("vector", jnp.float32, {}),
  ],
)
def test_linear_attention_lowers_to_triton(lowering_for_the_gpu, decay_mode, dtype, overrides):
  config = dataclasses.replace(gpu.default_config(decay_mode, (BATCH, TIME, HEADS, 64), dtype), **overrides)

  def op(*inputs):
    return gpu.linear_attention_gpu(*inputs, None, config)

  gradients, args = linear_attention_gradients(op, decay_mode, dtype, 64)
  names = lowered_kernel_names(gradients, *args)
  fused = FUSED_FORWARD_STATES if config.fused_forward_states else "linear_attention_fused_forward"
  forward = {fused} if config.fused_forward else {"linear_attention_output"}
  if decay_mode == "vector":
    forward |= {"linear_attention_intra_scores", "linear_attention_chunk_sums"}
  # without a decay gradient (no decay) fused_backward_dv takes dv into the dq/dk kernel
  backward = BACKWARD - {"linear_attention_grad_v"} if config.fused_backward_dv and decay_mode == "none" else BACKWARD
  assert forward | backward <= names, names


@pytest.mark.parametrize(
  "decay_mode,overrides",
  [
    ("scalar", {}),
    ("token", {"fused_forward_states": True}),
    ("none", {"fused_forward": False}),
    ("none", {"fused_backward_dv": True}),
  ],
)
def test_packed_operands_lower_to_triton(lowering_for_the_gpu, decay_mode, overrides):
  """The kernels reading v in place from the packed projection and q, k from the SiLU's packed output (slot
  BlockSpecs of 5-D arrays), and writing dq and dk, through the SiLU's gradient from the raw rows, into the packed
  gradient that the dv kernel allocated (an aliased [C, 2, W] block)."""
  shape = (BATCH, TIME, HEADS, 64)
  config = dataclasses.replace(gpu.default_config(decay_mode, shape, jnp.bfloat16), packed_operands=True, **overrides)

  def op(q, k, v, *inputs):
    return gpu.linear_attention_gpu_qkv(jnp.stack([q, k, v], axis=2), *inputs, None, "silu", config)

  gradients, args = linear_attention_gradients(op, decay_mode, jnp.bfloat16, 64)
  names = lowered_kernel_names(gradients, *args)
  dv_kernel = not config.fused_backward_dv or decay_mode != "none"  # fused_backward_dv: dv from the dq/dk kernel
  assert BACKWARD - ({"linear_attention_grad_v"} if not dv_kernel else set()) <= names, names
  assert ("linear_attention_grad_v" in names) == dv_kernel


@pytest.mark.parametrize("decay_mode", ["none", "scalar", "token", "vector"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_linear_attention_lowers_to_mosaic(decay_mode, dtype):
  def op(*inputs):
    return tpu.linear_attention_tpu(*inputs, None)

  gradients, args = linear_attention_gradients(op, decay_mode, dtype, 128)
  names = lowered_kernel_names(gradients, *args, platform="tpu")
  assert {"_forward_kernel", "_backward_dq_kernel", "_backward_dkv_kernel"} <= names, names


def test_flash_attention_with_documents_lowers_to_triton(lowering_for_the_gpu):
  q = spec(BATCH, 256, HEADS, 64)

  def loss(q, k, v, segment_ids):
    return jnp.sum(flash.flash_attention(q, k, v, segment_ids, causal=True).astype(jnp.float32))

  names = lowered_kernel_names(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, spec(BATCH, 256, dtype=jnp.int32))
  assert {"flash_attention_forward", "flash_attention_dkv", "flash_attention_dq"} <= names, names


@pytest.mark.parametrize(
  "platform,compiler_params,shape",
  [("cuda", pltriton.CompilerParams(num_warps=4), (16, 16)), ("tpu", pltpu.CompilerParams(), (8, 128))],
)
def test_an_unsupported_primitive_fails_the_lowering(lowering_for_the_gpu, platform, compiler_params, shape):
  """The check has teeth: a kernel the backend cannot take (a sort) is refused at lowering, with no device."""

  def kernel(x_ref, o_ref):
    o_ref[...] = jnp.sort(x_ref[...], axis=0)

  def sort_rows(x):
    return pl.pallas_call(kernel, out_shape=x, compiler_params=compiler_params)(x)

  with pytest.raises(NotImplementedError, match="Unimplemented primitive in Pallas .* lowering.*: sort"):
    lowered_kernel_names(sort_rows, spec(*shape, dtype=jnp.float32), platform=platform)


@pytest.mark.parametrize("arch", ["tnl", "hgrn2", "cosformer2", "llama"])
@pytest.mark.parametrize("remat_policy", ["none", "dots_and_mixer_kernels_saveable"])
def test_models_lower_with_their_gpu_kernels(lowering_for_the_gpu, arch, remat_policy):
  """A training step's loss and gradients of each architecture as a GPU host runs it (its "auto" kernels resolved
  for the GPU: the Pallas linear-attention and flash-attention kernels), scanned layers and documents."""
  tiny = dict(num_layers=2, d_model=128, num_heads=2, head_dim=64, ffn_dim=128, vocab_size=64)
  config = get_config(
    arch, "70m", remat_policy=remat_policy, norm_backend="pallas_gpu", glu_backend="pallas_gpu", fused_mlp=True, **tiny
  ).resolved_for("gpu")
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, tokens, segment_ids):
    logits = nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids)
    return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 3])

  tokens = spec(2, TIME, dtype=jnp.int32)
  names = lowered_kernel_names(jax.grad(loss), params, tokens, tokens)
  kernel = "flash_attention_forward" if arch == "llama" else "linear_attention_grad_qk"
  assert config.linear_attention_backend == "pallas_gpu" and kernel in names, names
  # LLaMA's norms have a gain and stay XLA's; the others' run the fused kernels both ways when asked to.
  norms = {"rms_norm_forward", "rms_norm_backward", "rms_norm_gated_forward", "rms_norm_gated_backward"}
  assert norms.isdisjoint(names) if arch == "llama" else norms <= names, names
  assert "glu_gradient" in names, names  # the fused GLU's product gradient (SwiGLU for LLaMA, SGLU otherwise)


@pytest.mark.parametrize("width", [1536, 256])
@pytest.mark.parametrize("with_delta", [True, False])
def test_rms_norm_lowers_to_triton(lowering_for_the_gpu, width, with_delta):
  """The residual and the gated norm's kernels (with_delta: with a delta and a gate), with a row wider than a
  power of two (1536: loaded as 2048, masked) and one that is."""
  x = spec(3, 8, width)

  def loss(x, delta):
    s, y = rms_norm_gpu.residual_rms_norm_gpu(x, delta, eps=1e-6)
    return jnp.sum(s.astype(jnp.float32)) + jnp.sum(y.astype(jnp.float32))

  names = lowered_kernel_names(
    jax.value_and_grad(loss, argnums=(0, 1) if with_delta else 0), x, x if with_delta else None
  )
  assert names == {"rms_norm_forward", "rms_norm_backward"}, names

  def gated_loss(x, gate_logits):
    return jnp.sum(rms_norm_gpu.gated_rms_norm_gpu(x, gate_logits, eps=1e-6).astype(jnp.float32))

  gate = x if with_delta else None
  names = lowered_kernel_names(jax.value_and_grad(gated_loss, argnums=(0, 1) if with_delta else 0), x, gate)
  assert names == {"rms_norm_gated_forward", "rms_norm_gated_backward"}, names


@pytest.mark.parametrize("row_splits", [1, 4])
def test_the_loss_kernels_lower_to_triton(lowering_for_the_gpu, monkeypatch, row_splits):
  """The fused loss's value and gradients with its row statistics and softmax gradient by the Pallas kernels: a
  vocabulary of 100,280 (the paper's), walked in masked column blocks, bf16 logits; one or several programs per
  row of the statistics."""
  monkeypatch.setattr(cross_entropy_gpu, "DEFAULT_CONFIG", cross_entropy_gpu.RowStatsConfig(row_splits=row_splits))

  class Head:
    def head(self):
      return jnp.zeros((100280, 64), jnp.float32), jnp.bfloat16

  def loss(hidden, targets):
    return losses.masked_cross_entropy_sums(
      Head(), hidden, targets, jnp.ones(targets.shape), 8, "bfloat16", "pallas_gpu"
    )[0]

  names = lowered_kernel_names(jax.value_and_grad(loss), spec(2, 16, 64), spec(2, 16, dtype=jnp.int32))
  assert names == {"cross_entropy_row_stats", "cross_entropy_softmax_gradient"}, names
