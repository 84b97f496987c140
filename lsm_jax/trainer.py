"""The training loop: `train(...)` is the function gin binds (T5X style; see lsm_jax/train.py for the CLI).

Flow: validate the configuration (nothing is compiled before every check passed) → mesh →
`build_train_program` (abstract model via eval_shape, parameter and optimizer-state shardings from the models'
logical annotations, jitted step with explicit in/out shardings and donated state; no data, no run directory,
so lsm_jax/aot.py and benchmarks/train_step.py build the very same program) → restore the latest checkpoint or
initialise directly into those shardings → ahead-of-time compile the step → loop: batch =
loader.local_batch(step), step, metrics, checkpoint.

Determinism: the batch of step s is a pure function of (data seed, s) and the step has no other randomness, so a
run resumed at step s reproduces the uninterrupted run bit for bit on the same mesh.
"""

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from flax import nnx

from lsm_jax import checkpoint as checkpoint_lib
from lsm_jax import errors, flops, losses, models, optim, sharding
from lsm_jax import metrics as metrics_lib
from lsm_jax.data import loader as loader_lib
from lsm_jax.models import configs as model_configs


def _no_eager_sharding():
  # Variables are created abstractly or inside jit with explicit out_shardings; flax must not try to place
  # them itself (that needs a mesh context and logical rules at construction time). Flax releases without
  # eager sharding have no switch and need none.
  if hasattr(nnx, "use_eager_sharding"):
    return nnx.use_eager_sharding(False)
  return contextlib.nullcontext()


def _state_from_pure_dict(template: nnx.State, pure: dict) -> nnx.State:
  state = jax.tree.map(lambda leaf: leaf, template)  # fresh Variables; the template stays untouched
  nnx.replace_by_pure_dict(state, pure)
  return state


def _weight_decay_mask(param_state: nnx.State) -> dict:
  """Decay parameters with >= 2 axes that are not the stacked `layers` axis (norm scales stay undecayed)."""

  def is_matrix(variable):
    names = sharding.variable_logical_axes(variable)
    rank = variable.get_value().ndim
    if names is not None:
      rank -= sum(name == "layers" for name in names)
    return variable.replace(rank >= 2)

  return jax.tree.map(is_matrix, param_state, is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()


def _check_positive_ints(owner: str, **values) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """The model, optimizer, shardings and jitted step functions of one training configuration.

  Needs no data and no run directory, so the same program serves `train()`, ahead-of-time compilation for
  another platform (lsm_jax/aot.py) and benchmarks (benchmarks/train_step.py). Its jitted functions trace
  under `sharding.activate(mesh)`: use the `lower_*` helpers or call them inside that context.
  """

  model_config: model_configs.ModelConfig  # "auto" kernel choices resolved for the mesh's platform
  mesh: jax.sharding.Mesh
  platform: str
  seq_len: int
  global_batch_size: int
  num_microbatches: int
  microbatch_size: int
  flops_per_step_model: float  # Appendix A.1 form (MFU)
  flops_per_step_table1: float  # Table 1 form (compute C, scaling laws)
  num_params: int
  optimizer: optim.Optimizer
  param_shardings: dict
  state_shardings: dict
  rest_shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: dict  # ShapeDtypeStructs carrying state_shardings
  abstract_rest: dict  # the model's non-parameter variables, abstract and replicated
  abstract_batch: dict  # [global_batch_size, seq_len] per key of BATCH_KEYS, batch-sharded
  train_step: Any  # jax.jit: (state, rest, batch) -> (state, metrics); state donated
  eval_step: Any  # jax.jit: (params, rest, batch) -> (loss sum, loss-token count)
  model_from_params: Callable[[dict, dict], nnx.Module]
  _init: Any
  _init_rest: Any
  _start_from_params: Any

  def init(self) -> tuple[dict, dict]:
    """(state, rest): freshly initialised, placed directly in their shardings."""
    with sharding.activate(self.mesh), _no_eager_sharding():
      return self._init()

  def init_rest(self) -> dict:
    """The non-parameter variables alone (a resumed run restores the state but rebuilds these)."""
    with sharding.activate(self.mesh):
      return self._init_rest()

  def init_from_params(self, params: dict) -> tuple[dict, dict]:
    """(state, rest) of a new run starting from `params` (a pure dict shaped like abstract_state["params"], in
    param_shardings, any floating dtype): parameters cast to the model's dtypes, fresh optimizer state, step 0."""
    with sharding.activate(self.mesh):
      return self._start_from_params(params), self._init_rest()

  def lower_train_step(self) -> jax.stages.Lowered:
    with sharding.activate(self.mesh):
      return self.train_step.lower(self.abstract_state, self.abstract_rest, self.abstract_batch)

  def lower_eval_step(self) -> jax.stages.Lowered:
    with sharding.activate(self.mesh):
      return self.eval_step.lower(self.abstract_state["params"], self.abstract_rest, self.abstract_batch)


def _checked_compiler_options(options, platform: str) -> dict | None:
  """`options` ({XLA option: bool, int, float or str}) checked: their types here, their names and values by
  compiling an empty program with them when this host's backend is `platform` (a TPU topology compiled from a CPU
  host is checked by its own compile)."""
  if not options:
    return None
  if not isinstance(options, dict) or not all(
    isinstance(name, str) and isinstance(value, (bool, int, float, str)) for name, value in options.items()
  ):
    raise TypeError(
      f"trainer.train.compiler_options must map XLA option names to bools, numbers or strings "
      f"(e.g. {{'xla_gpu_enable_cublaslt': True}}), got {options!r}"
    )
  if jax.default_backend() == platform:
    try:
      jax.jit(lambda: jnp.zeros(()), compiler_options=options).lower().compile()
    except Exception as error:  # XLA names the unknown option or the bad value
      raise ValueError(
        f"trainer.train.compiler_options {options!r}: {error}; valid: the options of the {platform} XLA compiler "
        "(XLA's DebugOptions, e.g. xla_gpu_autotune_level=4)"
      ) from None
  return dict(options)


def build_train_program(
  model_config: model_configs.ModelConfig,
  *,
  mesh: jax.sharding.Mesh,
  train_steps: int,
  seq_len: int,
  global_batch_size: int,
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
  per_shard_microbatch_size: int | None = None,
  loss_chunk_length: int | None = None,
  loss_logits_dtype: str = "bfloat16",
  seed: int = 0,
  compiler_options: dict | None = None,
) -> TrainProgram:
  """Validates the numbers, then builds the abstract model, shardings and jitted steps (nothing compiled).

  The target platform is that of the mesh's devices (TPU topology devices compile for TPU from any host).
  `train_steps` only shapes the learning-rate schedule. Arguments mean what trainer.train's do.
  """
  # --- checks first: a bad number must fail before any model is built or anything is traced ---------------
  if not isinstance(model_config, model_configs.ModelConfig):
    raise TypeError(
      f"trainer.train.model_config must be a ModelConfig (e.g. @configs.get_config()), "
      f"got {type(model_config).__name__}"
    )
  _check_positive_ints("trainer.train", train_steps=train_steps, seq_len=seq_len, global_batch_size=global_batch_size)
  shards = sharding.batch_shards(mesh)
  sharding.check_batch_divisible(global_batch_size, mesh, "trainer.train.global_batch_size")
  sharding.check_sequence_divisible(seq_len, mesh, "trainer.train.seq_len")
  if per_shard_microbatch_size is None:
    microbatch_size = global_batch_size
  else:
    microbatch_size = per_shard_microbatch_size * shards
    if per_shard_microbatch_size < 1 or global_batch_size % microbatch_size:
      raise ValueError(
        f"trainer.train.global_batch_size {global_batch_size} is not a multiple of the microbatch: "
        f"per_shard_microbatch_size {per_shard_microbatch_size} × {shards} batch shards (data × fsdp) = "
        f"{microbatch_size}"
      )
  num_microbatches = global_batch_size // microbatch_size
  if loss_chunk_length is not None and (
    loss_chunk_length < 1 or (loss_chunk_length < seq_len and seq_len % loss_chunk_length)
  ):
    raise ValueError(
      f"trainer.train.loss_chunk_length {loss_chunk_length} must divide seq_len {seq_len} "
      "(or be >= seq_len, or None: no chunking)"
    )
  if loss_logits_dtype not in losses.LOGITS_DTYPES:
    raise ValueError(
      f"trainer.train.loss_logits_dtype {loss_logits_dtype!r} is not one of {', '.join(losses.LOGITS_DTYPES)}"
    )
  platform = mesh.devices.flat[0].platform
  compiler_options = _checked_compiler_options(compiler_options, platform)
  model_config = model_config.resolved_for(platform)
  shape = dict(
    arch=model_config.arch,
    num_layers=model_config.num_layers,
    d_model=model_config.d_model,
    num_heads=model_config.num_heads,
    batch_size=global_batch_size,
    seq_len=seq_len,
    layer_pattern=model_config.layer_pattern,
  )

  # --- abstract model → shardings -------------------------------------------------------------------------
  def new_model():
    return models.build_model(model_config, rngs=nnx.Rngs(seed))

  with _no_eager_sharding():
    abstract_model = nnx.eval_shape(new_model)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  param_specs = sharding.state_partition_specs(abstract_params, mesh)
  param_shardings = sharding.named_shardings(param_specs, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rest_shardings = jax.tree.map(lambda _: replicated, abstract_rest.to_pure_dict())
  optimizer_parts = optim.make_optimizer(optimizer, train_steps, _weight_decay_mask(abstract_params))
  tx = optimizer_parts.tx

  abstract_param_dict = abstract_params.to_pure_dict()
  abstract_opt_state = jax.eval_shape(tx.init, abstract_param_dict)
  opt_shardings = sharding.like_tree_shardings(abstract_opt_state, param_shardings, abstract_param_dict, mesh)
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated, "rng": replicated}
  rng_key_data = jax.random.key_data(jax.random.key(seed))
  abstract_state = {
    "params": abstract_param_dict,
    "opt_state": abstract_opt_state,
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct(rng_key_data.shape, rng_key_data.dtype),
  }
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_shardings
  )
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_param_dict))

  def model_from_params(params, rest):
    return nnx.merge(
      graphdef, _state_from_pure_dict(abstract_params, params), _state_from_pure_dict(abstract_rest, rest)
    )

  # --- the step functions -------------------------------------------------------------------------------
  batch_sharding = sharding.batch_sharding(mesh)
  batch_shardings = {key: batch_sharding for key in BATCH_KEYS}

  def loss_sums(params, rest, batch, logits_dtype="float32"):
    model = model_from_params(params, rest)
    hidden = model.hidden_states(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    return losses.masked_cross_entropy_sums(
      model, hidden, batch["targets"], batch["loss_mask"], loss_chunk_length, logits_dtype
    )

  def grad_sums(params, rest, batch):
    (loss_sum, mask_sum), grads = jax.value_and_grad(
      lambda p: loss_sums(p, rest, batch, loss_logits_dtype), has_aux=True
    )(params)
    return loss_sum, mask_sum, grads

  def train_step(state, rest, batch):
    params = state["params"]
    if num_microbatches == 1:
      loss_sum, mask_sum, grads = grad_sums(params, rest, batch)
    else:
      # Row r of microbatch i is global row r·k + i: each shard's contiguous block of rows then splits evenly
      # into the k microbatches, so accumulation needs no data movement between devices.
      def to_microbatches(x):
        x = x.reshape(microbatch_size, num_microbatches, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *sharding.batch_spec(mesh)))
        )

      def accumulate(carry, microbatch):
        microbatch = jax.lax.with_sharding_constraint(microbatch, batch_shardings)
        loss_sum, mask_sum, grads = grad_sums(params, rest, microbatch)
        total_loss, total_mask, total_grads = carry
        total_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), total_grads, grads)
        return (total_loss + loss_sum, total_mask + mask_sum, total_grads), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
      zero = jnp.zeros((), jnp.float32)
      (loss_sum, mask_sum, grads), _ = jax.lax.scan(
        accumulate, (zero, zero, zeros), jax.tree.map(to_microbatches, batch)
      )
    token_count = jnp.maximum(mask_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / token_count).astype(p.dtype), grads, params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {
      "params": optax.apply_updates(params, updates),
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "rng": state["rng"],
    }
    step_metrics = {
      "loss": loss_sum / token_count,
      "grad_norm": grad_norm,
      "learning_rate": optimizer_parts.learning_rate(state["step"]),
      "loss_tokens": mask_sum,
    }
    return new_state, step_metrics

  def start_state(params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng_key_data}

  def init_state():
    _, params, rest = nnx.split(new_model(), nnx.Param, ...)
    return start_state(params.to_pure_dict()), rest.to_pure_dict()

  def start_from_params(params):
    return start_state(jax.tree.map(lambda param, like: param.astype(like.dtype), params, abstract_param_dict))

  abstract_batch = {
    key: jax.ShapeDtypeStruct(
      (global_batch_size, seq_len), jnp.float32 if key == "loss_mask" else jnp.int32, sharding=batch_sharding
    )
    for key in BATCH_KEYS
  }
  abstract_rest_arrays = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_rest.to_pure_dict()
  )
  return TrainProgram(
    model_config=model_config,
    mesh=mesh,
    platform=platform,
    seq_len=seq_len,
    global_batch_size=global_batch_size,
    num_microbatches=num_microbatches,
    microbatch_size=microbatch_size,
    flops_per_step_model=flops.flops_per_step(
      **shape, ffn_dim=model_config.ffn_dim, vocab_size=model_config.vocab_size
    ),
    flops_per_step_table1=flops.flops_per_step(**shape),
    num_params=num_params,
    optimizer=optimizer_parts,
    param_shardings=param_shardings,
    state_shardings=state_shardings,
    rest_shardings=rest_shardings,
    batch_sharding=batch_sharding,
    abstract_state=abstract_state,
    abstract_rest=abstract_rest_arrays,
    abstract_batch=abstract_batch,
    train_step=jax.jit(
      train_step,
      in_shardings=(state_shardings, rest_shardings, batch_shardings),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
      compiler_options=compiler_options,
    ),
    # Validation keeps fp32 logits whatever the training loss uses: it is the number the scaling laws fit.
    eval_step=jax.jit(
      loss_sums,
      in_shardings=(param_shardings, rest_shardings, batch_shardings),
      out_shardings=replicated,
      compiler_options=compiler_options,
    ),
    model_from_params=model_from_params,
    _init=jax.jit(init_state, out_shardings=(state_shardings, rest_shardings)),
    _init_rest=jax.jit(lambda: init_state()[1], out_shardings=rest_shardings),
    _start_from_params=jax.jit(start_from_params, in_shardings=(param_shardings,), out_shardings=state_shardings),
  )


def _greedy_sample(model_from_params, params, tokenizer, prompt: str, num_tokens: int) -> str:
  """Greedy continuation of `prompt` with prefill + decode_step (one sequence)."""
  prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
  tokens = jnp.asarray([prompt_ids], jnp.int32)
  segment_ids = jnp.ones_like(tokens)
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  max_length = tokens.shape[1] + num_tokens

  @jax.jit
  def prefill(params, tokens, segment_ids, positions):
    logits, decode_state = model_from_params(params).prefill(
      tokens, segment_ids=segment_ids, positions=positions, max_length=max_length
    )
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), decode_state

  @jax.jit
  def decode(params, token, decode_state):
    logits, decode_state = model_from_params(params).decode_step(token, decode_state)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), decode_state

  token, decode_state = prefill(params, tokens, segment_ids, positions)
  generated = [int(token[0])]
  for _ in range(num_tokens - 1):
    token, decode_state = decode(params, token, decode_state)
    generated.append(int(token[0]))
  return prompt + tokenizer.decode(generated)


class StepDoesNotFitError(errors.UserError):
  """The compiled train step needs more memory per device than the device has."""


_GIB = float(1 << 30)


def _memory_knobs(program: TrainProgram) -> str:
  config = program.model_config
  rows_per_shard = program.microbatch_size // sharding.batch_shards(program.mesh)
  return (
    f"To fit: a remat policy that keeps fewer activations (ModelConfig.remat_policy, now "
    f"{config.remat_policy!r}; valid: {', '.join(model_configs.REMAT_POLICIES)}; 'full' keeps the fewest), "
    f"fewer rows per microbatch (PER_SHARD_MICROBATCH_SIZE, now {rows_per_shard} per data x fsdp shard: "
    f"gradients then accumulate over more microbatches, the global batch stays), or a mesh that shards the "
    f"model over more devices (gin/mesh/*.gin, sharding.MeshConfig; now {dict(program.mesh.shape)})."
  )


def compile_train_step(program: TrainProgram, device_memory_limit_gib: float | None = None) -> jax.stages.Compiled:
  """Compiles the train step and checks that its memory plan fits the devices, before any step runs.

  The plan is XLA's per-device buffer assignment (`metrics.compiled_memory_bytes`: arguments + outputs − donated
  + temporaries + generated code, as lsm_jax.aot reports it); the limit is `device_memory_limit_gib`, else the
  smallest allocator limit (`memory_stats()["bytes_limit"]`) of this process's devices. Devices without memory
  statistics (CPU) are not checked unless a limit is given. Raises StepDoesNotFitError with both numbers and the
  settings that lower the plan; a compiler that itself runs out of memory (TPU) gives the same error.
  """
  try:
    compiled = program.lower_train_step().compile()
  except Exception as error:  # XLA reports a plan beyond the device's memory as RESOURCE_EXHAUSTED
    if not metrics_lib.is_out_of_memory(error):
      raise
    raise StepDoesNotFitError(
      f"the train step does not fit the device memory: the compiler reports "
      f"{str(error).strip().splitlines()[0][:300]}. {_memory_knobs(program)}"
    ) from error
  if device_memory_limit_gib is None:
    local_devices = [device for device in program.mesh.devices.flat if device.process_index == jax.process_index()]
    limit, source = metrics_lib.device_memory_limit_bytes(local_devices), f"{local_devices[0].device_kind} allocator"
  else:
    limit, source = device_memory_limit_gib * _GIB, "trainer.train.device_memory_limit_gib"
  plan = metrics_lib.compiled_memory_bytes(compiled)
  if limit is not None and plan is not None and plan["total"] > limit:
    raise StepDoesNotFitError(
      f"the compiled train step needs {plan['total'] / _GIB:.3g} GiB per device (arguments "
      f"{plan['argument'] / _GIB:.3g}, outputs {plan['output'] / _GIB:.3g} of which {plan['alias'] / _GIB:.3g} "
      f"reuse donated inputs, temporaries {plan['temp'] / _GIB:.3g}), but the device has {limit / _GIB:.3g} GiB "
      f"({source}). {_memory_knobs(program)}"
    )
  return compiled


class InitCheckpointMismatchError(errors.UserError):
  """trainer.train.init_from names a checkpoint of another model than the run's model_config."""


# ModelConfig fields that may differ between init_from's checkpoint and the new run without a warning: names and
# how the same model is computed.
_INIT_FREE_MODEL_FIELDS = ("size", "param_dtype", *checkpoint_lib.EXECUTION_MODEL_FIELDS)


def run_model_config(run_dir: str, overrides: dict | None = None) -> model_configs.ModelConfig:
  """The ModelConfig recorded in RUN_DIR/run_metadata.json (e.g. an imported LLaMA's), with `overrides` (field ->
  value, e.g. {'dtype': 'bfloat16'}). For gin, next to trainer.train.init_from: MODEL_CONFIG =
  @trainer.run_model_config() with trainer.run_model_config.run_dir = the same directory."""
  recorded = checkpoint_lib.read_run_metadata(run_dir).get("model_config")
  if not recorded:
    raise ValueError(f"{run_dir}/{checkpoint_lib.RUN_METADATA_FILE} records no model_config")
  fields = {field.name for field in dataclasses.fields(model_configs.ModelConfig)}
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f"trainer.run_model_config.overrides: unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}"
    )
  unsupported = sorted(set(recorded) - fields)
  if unsupported:
    raise ValueError(
      f"the model_config of {run_dir} has field(s) {unsupported} that this lsm_jax's ModelConfig lacks; "
      f"write MODEL_CONFIG by hand"
    )
  return model_configs.ModelConfig(**{**recorded, **overrides})


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def _param_name(keys) -> str:
  return ".".join(str(key) for key in keys)


def _listing(items: list[str], limit: int = 8) -> str:
  return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _check_init_from(
  init_from: str, init_from_step: int | None, program: TrainProgram, model_config: dict, tokenizer_spec: str
) -> tuple[str, int, dict]:
  """(run directory, milestone step, record for run_metadata.json) of init_from's milestone, after checking from
  its metadata alone (no weights read) that its parameters are exactly those of the run's model.

  Raises InitCheckpointMismatchError naming every parameter whose shape differs, is missing or is extra, and the
  model_config fields behind them. Other model_config differences (e.g. rope_theta) are allowed with a warning and
  recorded: they change what the same weights compute.
  """
  run_dir, step = checkpoint_lib.resolve_milestone(
    init_from, init_from_step, path_name="trainer.train.init_from", step_name="trainer.train.init_from_step"
  )
  metadata = checkpoint_lib.milestone_metadata(run_dir, step)
  try:
    source_run = checkpoint_lib.read_run_metadata(run_dir)
  except FileNotFoundError:
    source_run = {}
  source_config = metadata.get("model_config") or source_run.get("model_config") or {}
  changed = {
    field: [source_config.get(field), model_config.get(field)]
    for field in sorted(set(source_config) | set(model_config))
    if field not in _INIT_FREE_MODEL_FIELDS and source_config.get(field) != model_config.get(field)
  }
  saved = {_param_name(entry["path"]): tuple(entry["shape"]) for entry in metadata["param_layout"]}
  expected = {
    _param_name(entry.key for entry in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(program.abstract_state["params"])[0]
  }
  problems = []
  if source_config.get("arch") not in (None, model_config["arch"]):
    problems.append(f"it is a {source_config.get('arch')} model, this run's is {model_config['arch']}")
  shapes = [
    f"{name} {saved[name]} in the checkpoint, {shape} in the model"
    for name, shape in sorted(expected.items())
    if name in saved and saved[name] != shape
  ]
  if shapes:
    problems.append(f"{len(shapes)} parameter(s) differ in shape: {_listing(shapes)}")
  missing = sorted(set(expected) - set(saved))
  if missing:
    problems.append(f"missing from the checkpoint: {_listing(missing)}")
  extra = sorted(set(saved) - set(expected))
  if extra:
    problems.append(f"not in this run's model: {_listing(extra)}")
  where = f"trainer.train.init_from: milestone {step} of {run_dir}"
  changes = ", ".join(f"{field} {old!r} -> {new!r}" for field, (old, new) in changed.items())
  if problems:
    raise InitCheckpointMismatchError(
      f"{where} does not fit this run's model_config: {'; '.join(problems)}. ModelConfig fields that differ "
      f"(checkpoint -> this run): {changes or 'none recorded'}. Set MODEL_CONFIG to the checkpoint's model "
      f"(model_config in {run_dir}/run_metadata.json) or start from another checkpoint."
    )
  if changed:
    logging.warning("%s: same parameter shapes, but the model_config differs in %s", where, changes)
  source_tokenizer = source_run.get("tokenizer")
  if source_tokenizer is not None and source_tokenizer != tokenizer_spec:
    logging.warning("%s was trained with tokenizer %r; this run uses %r", where, source_tokenizer, tokenizer_spec)
  record = {
    "run_dir": run_dir,
    "step": step,
    "arch": source_config.get("arch"),
    "run_name": source_run.get("run_name"),
    "tokenizer": source_tokenizer,
    "tokens_seen": metadata.get("tokens_seen"),
    "code_version": metadata.get("code_version"),
    "model_config_changes": changed,
  }
  if "imported_from" in source_run:
    record["imported_from"] = source_run["imported_from"]
  return run_dir, step, record


_LOOP_STARTED = contextvars.ContextVar("lsm_jax_training_loop_started", default=False)


def training_loop_started() -> bool:
  """Whether the latest `train()` call reached its training loop; errors before it are configuration errors."""
  return _LOOP_STARTED.get()


class _NonFiniteAfterRestore(errors.NonFiniteLossError):
  """A non-finite loss before any new checkpoint was saved after restoring `restored_step`."""

  def __init__(self, message: str, restored_step: int):
    super().__init__(message)
    self.restored_step = restored_step


def _non_finite_error(
  model_dir: str,
  completed: int,
  scalars: dict,
  restored_step: int | None,
  checkpointer: checkpoint_lib.Checkpointer | None,
) -> errors.NonFiniteLossError:
  """The error for a non-finite loss or gradient norm at step `completed` (the state after it is not saved)."""
  name = "loss" if not np.isfinite(scalars["loss"]) else "gradient norm"
  what = f"the {name} became {scalars['loss' if name == 'loss' else 'grad_norm']} at step {completed}"
  if restored_step is not None and checkpointer is not None and not checkpointer.saved_resume_steps:
    return _NonFiniteAfterRestore(
      f"{what}, {completed - restored_step} step(s) after restoring resume checkpoint {restored_step}", restored_step
    )
  # Saves still in flight count: closing the checkpointer on the way out commits them.
  saved = set(checkpoint_lib.resume_checkpoint_steps(model_dir)) | set(
    checkpointer.saved_resume_steps if checkpointer else ()
  )
  good = sorted(step for step in saved if step < completed)
  last_good = (
    f"resume checkpoint {good[-1]} ({os.path.join(model_dir, 'checkpoints', 'resume', str(good[-1]))}),"
    f" which a rerun resumes from"
    if good
    else "none: no resume checkpoint was saved before it"
  )
  return errors.NonFiniteLossError(
    f"{what}; stopping. The last good checkpoint is {last_good}. Try a lower optim.OptimizerConfig.learning_rate, "
    f"a longer warmup_steps or a gradient_clip_norm, or float32 compute (ModelConfig.dtype); if the loss was "
    f"finite and falling until then, look for bad data near step {completed}."
  )


def _locked_with_rollback(train_function):
  """Runs `train_function` holding MODEL_DIR's RunLock; when the loss turns non-finite right after a restore (the
  restored checkpoint is bad although its files are intact), quarantines that checkpoint and trains once more
  from the previous one."""

  @functools.wraps(train_function)
  def locked_train(**kwargs):
    _LOOP_STARTED.set(False)
    if "model_dir" not in kwargs:
      return train_function(**kwargs)  # the TypeError names the missing argument
    model_dir = kwargs["model_dir"]
    with checkpoint_lib.RunLock(model_dir):
      try:
        return train_function(**kwargs)
      except _NonFiniteAfterRestore as error:
        bad_step = error.restored_step
        older = [step for step in checkpoint_lib.resume_checkpoint_steps(model_dir) if step < bad_step]
        if not older:
          raise errors.NonFiniteLossError(
            f"{error}; there is no older resume checkpoint to roll back to, stopping. Move "
            f"{model_dir}/checkpoints/resume/{bad_step} away to start over."
          ) from error
        checkpoint_lib.quarantine_resume_checkpoint(model_dir, bad_step, f"{error}")
        logging.warning("%s: quarantined that checkpoint; rolling back once, to resume checkpoint %d", error, older[-1])
      _LOOP_STARTED.set(False)
      try:
        return train_function(**kwargs)
      except _NonFiniteAfterRestore as error:
        raise errors.NonFiniteLossError(
          f"{error}, after rolling back once from resume checkpoint {bad_step}; "
          f"stopping (a second bad checkpoint in a row points at the configuration or "
          f"the data rather than the files)."
        ) from error

  locked_train.__signature__ = inspect.signature(train_function)  # gin validates parameters against it
  return locked_train


@_locked_with_rollback
def train(
  *,
  model_dir: str,
  model_config: model_configs.ModelConfig,
  train_steps: int,
  seq_len: int,
  global_batch_size: int,
  data_dir: str = "embedded",
  make_loader: Callable[..., Any] | None = None,
  validation_split: str = "validation",
  seed: int = 0,
  mesh_config: sharding.MeshConfig = sharding.MeshConfig(),
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
  per_shard_microbatch_size: int | None = None,
  loss_chunk_length: int | None = None,
  loss_logits_dtype: str = "bfloat16",
  compiler_options: dict | None = None,
  eval_every_steps: int = 0,
  eval_batches: int = 4,
  log_every_steps: int = 1,
  prefetch_batches: int = 2,
  enable_checkpointing: bool = True,
  checkpoint_every_steps: int = 1000,
  max_checkpoints_to_keep: int = 2,
  num_milestones: int = 57,
  milestone_dtype: str = "bfloat16",
  async_checkpointing: bool = True,
  allow_config_change: bool = False,
  init_from: str | None = None,
  init_from_step: int | None = None,
  peak_flops_per_device: float | None = None,
  device_memory_limit_gib: float | None = None,
  sample_prompt: str | None = "The ",
  sample_tokens: int = 48,
  progress_bar: bool = True,
  enable_tensorboard: bool = True,
  config_text: str | None = None,
  run_name: str | None = None,
  ablation: str | None = None,
) -> dict:
  """Trains `model_config` for `train_steps` steps of `global_batch_size` × `seq_len` tokens into `model_dir`.

  Args mirror gin/runs/pretrain.gin. `per_shard_microbatch_size`: rows per data×fsdp shard in one microbatch;
  the global batch is reached by accumulating gradients over global_batch_size / (that × shards) microbatches
  (None: one microbatch). `loss_chunk_length`: time chunk for the vocabulary projection + softmax (None: whole
  sequence). `loss_logits_dtype`: 'float32' or 'bfloat16', the dtype the vocabulary head writes the training
  loss's logits in (the softmax runs in fp32 from them either way; validation always uses fp32).
  `compiler_options`: XLA options the training and validation steps compile with ({name: value}, e.g.
  {'xla_gpu_autotune_level': 4}; None: XLA's defaults); an unknown name or a bad value stops the run before the
  model is built.
  `make_loader`: `lsm_jax.data.loader.make_loader` unless gin passes a configured one.
  `prefetch_batches`: global batches a background thread builds ahead of the step (2: the next batch is ready
  when the step is dispatched while one more absorbs a slow read). `device_memory_limit_gib`: memory per device
  the compiled step's plan must fit (None: the allocator's limit where the device reports one, no check on CPU);
  a step that does not fit stops before step 1 (docs/training.md). Before training, the run's checkpoint
  storage is printed and, on a local MODEL_DIR, checked against the free space.
  `allow_config_change`: resume even though the model, tokenizer, seq_len, global batch, seed or data differ from
  the run's run_metadata.json (the differences are recorded there); refused otherwise.
  `init_from`: start a NEW run from the parameters of a milestone of another run directory (e.g. one written by
  `python -m lsm_jax.export import`), or of one milestone directory; `init_from_step` picks the milestone (default:
  its last). Parameters only: fresh optimizer state, step 0, the run's own schedule and data. Its parameter shapes
  must be those of `model_config` (InitCheckpointMismatchError otherwise, before anything is compiled); the source
  is recorded in run_metadata.json (`init_from_milestone`). A run that resumes from its own checkpoints never reads
  init_from again, and a changed init_from is refused like any change of the run (allow_config_change).
  `config_text`: the effective gin config, written to MODEL_DIR/config.gin. `run_name` (default
  `<arch>_<size>`) and `ablation` (e.g. 'aspect', 'context') name the run in run_metadata.json, and through it in
  evaluation tables, where two runs of one (arch, size) may differ in shape or context.

  Holds MODEL_DIR's run lock for the whole call (lsm_jax.checkpoint.RunLock: a second trainer on the directory is
  refused). A non-finite loss or gradient norm stops training with NonFiniteLossError, after one automatic roll
  back to the previous checkpoint when it comes right after a restore (docs/reliability.md).

  Returns a summary: final step, last loss, last validation loss (or None), the generated sample, and
  `preempted` (True when a preemption notice stopped the run after saving).
  """
  # --- configuration checks: all of them before anything is compiled -------------------------------------
  _check_positive_ints("trainer.train", log_every_steps=log_every_steps, prefetch_batches=prefetch_batches)
  if init_from is not None and not (isinstance(init_from, str) and init_from):
    raise ValueError(f"trainer.train.init_from must be None or a run or milestone directory path, got {init_from!r}")
  if init_from_step is not None and init_from is None:
    raise ValueError("trainer.train.init_from_step needs trainer.train.init_from (the run directory to start from)")
  if device_memory_limit_gib is not None and not (
    isinstance(device_memory_limit_gib, (int, float)) and device_memory_limit_gib > 0
  ):
    raise ValueError(
      f"trainer.train.device_memory_limit_gib must be None (read from the device) or a positive "
      f"number of GiB, got {device_memory_limit_gib!r}"
    )
  if eval_every_steps < 0 or eval_batches < 1:
    raise ValueError(
      f"trainer.train.eval_every_steps must be >= 0 (0 = never) and eval_batches >= 1, got "
      f"{eval_every_steps} and {eval_batches}"
    )
  mesh = sharding.make_mesh(mesh_config)
  program = build_train_program(
    model_config,
    mesh=mesh,
    train_steps=train_steps,
    seq_len=seq_len,
    global_batch_size=global_batch_size,
    optimizer=optimizer,
    per_shard_microbatch_size=per_shard_microbatch_size,
    loss_chunk_length=loss_chunk_length,
    loss_logits_dtype=loss_logits_dtype,
    seed=seed,
    compiler_options=compiler_options,
  )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"trainer.train.global_batch_size {global_batch_size} is not divisible by the {jax.process_count()} processes"
    )
  milestone_steps = []
  if enable_checkpointing and num_milestones:
    milestone_steps = checkpoint_lib.milestone_schedule(train_steps, num_milestones)
  make_loader = make_loader or loader_lib.make_loader
  setup_start = time.perf_counter()
  train_loader = make_loader(data_dir, split="train", seq_len=seq_len, global_batch_size=global_batch_size, seed=seed)
  tokenizer = train_loader.tokenizer
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(
      f"tokenizer {tokenizer.name!r} has vocab_size {tokenizer.vocab_size} but "
      f"model_config.vocab_size is {model_config.vocab_size}"
    )
  validation_loader = None
  if eval_every_steps:
    validation_loader = make_loader(
      data_dir, split=validation_split, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed
    )
  device_kind = jax.devices()[0].device_kind
  peak_flops = metrics_lib.peak_flops_per_device(device_kind, peak_flops_per_device)

  is_main_process = jax.process_index() == 0
  run_metadata = {
    "arch": model_config.arch,
    "size": model_config.size,
    "model_config": dataclasses.asdict(model_config),
    "run_name": run_name or f"{model_config.arch}_{model_config.size}",
    "ablation": ablation,
    "tokenizer": getattr(tokenizer, "spec", tokenizer.name),
    "seq_len": seq_len,
    "global_batch_size": global_batch_size,
    "train_steps": train_steps,
    "flops_per_step": program.flops_per_step_table1,
    "milestone_steps": list(milestone_steps),
    "code_version": checkpoint_lib.code_version(),
    "data_dir": data_dir,
    "seed": seed,
    "optimizer": dataclasses.asdict(optimizer),
    "mesh": dict(mesh.shape),
    "num_params": program.num_params,
    "init_from": None if init_from is None else {"path": _absolute(init_from), "step": init_from_step},
  }
  # A resumed run must still be the same run; checked before config.gin and run_metadata.json are rewritten.
  run_metadata.update(
    checkpoint_lib.check_resumed_run(model_dir, run_metadata, allow_config_change=allow_config_change)
  )
  init_params = None
  if init_from is not None and not (enable_checkpointing and checkpoint_lib.resume_checkpoint_steps(model_dir)):
    init_run_dir, init_step, run_metadata["init_from_milestone"] = _check_init_from(
      init_from, init_from_step, program, run_metadata["model_config"], run_metadata["tokenizer"]
    )
    # Read (and checked against its manifest) before anything is written into MODEL_DIR.
    init_params, _ = checkpoint_lib.load_milestone(init_run_dir, init_step, sharding=program.param_shardings)
  if is_main_process:
    os.makedirs(model_dir, exist_ok=True)
    if config_text is not None:
      with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
        f.write(config_text)
  logging.info(
    "data ready in %.1f s; mesh %s on %d × %s; %d microbatch(es) of %d rows",
    time.perf_counter() - setup_start,
    dict(mesh.shape),
    jax.device_count(),
    device_kind,
    program.num_microbatches,
    program.microbatch_size,
  )

  # --- checkpoints ---------------------------------------------------------------------------------------
  checkpointer = None
  if enable_checkpointing:
    storage = checkpoint_lib.storage_estimate(
      program.abstract_state,
      train_steps=train_steps,
      milestone_steps=milestone_steps,
      milestone_dtype=milestone_dtype,
      save_interval_steps=checkpoint_every_steps,
      max_to_keep=max_checkpoints_to_keep,
    )
    if is_main_process:
      print(f"checkpoint storage of this run: {storage.describe()}", flush=True)
    checkpoint_lib.check_free_space(model_dir, storage)
    checkpointer = checkpoint_lib.Checkpointer(
      model_dir,
      save_interval_steps=checkpoint_every_steps,
      max_to_keep=max_checkpoints_to_keep,
      milestone_steps=milestone_steps,
      milestone_dtype=milestone_dtype,
      async_save=async_checkpointing,
      run_metadata=run_metadata,
    )
  elif is_main_process:
    with open(os.path.join(model_dir, "run_metadata.json"), "w", encoding="utf-8") as f:
      json.dump(run_metadata, f, indent=2)

  # From here on the checkpointer is closed however the run ends (its saves waited for, the SIGTERM handler
  # restored), also when restoring, compiling (a step over the memory limit) or the first save fails.
  batches = progress = writer = None
  try:
    with sharding.activate(mesh):
      restored = checkpointer.restore_latest(program.abstract_state) if checkpointer is not None else None
    if restored is not None:
      state, start_step = restored
      rest = program.init_rest()
      logging.info("resumed from step %d", start_step)
    elif init_params is not None:
      state, rest = program.init_from_params(init_params)
      del init_params
      start_step = 0
      logging.info("initialised from %s", run_metadata["init_from_milestone"])
    else:
      state, rest = program.init()
      start_step = 0
    compiled_step = compiled_eval = None
    if start_step < train_steps:  # a finished run (e.g. a study's rerun) restores and returns without compiling
      compile_start = time.perf_counter()
      compiled_step = compile_train_step(program, device_memory_limit_gib)
      compiled_eval = program.lower_eval_step().compile() if validation_loader is not None else None
      logging.info("compiled in %.1f s; %d parameters", time.perf_counter() - compile_start, program.num_params)

    def global_batch(batch_loader, index):
      local = batch_loader.local_batch(index, jax.process_index(), jax.process_count())
      return {
        key: jax.make_array_from_process_local_data(
          program.batch_sharding, np.asarray(local[key]), (global_batch_size, seq_len)
        )
        for key in BATCH_KEYS
      }

    def validation_loss():
      loss_total, mask_total = 0.0, 0.0
      for index in range(eval_batches):
        loss_sum, mask_sum = jax.device_get(
          compiled_eval(state["params"], rest, global_batch(validation_loader, index))
        )
        loss_total += float(loss_sum)
        mask_total += float(mask_sum)
      return loss_total / max(mask_total, 1.0)

    if checkpointer is not None and restored is None:
      checkpointer.save(0, state, metadata={"tokens_seen": 0, "compute_pflops_days": 0.0})

    # --- the loop ------------------------------------------------------------------------------------------
    # The host runs one step ahead of the device: it dispatches step s + 1, then reads step s's metrics while
    # s + 1 runs, and a background thread builds the next batches. Evaluation and checkpoints need the state after
    # a step before the next step consumes it (donated), so at those steps the metrics are read at once.
    writer = metrics_lib.MetricsWriter(model_dir, enable_tensorboard=enable_tensorboard)
    if config_text is not None:
      writer.write_text("config", config_text)
    tokens_per_step = global_batch_size * seq_len
    peak_flops_all_devices = peak_flops * jax.device_count()
    local_devices = jax.local_devices()
    last = {"step": start_step, "loss": None, "val_loss": None, "sample": None, "preempted": False}
    progress = tqdm.tqdm(
      total=train_steps,
      initial=start_step,
      disable=not (progress_bar and is_main_process),
      unit="step",
      dynamic_ncols=True,
    )
    _LOOP_STARTED.set(True)
    restored_step = start_step if restored is not None else None
    batches = loader_lib.prefetched(
      lambda index: global_batch(train_loader, index), range(start_step, train_steps), depth=prefetch_batches
    )
    timer = metrics_lib.StepTimer()

    def accounting(completed):
      return {
        "tokens_seen": completed * tokens_per_step,
        "compute_pflops_days": flops.to_pflops_days(completed * program.flops_per_step_table1),
      }

    def finish_step(completed, device_metrics, evaluate=False):
      """Reads step `completed`'s metrics (waiting for it), checks them, evaluates if asked, logs."""
      host_metrics = jax.device_get(device_metrics)
      timer.completed()
      scalars = {
        "loss": float(host_metrics["loss"]),
        "grad_norm": float(host_metrics["grad_norm"]),
        "learning_rate": float(host_metrics["learning_rate"]),
        **accounting(completed),
      }
      if not (np.isfinite(scalars["loss"]) and np.isfinite(scalars["grad_norm"])):
        raise _non_finite_error(model_dir, completed, scalars, restored_step, checkpointer)
      if evaluate:
        scalars["val_loss"] = last["val_loss"] = validation_loss()
      if completed % log_every_steps == 0 or completed == train_steps or evaluate:
        scalars.update(
          metrics_lib.throughput(
            *timer.interval(),
            tokens_per_step=tokens_per_step,
            flops_per_step=program.flops_per_step_model,
            peak_flops=peak_flops_all_devices,
          )
        )
        scalars["timestamp"] = time.time()
        peak_gib = metrics_lib.peak_memory_gib(local_devices)
        if peak_gib is not None:
          scalars["peak_memory_gib"] = peak_gib
        writer.write(completed, scalars)
        progress.set_postfix_str(metrics_lib.format_progress(scalars), refresh=False)
      last.update(step=completed, loss=scalars["loss"])
      progress.update(1)

    unread = None  # (step, device metrics) of the newest dispatched step whose metrics are not read yet
    for step, batch in batches:
      completed = step + 1
      timer.dispatching()
      state, step_metrics = compiled_step(state, rest, batch)
      if unread is not None:
        finish_step(*unread)  # the previous step, read while this one runs
      unread = (completed, step_metrics)
      evaluate = compiled_eval is not None and (completed % eval_every_steps == 0 or completed == train_steps)
      if checkpointer is not None:
        checkpointer.check_background_saves()
      # Polled once per step, before the save decision: a notice arriving during a save is acted on at the next
      # step, so the step that stops is always one whose resume checkpoint was saved.
      preempted = checkpointer is not None and checkpointer.reached_preemption(completed)
      save = checkpointer is not None and checkpointer.save_due(completed, force=completed == train_steps)
      if evaluate or save:
        # Checked before it is saved: a checkpoint never holds the state of a non-finite loss.
        finish_step(*unread, evaluate=evaluate)
        unread = None
      if save:
        checkpointer.save(completed, state, force=completed == train_steps, metadata=accounting(completed))
      if preempted:
        logging.warning("preemption signal at step %d: checkpoint saved, stopping", completed)
        last["preempted"] = True
        break
    if unread is not None:
      finish_step(*unread)
  finally:
    for resource in (batches, progress, writer):
      if resource is not None:
        resource.close()
    if checkpointer is not None:
      checkpointer.close()

  if sample_prompt is not None and sample_tokens > 0 and last["step"] == train_steps:
    with sharding.activate(mesh):
      last["sample"] = _greedy_sample(
        lambda params: program.model_from_params(params, rest), state["params"], tokenizer, sample_prompt, sample_tokens
      )
    if is_main_process:
      print(f"sample (greedy, step {last['step']}): {last['sample']!r}", flush=True)
  return last
