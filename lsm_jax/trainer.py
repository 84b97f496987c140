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
import dataclasses
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
from lsm_jax import flops
from lsm_jax import losses
from lsm_jax import metrics as metrics_lib
from lsm_jax import models
from lsm_jax import optim
from lsm_jax import sharding
from lsm_jax.data import loader as loader_lib
from lsm_jax.models import configs as model_configs
from lsm_jax.models.mixers import softmax as softmax_mixer
from pallas_kernels.linear_attention import api as linear_attention_api


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


def resolve_for_platform(model_config: model_configs.ModelConfig, platform: str) -> model_configs.ModelConfig:
  """`model_config` with its "auto" kernel choices fixed for `platform` ("tpu", "gpu", "cpu").

  The models resolve "auto" from jax.default_backend() at trace time, which is the host's platform when a
  program is compiled ahead of time for a TPU topology from a CPU host; resolving from the mesh's devices
  makes the kernels follow the target instead.
  """
  changes = {}
  if model_config.linear_attention_backend == "auto":
    changes["linear_attention_backend"] = linear_attention_api.resolve_backend("auto", platform)
  if model_config.attention_impl == "auto":
    changes["attention_impl"] = softmax_mixer.resolve_attention_impl("auto", model_config.dtype, platform)
  return dataclasses.replace(model_config, **changes)


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
  flops_per_step_model: float   # Appendix A.1 form (MFU)
  flops_per_step_table1: float  # Table 1 form (compute C, scaling laws)
  num_params: int
  optimizer: optim.Optimizer
  param_shardings: dict
  state_shardings: dict
  rest_shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: dict          # ShapeDtypeStructs carrying state_shardings
  abstract_rest: dict           # the model's non-parameter variables, abstract and replicated
  abstract_batch: dict          # [global_batch_size, seq_len] per key of BATCH_KEYS, batch-sharded
  train_step: Any               # jax.jit: (state, rest, batch) -> (state, metrics); state donated
  eval_step: Any                # jax.jit: (params, rest, batch) -> (loss sum, loss-token count)
  model_from_params: Callable[[dict, dict], nnx.Module]
  _init: Any
  _init_rest: Any

  def init(self) -> tuple[dict, dict]:
    """(state, rest): freshly initialised, placed directly in their shardings."""
    with sharding.activate(self.mesh), _no_eager_sharding():
      return self._init()

  def init_rest(self) -> dict:
    """The non-parameter variables alone (a resumed run restores the state but rebuilds these)."""
    with sharding.activate(self.mesh):
      return self._init_rest()

  def lower_train_step(self) -> jax.stages.Lowered:
    with sharding.activate(self.mesh):
      return self.train_step.lower(self.abstract_state, self.abstract_rest, self.abstract_batch)

  def lower_eval_step(self) -> jax.stages.Lowered:
    with sharding.activate(self.mesh):
      return self.eval_step.lower(self.abstract_state["params"], self.abstract_rest, self.abstract_batch)


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
    seed: int = 0,
) -> TrainProgram:
  """Validates the numbers, then builds the abstract model, shardings and jitted steps (nothing compiled).

  The target platform is that of the mesh's devices (TPU topology devices compile for TPU from any host).
  `train_steps` only shapes the learning-rate schedule. Arguments mean what trainer.train's do.
  """
  # --- checks first: a bad number must fail before any model is built or anything is traced ---------------
  if not isinstance(model_config, model_configs.ModelConfig):
    raise TypeError(f"trainer.train.model_config must be a ModelConfig (e.g. @configs.get_config()), "
                    f"got {type(model_config).__name__}")
  _check_positive_ints("trainer.train", train_steps=train_steps, seq_len=seq_len,
                       global_batch_size=global_batch_size)
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
          f"{microbatch_size}")
  num_microbatches = global_batch_size // microbatch_size
  if loss_chunk_length is not None and (loss_chunk_length < 1 or (loss_chunk_length < seq_len
                                                                  and seq_len % loss_chunk_length)):
    raise ValueError(f"trainer.train.loss_chunk_length {loss_chunk_length} must divide seq_len {seq_len} "
                     "(or be >= seq_len, or None: no chunking)")
  platform = mesh.devices.flat[0].platform
  model_config = resolve_for_platform(model_config, platform)
  shape = dict(arch=model_config.arch, num_layers=model_config.num_layers, d_model=model_config.d_model,
               num_heads=model_config.num_heads, batch_size=global_batch_size, seq_len=seq_len)

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
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated,
                     "rng": replicated}
  rng_key_data = jax.random.key_data(jax.random.key(seed))
  abstract_state = {"params": abstract_param_dict, "opt_state": abstract_opt_state,
                    "step": jax.ShapeDtypeStruct((), jnp.int32),
                    "rng": jax.ShapeDtypeStruct(rng_key_data.shape, rng_key_data.dtype)}
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, state_shardings)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_param_dict))

  def model_from_params(params, rest):
    return nnx.merge(graphdef, _state_from_pure_dict(abstract_params, params),
                     _state_from_pure_dict(abstract_rest, rest))

  # --- the step functions -------------------------------------------------------------------------------
  batch_sharding = sharding.batch_sharding(mesh)
  batch_shardings = {key: batch_sharding for key in BATCH_KEYS}

  def loss_sums(params, rest, batch):
    model = model_from_params(params, rest)
    hidden = model.hidden_states(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    return losses.masked_cross_entropy_sums(model, hidden, batch["targets"], batch["loss_mask"], loss_chunk_length)

  def grad_sums(params, rest, batch):
    (loss_sum, mask_sum), grads = jax.value_and_grad(
        lambda p: loss_sums(p, rest, batch), has_aux=True)(params)
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
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *sharding.batch_spec(mesh))))

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
          accumulate, (zero, zero, zeros), jax.tree.map(to_microbatches, batch))
    token_count = jnp.maximum(mask_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / token_count).astype(p.dtype), grads, params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": state["rng"]}
    step_metrics = {"loss": loss_sum / token_count, "grad_norm": grad_norm,
                    "learning_rate": optimizer_parts.learning_rate(state["step"]), "loss_tokens": mask_sum}
    return new_state, step_metrics

  def init_state():
    _, params, rest = nnx.split(new_model(), nnx.Param, ...)
    params = params.to_pure_dict()
    return ({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": rng_key_data}, rest.to_pure_dict())

  abstract_batch = {key: jax.ShapeDtypeStruct((global_batch_size, seq_len),
                                              jnp.float32 if key == "loss_mask" else jnp.int32,
                                              sharding=batch_sharding) for key in BATCH_KEYS}
  abstract_rest_arrays = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                      abstract_rest.to_pure_dict())
  return TrainProgram(
      model_config=model_config, mesh=mesh, platform=platform, seq_len=seq_len,
      global_batch_size=global_batch_size, num_microbatches=num_microbatches, microbatch_size=microbatch_size,
      flops_per_step_model=flops.flops_per_step(**shape, ffn_dim=model_config.ffn_dim,
                                                vocab_size=model_config.vocab_size),
      flops_per_step_table1=flops.flops_per_step(**shape), num_params=num_params, optimizer=optimizer_parts,
      param_shardings=param_shardings, state_shardings=state_shardings, rest_shardings=rest_shardings,
      batch_sharding=batch_sharding, abstract_state=abstract_state, abstract_rest=abstract_rest_arrays,
      abstract_batch=abstract_batch,
      train_step=jax.jit(train_step, in_shardings=(state_shardings, rest_shardings, batch_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(loss_sums, in_shardings=(param_shardings, rest_shardings, batch_shardings),
                        out_shardings=replicated),
      model_from_params=model_from_params,
      _init=jax.jit(init_state, out_shardings=(state_shardings, rest_shardings)),
      _init_rest=jax.jit(lambda: init_state()[1], out_shardings=rest_shardings))


def _greedy_sample(model_from_params, params, tokenizer, prompt: str, num_tokens: int) -> str:
  """Greedy continuation of `prompt` with prefill + decode_step (one sequence)."""
  prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
  tokens = jnp.asarray([prompt_ids], jnp.int32)
  segment_ids = jnp.ones_like(tokens)
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  max_length = tokens.shape[1] + num_tokens

  @jax.jit
  def prefill(params, tokens, segment_ids, positions):
    logits, decode_state = model_from_params(params).prefill(tokens, segment_ids=segment_ids, positions=positions,
                                                             max_length=max_length)
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
    eval_every_steps: int = 0,
    eval_batches: int = 4,
    log_every_steps: int = 1,
    enable_checkpointing: bool = True,
    checkpoint_every_steps: int = 1000,
    max_checkpoints_to_keep: int = 2,
    num_milestones: int = 57,
    milestone_dtype: str = "bfloat16",
    async_checkpointing: bool = True,
    peak_flops_per_device: float | None = None,
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
  sequence). `make_loader`: `lsm_jax.data.loader.make_loader` unless gin passes a configured one.
  `config_text`: the effective gin config, written to MODEL_DIR/config.gin. `run_name` (default
  `<arch>_<size>`) and `ablation` (e.g. 'aspect', 'context') name the run in run_metadata.json, and through it in
  evaluation tables, where two runs of one (arch, size) may differ in shape or context.

  Returns a summary: final step, last loss, last validation loss (or None) and the generated sample.
  """
  # --- configuration checks: all of them before anything is compiled -------------------------------------
  _check_positive_ints("trainer.train", log_every_steps=log_every_steps)
  if eval_every_steps < 0 or eval_batches < 1:
    raise ValueError(f"trainer.train.eval_every_steps must be >= 0 (0 = never) and eval_batches >= 1, got "
                     f"{eval_every_steps} and {eval_batches}")
  mesh = sharding.make_mesh(mesh_config)
  program = build_train_program(
      model_config, mesh=mesh, train_steps=train_steps, seq_len=seq_len, global_batch_size=global_batch_size,
      optimizer=optimizer, per_shard_microbatch_size=per_shard_microbatch_size,
      loss_chunk_length=loss_chunk_length, seed=seed)
  if global_batch_size % jax.process_count():
    raise ValueError(f"trainer.train.global_batch_size {global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  milestone_steps = []
  if enable_checkpointing and num_milestones:
    milestone_steps = checkpoint_lib.milestone_schedule(train_steps, num_milestones)
  make_loader = make_loader or loader_lib.make_loader
  setup_start = time.perf_counter()
  train_loader = make_loader(data_dir, split="train", seq_len=seq_len, global_batch_size=global_batch_size,
                             seed=seed)
  tokenizer = train_loader.tokenizer
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"tokenizer {tokenizer.name!r} has vocab_size {tokenizer.vocab_size} but "
                     f"model_config.vocab_size is {model_config.vocab_size}")
  validation_loader = None
  if eval_every_steps:
    validation_loader = make_loader(data_dir, split=validation_split, seq_len=seq_len,
                                    global_batch_size=global_batch_size, seed=seed)
  device_kind = jax.devices()[0].device_kind
  peak_flops = metrics_lib.peak_flops_per_device(device_kind, peak_flops_per_device)

  is_main_process = jax.process_index() == 0
  if is_main_process:
    os.makedirs(model_dir, exist_ok=True)
    if config_text is not None:
      with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
        f.write(config_text)
  logging.info("data ready in %.1f s; mesh %s on %d × %s; %d microbatch(es) of %d rows",
               time.perf_counter() - setup_start, dict(mesh.shape), jax.device_count(), device_kind,
               program.num_microbatches, program.microbatch_size)

  # --- checkpoints ---------------------------------------------------------------------------------------
  run_metadata = {
      "arch": model_config.arch, "size": model_config.size, "model_config": dataclasses.asdict(model_config),
      "run_name": run_name or f"{model_config.arch}_{model_config.size}", "ablation": ablation,
      "tokenizer": getattr(tokenizer, "spec", tokenizer.name), "seq_len": seq_len,
      "global_batch_size": global_batch_size, "train_steps": train_steps,
      "flops_per_step": program.flops_per_step_table1, "milestone_steps": list(milestone_steps),
      "code_version": checkpoint_lib.code_version(), "data_dir": data_dir, "seed": seed,
      "optimizer": dataclasses.asdict(optimizer), "mesh": dict(mesh.shape), "num_params": program.num_params,
  }
  checkpointer = None
  if enable_checkpointing:
    checkpointer = checkpoint_lib.Checkpointer(
        model_dir, save_interval_steps=checkpoint_every_steps, max_to_keep=max_checkpoints_to_keep,
        milestone_steps=milestone_steps, milestone_dtype=milestone_dtype, async_save=async_checkpointing,
        run_metadata=run_metadata)
  elif is_main_process:
    with open(os.path.join(model_dir, "run_metadata.json"), "w", encoding="utf-8") as f:
      json.dump(run_metadata, f, indent=2)

  with sharding.activate(mesh):
    restored = checkpointer.restore_latest(program.abstract_state) if checkpointer is not None else None
  if restored is not None:
    state, start_step = restored
    rest = program.init_rest()
    logging.info("resumed from step %d", start_step)
  else:
    state, rest = program.init()
    start_step = 0
  compiled_step = compiled_eval = None
  if start_step < train_steps:  # a finished run (e.g. a study's rerun) restores and returns without compiling
    compile_start = time.perf_counter()
    compiled_step = program.lower_train_step().compile()
    compiled_eval = program.lower_eval_step().compile() if validation_loader is not None else None
    logging.info("compiled in %.1f s; %d parameters", time.perf_counter() - compile_start, program.num_params)

  def global_batch(batch_loader, index):
    local = batch_loader.local_batch(index, jax.process_index(), jax.process_count())
    return {key: jax.make_array_from_process_local_data(program.batch_sharding, np.asarray(local[key]),
                                                        (global_batch_size, seq_len))
            for key in BATCH_KEYS}

  def validation_loss():
    loss_total, mask_total = 0.0, 0.0
    for index in range(eval_batches):
      loss_sum, mask_sum = jax.device_get(compiled_eval(state["params"], rest, global_batch(validation_loader, index)))
      loss_total += float(loss_sum)
      mask_total += float(mask_sum)
    return loss_total / max(mask_total, 1.0)

  if checkpointer is not None and restored is None:
    checkpointer.save(0, state, metadata={"tokens_seen": 0, "compute_pflops_days": 0.0})

  # --- the loop ------------------------------------------------------------------------------------------
  writer = metrics_lib.MetricsWriter(model_dir, enable_tensorboard=enable_tensorboard)
  if config_text is not None:
    writer.write_text("config", config_text)
  tokens_per_step = global_batch_size * seq_len
  num_devices = jax.device_count()
  last = {"step": start_step, "loss": None, "val_loss": None, "sample": None}
  progress = tqdm.tqdm(total=train_steps, initial=start_step, disable=not (progress_bar and is_main_process),
                       unit="step", dynamic_ncols=True)
  try:
    for step in range(start_step, train_steps):
      batch = global_batch(train_loader, step)
      step_start = time.perf_counter()
      state, step_metrics = compiled_step(state, rest, batch)
      step_metrics = jax.device_get(step_metrics)
      step_time = time.perf_counter() - step_start
      completed = step + 1
      scalars = {
          "loss": float(step_metrics["loss"]), "grad_norm": float(step_metrics["grad_norm"]),
          "learning_rate": float(step_metrics["learning_rate"]), "tokens_per_sec": tokens_per_step / step_time,
          "mfu": program.flops_per_step_model / step_time / (peak_flops * num_devices), "step_time_s": step_time,
          "tokens_seen": completed * tokens_per_step,
          "compute_pflops_days": flops.to_pflops_days(completed * program.flops_per_step_table1),
      }
      if not np.isfinite(scalars["loss"]):
        raise FloatingPointError(f"loss became {scalars['loss']} at step {step}")
      if compiled_eval is not None and (completed % eval_every_steps == 0 or completed == train_steps):
        scalars["val_loss"] = validation_loss()
        last["val_loss"] = scalars["val_loss"]
      if completed % log_every_steps == 0 or completed == train_steps or "val_loss" in scalars:
        writer.write(completed, scalars)
      last.update(step=completed, loss=scalars["loss"])
      progress.update(1)
      progress.set_postfix_str(metrics_lib.format_progress(scalars), refresh=False)
      if checkpointer is not None:
        checkpointer.save(completed, state, metadata={"tokens_seen": scalars["tokens_seen"],
                                                      "compute_pflops_days": scalars["compute_pflops_days"]})
        if checkpointer.reached_preemption(completed):
          logging.warning("preemption signal at step %d: checkpoint saved, stopping", completed)
          break
    else:
      if checkpointer is not None and start_step < train_steps:
        checkpointer.save(train_steps, state, force=True, metadata={
            "tokens_seen": train_steps * tokens_per_step,
            "compute_pflops_days": flops.to_pflops_days(train_steps * program.flops_per_step_table1)})
  finally:
    progress.close()
    writer.close()
    if checkpointer is not None:
      checkpointer.close()

  if sample_prompt is not None and sample_tokens > 0 and last["step"] == train_steps:
    with sharding.activate(mesh):
      last["sample"] = _greedy_sample(lambda params: program.model_from_params(params, rest), state["params"],
                                      tokenizer, sample_prompt, sample_tokens)
    if is_main_process:
      print(f"sample (greedy, step {last['step']}): {last['sample']!r}", flush=True)
  return last
