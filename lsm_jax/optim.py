"""Optimizer: optax AdamW with the paper's hyper-parameters and the learning-rate schedules we compare.

The paper (arXiv 2406.16690 §3.2) gives "Adam, LR 3e-4, weight decay 0.1" and "a fixed learning rate scheduler";
it does not give betas, epsilon or clipping. We use b1=0.9, b2=0.95, eps=1e-8 and global-norm clipping at 1.0,
the LLaMA / Pythia / Metaseq defaults for this size range, and read "fixed" as linear warm-up then constant.
Weight decay skips 1-D parameters (norm scales, biases, per-head decay/gain vectors): decaying them towards
zero only changes the function, it does not regularise capacity.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import optax

SCHEDULES = ("fixed", "cosine", "wsd")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  schedule: str = "fixed"
  warmup_steps: int = 2000
  # cosine: decay to min_learning_ratio × peak over the whole run; wsd: linear decay over the last
  # decay_fraction of the run.
  min_learning_ratio: float = 0.1
  decay_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  gradient_clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer schedule {self.schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
    if not 0.0 <= self.decay_fraction <= 1.0:
      raise ValueError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")
    if self.gradient_clip_norm is not None and self.gradient_clip_norm <= 0:
      raise ValueError(f"gradient_clip_norm must be positive or None, got {self.gradient_clip_norm}")


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  learning_rate: Callable[[jax.Array], jax.Array]  # step -> learning rate (the schedule, for logging)


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  # The warm-up does not shrink to fit a short run: with "fixed", the LR of step s must not depend on
  # total_steps, so a run extended later (or resumed with more steps) follows the same curve.
  peak = config.learning_rate
  warmup_steps = config.warmup_steps
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  if config.schedule == "fixed":
    after_warmup = optax.constant_schedule(peak)
  elif config.schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(
      peak, max(total_steps - warmup_steps, 1), alpha=config.min_learning_ratio
    )
  else:  # wsd: warm-up, stable, then a linear decay to min_learning_ratio × peak
    decay_steps = int(round(config.decay_fraction * total_steps))
    stable_steps = max(total_steps - warmup_steps - decay_steps, 0)
    after_warmup = optax.join_schedules(
      [
        optax.constant_schedule(peak),
        optax.linear_schedule(peak, config.min_learning_ratio * peak, max(decay_steps, 1)),
      ],
      [stable_steps],
    )
  if warmup_steps == 0:
    return after_warmup
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def matrix_mask(params):
  """True for parameters of rank >= 2. With layers stacked for scan, pass a mask that ignores the layer axis."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig, total_steps: int, weight_decay_mask=matrix_mask) -> Optimizer:
  """AdamW with clipping; `weight_decay_mask` is a pytree of bools like the params, or a callable on them."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  schedule = learning_rate_schedule(config, total_steps)
  adamw = optax.adamw(
    schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mask=weight_decay_mask
  )
  if config.gradient_clip_norm is None:
    return Optimizer(adamw, schedule)
  return Optimizer(optax.chain(optax.clip_by_global_norm(config.gradient_clip_norm), adamw), schedule)
