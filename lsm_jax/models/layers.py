"""Building blocks shared by the four architectures.

Conventions: parameters are created in `param_dtype` (fp32) with normal(0, init_std) (OpenNLPLab's 0.02
for linears and the embedding; norm gains start at one) and carry logical axis names in their sharding
metadata; they are cast to the compute dtype at use. Norms and positional phases are computed in fp32.
Variables are created unsharded (`eager_sharding=False`): the trainer places them by jitting the init with
shardings derived from `nnx.get_partition_spec` under the logical-axis rules of `lsm_jax.sharding`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen, nnx

from pallas_kernels import glu, rms_norm
from pallas_kernels.linear_attention import api as linear_attention_api
from pallas_kernels.linear_attention import common, sequence_parallel


def make_param(rngs: nnx.Rngs, shape, axis_names, *, std: float, dtype, init: str = "normal") -> nnx.Param:
  """An nnx.Param holding normal(0, std), ones or zeros, with logical axis names as sharding metadata."""
  if len(shape) != len(axis_names):
    raise ValueError(f"axis names {axis_names} do not match parameter shape {shape}.")
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  elif init in ("ones", "zeros"):
    value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
  else:
    raise ValueError(f"Unknown init {init!r}; valid: normal, ones, zeros.")
  return nnx.Param(value, out_sharding=tuple(axis_names), eager_sharding=False)


def constrain(x, axis_names):
  """Logical sharding constraint on an activation; a no-op unless logical axis rules and a mesh are set."""
  return linen.with_logical_constraint(x, axis_names)


class Linear(nnx.Module):
  """y = x @ W with W [in_features, *out_shape]; no bias (all OpenNLPLab configs use bias=False)."""

  def __init__(self, in_features: int, out_shape, axis_names, *, std: float, param_dtype, rngs: nnx.Rngs):
    self.out_shape = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (out_shape,)
    self.kernel = make_param(rngs, (in_features, *self.out_shape), axis_names, std=std, dtype=param_dtype)

  def __call__(self, x, dtype):
    kernel = self.kernel[...].astype(dtype)
    out = jnp.dot(x.astype(dtype), kernel.reshape(kernel.shape[0], -1))
    return out.reshape(*x.shape[:-1], *self.out_shape)


def simple_rms_norm(x, eps: float):
  """SRMSNorm: x / sqrt(mean(x^2) + eps) over the last axis, no gain (OpenNLPLab SimpleRMSNorm)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class SRMSNorm(nnx.Module):
  """Parameter-free RMS norm of the linear models (TNL, HGRN2, cosFormer2)."""

  def __init__(self, eps: float, backend: str = "auto"):
    self.eps = eps
    self.backend = backend

  def __call__(self, x):
    return simple_rms_norm(x, self.eps)

  def residual(self, x, delta=None):
    """(s, norm(s)) of the residual stream s = x + delta (x without delta), by the fused kernel of `backend`."""
    return sharded_residual_rms_norm(x, delta, eps=self.eps, backend=self.backend)


class RMSNorm(nnx.Module):
  """RMS norm with a learned gain (LLaMA)."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = make_param(rngs, (dim,), ("embed",), std=0.0, dtype=param_dtype, init="ones")

  def __call__(self, x):
    return simple_rms_norm(x, self.eps) * self.scale[...].astype(x.dtype)

  def residual(self, x, delta=None):
    """(s, norm(s)) of the residual stream s = x + delta (x without delta)."""
    s = x if delta is None else x + delta
    return s, self(s)


class GatedMLP(nnx.Module):
  """GLU channel mixer: (x W_u ⊙ act(x W_v)) W_down. act = SiLU gives SwiGLU (LLaMA); act = identity gives
  SGLU, the activation-free GLU of TNL, HGRN2 and cosFormer2 (paper eqs. 10, 14, 18).

  fused: x W_u and x W_v as one matmul with the two weights stacked at use ([d, 2, ffn], the parameters stay two):
  the backward then takes x's gradient from one matmul instead of summing two. The product's gradient, one array
  of that matmul's layout, comes from `glu_backend` (pallas_kernels.glu)."""

  def __init__(
    self,
    d_model: int,
    ffn_dim: int,
    *,
    swish: bool,
    std: float,
    param_dtype,
    rngs: nnx.Rngs,
    fused: bool = False,
    glu_backend: str = "auto",
  ):
    self.swish = swish
    self.fused = fused
    self.glu_backend = glu_backend
    self.up = Linear(d_model, ffn_dim, ("embed", "mlp"), std=std, param_dtype=param_dtype, rngs=rngs)
    self.gate = Linear(d_model, ffn_dim, ("embed", "mlp"), std=std, param_dtype=param_dtype, rngs=rngs)
    self.down = Linear(ffn_dim, d_model, ("mlp", "embed"), std=std, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, dtype):
    if self.fused:
      # stacked on a new axis, not concatenated along "mlp": a sharded mlp axis keeps its layout
      kernel = jnp.stack([self.up.kernel[...], self.gate.kernel[...]], axis=1).astype(dtype)
      both = jnp.einsum("...d,dkf->...kf", x.astype(dtype), kernel)
      hidden = sharded_glu(both, swish=self.swish, backend=self.glu_backend)
    else:
      up, gate = self.up(x, dtype), self.gate(x, dtype)
      hidden = up * (jax.nn.silu(gate) if self.swish else gate)
    hidden = constrain(hidden, ("activation_batch", "activation_length", "mlp"))
    return self.down(hidden, dtype)


class LowRankOutputGate(nnx.Module):
  """TNL's output gate sigmoid(x W_down W_up) with a d -> rank -> d bottleneck (rank = d/h = 128)."""

  def __init__(self, d_model: int, rank: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    self.down = Linear(d_model, rank, ("embed", "kv"), std=std, param_dtype=param_dtype, rngs=rngs)
    self.up = Linear(rank, d_model, ("kv", "embed"), std=std, param_dtype=param_dtype, rngs=rngs)

  def logits(self, x, dtype):
    return self.up(self.down(x, dtype), dtype)

  def __call__(self, x, dtype):
    return jax.nn.sigmoid(self.logits(x, dtype))


def positions_from_segments(segment_ids):
  """Positions that restart at 0 at every document start: t - (index where its document began)."""
  time = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
  start_index = jax.lax.cummax(jnp.where(common.segment_starts(segment_ids, *segment_ids.shape), time, 0), axis=1)
  return time - start_index


class KernelShards:
  """How the active mesh splits a [B, T, H, D] activation for a Pallas kernel: the mesh axes of batch, length
  and heads (None: not split), each kept only if the dimension divides over it. XLA cannot partition a Pallas
  (Mosaic / Triton) custom call, so kernels run per shard in a shard_map over these axes."""

  def __init__(self, x):
    self.mesh = jax.sharding.get_abstract_mesh()
    self.batch = self.length = self.heads = None
    if not self.sharded:
      return
    batch_axes, length_axes, heads_axes, _ = linen.logical_to_mesh_axes(
      ("activation_batch", "activation_length", "activation_heads", None)
    )
    self.batch = self.usable_axes(batch_axes, x.shape[0])
    self.length = self.usable_axes(length_axes, x.shape[1])
    self.heads = self.usable_axes(heads_axes, x.shape[2])

  def usable_axes(self, axes, size):
    """The mesh axes of `axes` (a name, names or None) larger than one, if `size` divides over them; None
    otherwise: that dimension stays replicated inside the shard_map."""
    mesh = self.mesh
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if mesh.shape.get(a, 1) > 1)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None

  @property
  def sharded(self):
    return not self.mesh.empty and self.mesh.size > 1

  def activation_spec(self):
    return jax.sharding.PartitionSpec(self.batch, None, self.heads, None)

  def segment_spec(self):
    return jax.sharding.PartitionSpec(self.batch, None)

  def attention_specs(self, log_decay, segment_ids, return_final_state):
    """(log_decay's spec, segment_ids' spec, the out_specs) of a linear-attention call per shard."""
    activation = self.activation_spec()
    # no decay, one decay per head [H], one per row and head [B, T, H], or one per row and key channel
    decay_spec = None
    if log_decay is not None:
      decay_spec = {
        1: jax.sharding.PartitionSpec(self.heads),
        3: jax.sharding.PartitionSpec(self.batch, None, self.heads),
      }.get(log_decay.ndim, activation)
    segment_spec = None if segment_ids is None else self.segment_spec()
    state_spec = jax.sharding.PartitionSpec(self.batch, self.heads, None, None)
    return decay_spec, segment_spec, ((activation, state_spec) if return_final_state else activation)

  def per_shard(self, fn, in_specs, out_specs):
    """fn under a shard_map with these specs; check_vma off: pallas_call has no replication rule, the specs
    state the layout exactly."""
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _per_token_shards(fn, backend, *arrays):
  """fn(*arrays) of [B, T, d] activations (None entries allowed) under the active mesh: a Pallas GPU kernel runs
  per shard of batch and length (these norms are independent across tokens). With the channels split over a mesh
  axis (tensor parallelism) the row statistics need a collective, so XLA's form runs instead."""
  mesh = jax.sharding.get_abstract_mesh()
  if backend == "xla" or mesh.empty or mesh.size == 1:
    return fn(*arrays, backend=backend)
  (embed_axes,) = linen.logical_to_mesh_axes(("activation_embed",))
  embed_axes = (embed_axes,) if isinstance(embed_axes, str) else tuple(embed_axes or ())
  if any(mesh.shape.get(axis, 1) > 1 for axis in embed_axes):
    return fn(*arrays, backend="xla")
  x = arrays[0]
  shards = KernelShards(jax.ShapeDtypeStruct((*x.shape[:2], 1, x.shape[-1]), x.dtype))
  spec = jax.sharding.PartitionSpec(shards.batch, shards.length, None)
  present = [a for a in arrays if a is not None]

  def call(*present):
    it = iter(present)
    return fn(*(None if a is None else next(it) for a in arrays), backend=backend)

  out_specs = jax.tree.map(lambda _: spec, jax.eval_shape(call, *present))
  return shards.per_shard(call, (spec,) * len(present), out_specs)(*present)


def sharded_residual_rms_norm(x, delta=None, *, eps, backend="auto"):
  """`pallas_kernels.rms_norm.residual_rms_norm` of [B, T, d] activations under the active mesh: (s, norm(s)) of
  the stream s = x + delta (_per_token_shards)."""
  fn = functools.partial(rms_norm.residual_rms_norm, eps=eps)
  return _per_token_shards(fn, rms_norm.resolve_backend(backend), x, delta)


def sharded_gated_rms_norm(x, gate_logits=None, *, eps, backend="auto"):
  """`pallas_kernels.rms_norm.gated_rms_norm` of [B, T, d] activations under the active mesh: norm(x) ·
  sigmoid(gate_logits), or norm(x) without a gate (_per_token_shards)."""
  fn = functools.partial(rms_norm.gated_rms_norm, eps=eps)
  return _per_token_shards(fn, rms_norm.resolve_backend(backend), x, gate_logits)


def sharded_glu(both, *, swish, backend="auto"):
  """`pallas_kernels.glu.glu` of a fused GLU's projections [B, T, 2, F] under the active mesh: the product is
  elementwise, so a Pallas kernel runs per shard of batch, length and the mlp axis (each shard's F still a multiple
  of 16); XLA's autodiff otherwise."""
  backend = glu.resolve_backend(backend)
  mesh = jax.sharding.get_abstract_mesh()
  if backend == "xla" or mesh.empty or mesh.size == 1:
    return glu.glu(both, swish=swish, backend=backend)
  shards = KernelShards(jax.ShapeDtypeStruct((*both.shape[:2], 1, both.shape[-1]), both.dtype))
  (mlp_axes,) = linen.logical_to_mesh_axes(("mlp",))
  mlp = shards.usable_axes(mlp_axes, both.shape[-1])
  width = both.shape[-1] // (math.prod(mesh.shape[a] for a in mlp) if mlp else 1)
  if width % 16:
    return glu.glu(both, swish=swish, backend="xla")

  def per_shard(both):
    return glu.glu(both, swish=swish, backend=backend)

  spec = jax.sharding.PartitionSpec(shards.batch, shards.length, None, mlp)
  out_spec = jax.sharding.PartitionSpec(shards.batch, shards.length, mlp)
  return shards.per_shard(per_shard, (spec,), out_spec)(both)


def sharded_linear_attention(
  q,
  k,
  v,
  log_decay=None,
  *,
  segment_ids=None,
  return_final_state=False,
  backend="auto",
  chunk_size=None,
  gpu_overrides=None,
):
  """`pallas_kernels.linear_attention` under the active mesh: sequence-parallel or per-shard Pallas kernels.

  When `activation_length` maps to a mesh axis of > 1 devices that divides the time length (sequence
  parallelism), every backend runs `sequence_parallel_linear_attention`: each shard computes its time slice
  and the shards exchange their states, so the result equals the unsharded op. Otherwise the Pallas backends
  run per shard (KernelShards: batch over the `activation_batch` mesh axes, heads over `activation_heads`; the op
  is independent across both), while the "xla" and "reference" backends stay plain JAX for GSPMD to partition.
  """
  backend = linear_attention_api.resolve_backend(backend)
  call = (
    lambda *args: linear_attention_api.linear_attention(  # noqa: E731
      *args[:4],
      segment_ids=args[4],
      return_final_state=return_final_state,
      backend=backend,
      chunk_size=chunk_size,
      gpu_overrides=gpu_overrides,
    )
  )
  shards = KernelShards(q)
  if not shards.sharded:
    return call(q, k, v, log_decay, segment_ids)
  if shards.length is not None:
    if len(shards.length) != 1:
      raise ValueError(f"sequence parallelism needs activation_length on one mesh axis; got {shards.length}.")
    return sequence_parallel.sequence_parallel_linear_attention(
      q,
      k,
      v,
      log_decay,
      mesh=shards.mesh,
      sequence_axis=shards.length[0],
      batch_axis=shards.batch,
      head_axis=shards.heads,
      segment_ids=segment_ids,
      return_final_state=return_final_state,
      backend=backend,
      chunk_size=chunk_size,
      gpu_overrides=gpu_overrides,
    )
  if not backend.startswith("pallas"):
    return call(q, k, v, log_decay, segment_ids)
  activation = shards.activation_spec()
  decay_spec, segment_spec, out_specs = shards.attention_specs(log_decay, segment_ids, return_final_state)
  return shards.per_shard(call, (activation, activation, activation, decay_spec, segment_spec), out_specs)(
    q, k, v, log_decay, segment_ids
  )


def sharded_linear_attention_qkv(
  qkv,
  log_decay=None,
  *,
  feature_map=None,
  segment_ids=None,
  return_final_state=False,
  backend="auto",
  chunk_size=None,
  gpu_overrides=None,
):
  """`pallas_kernels.linear_attention.linear_attention_qkv` (qkv [B, T, 3, H, D]: q, k, v packed, φ = feature_map
  on q and k) under the active mesh. The Pallas GPU kernels take the packed projection per shard (batch and
  heads, as in sharded_linear_attention); every other case (other backends, sequence parallelism) slices q, k, v,
  maps q and k and runs sharded_linear_attention."""
  backend = linear_attention_api.resolve_backend(backend)
  batch, time, _, heads, dim = qkv.shape
  shards = KernelShards(jax.ShapeDtypeStruct((batch, time, heads, dim), qkv.dtype))
  if backend != "pallas_gpu" or shards.length is not None:
    q, k, v = common.mapped_slices(qkv, feature_map)
    return sharded_linear_attention(
      q,
      k,
      v,
      log_decay,
      segment_ids=segment_ids,
      return_final_state=return_final_state,
      backend=backend,
      chunk_size=chunk_size,
      gpu_overrides=gpu_overrides,
    )

  def call(qkv, log_decay, segment_ids):
    return linear_attention_api.linear_attention_qkv(
      qkv,
      log_decay,
      feature_map=feature_map,
      segment_ids=segment_ids,
      return_final_state=return_final_state,
      backend=backend,
      chunk_size=chunk_size,
      gpu_overrides=gpu_overrides,
    )

  if not shards.sharded:
    return call(qkv, log_decay, segment_ids)
  packed = jax.sharding.PartitionSpec(shards.batch, None, None, shards.heads, None)
  decay_spec, segment_spec, out_specs = shards.attention_specs(log_decay, segment_ids, return_final_state)
  return shards.per_shard(call, (packed, decay_spec, segment_spec), out_specs)(qkv, log_decay, segment_ids)
