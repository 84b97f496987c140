"""Mesh construction, the logical-axis rule table and sharding helpers, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lsm_jax import sharding


def test_fill_axis_takes_the_remaining_devices():
  assert sharding.MeshConfig(data=2, fsdp=-1, tensor=1).resolve(8) == {"data": 2, "sequence": 1, "fsdp": 4, "tensor": 1}
  assert sharding.MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == {"data": 2, "sequence": 1, "fsdp": 2, "tensor": 2}
  assert sharding.MeshConfig(data=1, fsdp=8, tensor=1).resolve(8) == {"data": 1, "sequence": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
  "config, message",
  [
    (sharding.MeshConfig(data=3, fsdp=-1), "multiple of 3 devices, but there are 8"),
    (sharding.MeshConfig(data=-1, fsdp=-1), "at most one axis"),
    (sharding.MeshConfig(data=2, fsdp=2, tensor=1), "has 4 devices, but there are 8"),
    (sharding.MeshConfig(data=0), "data=0 is invalid"),
  ],
)
def test_mesh_shapes_that_do_not_tile_the_devices_fail_clearly(config, message):
  with pytest.raises(ValueError, match=message):
    config.resolve(8)


def test_make_mesh_uses_all_devices_or_the_first_n():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "sequence": 1, "fsdp": 2, "tensor": 2}
  assert mesh.axis_names == sharding.MESH_AXES
  single = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1, num_devices=1))
  assert single.devices.size == 1 and single.devices.flat[0] == jax.devices()[0]
  with pytest.raises(ValueError, match="num_devices=9 must lie in 1..8"):
    sharding.make_mesh(sharding.MeshConfig(num_devices=9))


def test_rule_table_covers_every_logical_name_once():
  names = [name for name, _ in sharding.LOGICAL_AXIS_RULES]
  assert len(names) == len(set(names))
  assert set(names) == {
    "embed",
    "mlp",
    "heads",
    "kv",
    "vocab",
    "layers",
    "activation_batch",
    "activation_length",
    "activation_embed",
    "activation_heads",
  }
  for _, mesh_axes in sharding.LOGICAL_AXIS_RULES:
    assert set(sharding._as_axis_tuple(mesh_axes)) <= set(sharding.MESH_AXES)


def test_logical_names_map_through_the_table():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  assert sharding.logical_to_mesh_spec(("layers", "embed", "mlp"), (4, 64, 128), mesh) == P(None, "fsdp", "tensor")
  assert sharding.logical_to_mesh_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
  assert sharding.logical_to_mesh_spec(("activation_batch", "activation_length"), (8, 16), mesh) == P(
    ("data", "fsdp"), None
  )
  # Without a mesh the table is applied verbatim.
  assert sharding.logical_to_mesh_spec(("heads", "kv")) == P("tensor", None)


def test_indivisible_dimension_stays_replicated_and_axes_are_not_reused():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
  # 2 heads cannot be split 4 ways: replicated rather than an XLA error.
  assert sharding.logical_to_mesh_spec(("embed", "heads", "kv"), (64, 2, 32), mesh) == P("fsdp", None, None)
  # Two dims mapping to `tensor`: only the first gets it.
  assert sharding.logical_to_mesh_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)
  # Mesh axes of size 1 are dropped, so the spec names only axes that shard something.
  data_only = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 64), data_only) == P(None, None)


def test_unknown_logical_name_and_rank_mismatch_fail_clearly():
  with pytest.raises(ValueError, match="unknown logical axis name 'hidden'.*valid names: embed"):
    sharding.logical_to_mesh_spec(("hidden",))
  with pytest.raises(ValueError, match="do not match array rank 3"):
    sharding.logical_to_mesh_spec(("embed", "mlp"), (2, 3, 4))


class _Annotated(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(init(rngs.params(), (64, 128)), out_sharding=("embed", "mlp"))
    self.scale = nnx.Param(jnp.ones((64,)), out_sharding=("embed",))
    self.bias = nnx.Param(jnp.zeros((128,)))  # no annotation: replicated


def _params():
  with nnx.use_eager_sharding(False):  # placement comes from the jit out_shardings under test
    return nnx.state(_Annotated(nnx.Rngs(0)), nnx.Param)


def _abstract_params():
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: _Annotated(nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def test_parameter_and_optimizer_state_shardings_follow_the_annotations():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  abstract = _abstract_params()
  specs = sharding.state_partition_specs(abstract, mesh)
  assert specs == {"kernel": P("fsdp", "tensor"), "scale": P("fsdp"), "bias": P()}
  shardings = sharding.named_shardings(specs, mesh)
  abstract_params = abstract.to_pure_dict()
  tx = optax.adamw(1e-3)
  opt_state = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding.like_tree_shardings(opt_state, shardings, abstract_params, mesh)
  adam_state = opt_shardings[0]
  assert adam_state.mu["kernel"].spec == P("fsdp", "tensor") and adam_state.nu["scale"].spec == P("fsdp")
  assert adam_state.count.spec == P()
  # The shardings are usable: initialising under them places each shard where the spec says.
  params = jax.jit(lambda: _params().to_pure_dict(), out_shardings=shardings)()
  kernel = params["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert {shard.data.shape for shard in kernel.addressable_shards} == {(16, 64)}
  reference = jax.jit(lambda: _params().to_pure_dict())()["kernel"]  # same values, unsharded
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(reference))


def test_batch_divisibility_error_names_the_numbers():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
  sharding.check_batch_divisible(16, mesh)
  with pytest.raises(ValueError, match=r"global batch size 12 is not divisible by data × fsdp = 2 × 4 = 8"):
    sharding.check_batch_divisible(12, mesh)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
