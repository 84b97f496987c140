"""Device mesh and the single logical-axis → mesh-axis rule table.

Models annotate every parameter with logical axis names (`embed, mlp, heads, kv, vocab, layers`) and constrain
activations with `activation_*` names; this module is the only place that says which mesh axis each name lands
on. The mesh has the axes (data, sequence, fsdp, tensor); every axis is always present (size 1 when unused), so
rules and specs never depend on the configuration. `sequence` splits the time axis of activations and batches
(sequence parallelism of the linear models: lsm_jax.models.layers.sharded_linear_attention).
"""

import contextlib
import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Outermost to innermost (jax.make_mesh puts the last axes on the closest devices): tensor and fsdp move the
# most bytes per layer; sequence exchanges only per-shard states [B,H,Dk,Dv]; data all-reduces once per step.
MESH_AXES = ("data", "sequence", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")
SEQUENCE_MESH_AXIS = "sequence"

# FSDP shards the model dimension of every weight; tensor parallelism (Megatron style) shards heads, FFN and
# vocabulary, so hidden activations between blocks stay replicated over `tensor`.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  # weights
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("layers", None),
  # activations
  ("activation_batch", BATCH_MESH_AXES),
  ("activation_length", SEQUENCE_MESH_AXIS),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
)
LOGICAL_AXIS_NAMES = tuple(name for name, _ in LOGICAL_AXIS_RULES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; at most one may be -1, meaning "all remaining devices".

  `sequence` > 1 splits the time axis (sequence parallelism): seq_len must be divisible by it, and the linear
  models exchange states between the shards; see gin/mesh/sequence.gin.
  `num_devices`: use only the first n devices (None: all), e.g. one device for debugging.
  """

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  sequence: int = 1
  num_devices: int | None = None

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 filled in; raises if they cannot tile `num_devices`."""
    sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
    for axis, size in sizes.items():
      if not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(f"mesh axis {axis}={size!r} is invalid: use a positive integer or -1 (fill)")
    fill_axes = [axis for axis, size in sizes.items() if size == -1]
    if len(fill_axes) > 1:
      raise ValueError(f"mesh axes {fill_axes} are all -1; at most one axis may fill the remaining devices")
    fixed_product = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % fixed_product:
      raise ValueError(f"mesh {sizes} needs a multiple of {fixed_product} devices, but there are {num_devices}")
    if fill_axes:
      sizes[fill_axes[0]] = num_devices // fixed_product
    elif fixed_product != num_devices:
      raise ValueError(
        f"mesh {sizes} has {fixed_product} devices, but there are {num_devices}; set one axis to -1 to fill"
      )
    return sizes


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all, or the first config.num_devices) with Auto axes, so jit's in/out
  shardings drive GSPMD."""
  devices = list(jax.devices() if devices is None else devices)
  if config.num_devices is not None:
    if not 1 <= config.num_devices <= len(devices):
      raise ValueError(
        f"MeshConfig.num_devices={config.num_devices} must lie in 1..{len(devices)} (the devices available)"
      )
    devices = devices[: config.num_devices]
  sizes = config.resolve(len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  if len(devices) == len(jax.devices()):
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _as_axis_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_mesh_spec(
  logical_names: Sequence[str | None],
  shape: Sequence[int] | None = None,
  mesh: Mesh | None = None,
  rules=LOGICAL_AXIS_RULES,
) -> PartitionSpec:
  """PartitionSpec for one array annotated with logical axis names.

  With `shape` and `mesh`, a dimension that the mapped mesh axes do not divide stays replicated (e.g. 2 heads
  on tensor=4), and a mesh axis already used by an earlier dimension is not reused.
  """
  rule_map = dict(rules)
  if shape is not None and len(shape) != len(logical_names):
    raise ValueError(f"logical axes {tuple(logical_names)} do not match array rank {len(shape)} (shape {tuple(shape)})")
  used_axes: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_names):
    if name is None:
      spec.append(None)
      continue
    if name not in rule_map:
      raise ValueError(f"unknown logical axis name {name!r}; valid names: {', '.join(LOGICAL_AXIS_NAMES)}")
    mesh_axes = tuple(axis for axis in _as_axis_tuple(rule_map[name]) if axis not in used_axes)
    if mesh is not None:
      mesh_axes = tuple(axis for axis in mesh_axes if axis in mesh.shape and mesh.shape[axis] > 1)
      if shape is not None and mesh_axes and shape[dim] % math.prod(mesh.shape[a] for a in mesh_axes):
        logging.info(
          "dimension %d (%s, size %d) is not divisible by mesh axes %s; keeping it replicated",
          dim,
          name,
          shape[dim],
          mesh_axes,
        )
        mesh_axes = ()
    used_axes.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names an nnx variable was annotated with (any flax spelling), or None."""
  metadata = variable.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if metadata.get(key):
      return tuple(metadata[key])
  return None


def state_partition_specs(state: nnx.State, mesh: Mesh) -> dict:
  """Pure dict (same structure as `state.to_pure_dict()`) of PartitionSpecs from the variables' annotations."""

  def spec_of(variable):
    names = variable_logical_axes(variable)
    shape = variable.get_value().shape
    if names is None:
      return variable.replace(PartitionSpec())
    return variable.replace(logical_to_mesh_spec(names, shape, mesh))

  specs = jax.tree.map(spec_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return specs.to_pure_dict()


def named_shardings(spec_tree, mesh: Mesh):
  """Maps a tree of PartitionSpecs to NamedShardings on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def like_tree_shardings(tree, reference_shardings: Mapping, reference_tree, mesh: Mesh):
  """Shardings for `tree` (e.g. optimizer state) whose leaves mirror leaves of `reference_tree` (params).

  A leaf takes the sharding of the reference leaf whose key path is a suffix of its own and whose shape matches
  (optax keeps mu/nu as copies of the parameter tree); everything else (counters, scalars) is replicated.
  """
  reference_paths = {}
  for (path, leaf), sharding in zip(
    jax.tree_util.tree_flatten_with_path(reference_tree)[0], jax.tree.leaves(reference_shardings)
  ):
    reference_paths[tuple(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def sharding_for(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      match = reference_paths.get(path[start:])
      if match is not None and tuple(match[0]) == tuple(leaf.shape):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_for, tree)


def sequence_shards(mesh: Mesh) -> int:
  return mesh.shape.get(SEQUENCE_MESH_AXIS, 1)


def batch_spec(mesh: Mesh) -> PartitionSpec:
  """[batch, length] arrays: batch split over data × fsdp, length over `sequence` when it has > 1 device."""
  return PartitionSpec(BATCH_MESH_AXES, SEQUENCE_MESH_AXIS if sequence_shards(mesh) > 1 else None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_MESH_AXES)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "global batch size") -> None:
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(
      f"{what} {batch_size} is not divisible by data × fsdp = "
      f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {shards} batch shards of the mesh"
    )


def check_sequence_divisible(seq_len: int, mesh: Mesh, what: str = "seq_len") -> None:
  shards = sequence_shards(mesh)
  if seq_len % shards:
    raise ValueError(
      f"{what} {seq_len} is not divisible by the {shards} devices of mesh axis "
      f"{SEQUENCE_MESH_AXIS!r}; use a seq_len that is a multiple of {shards}"
    )


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Mesh and logical rules in context, so the models' `activation_*` constraints resolve while tracing."""
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    yield
