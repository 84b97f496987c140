"""AdamW recipe and learning-rate schedules, checked against closed-form values."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsm_jax import optim


def test_fixed_schedule_is_linear_warmup_then_constant():
  config = optim.OptimizerConfig(learning_rate=3e-4, schedule="fixed", warmup_steps=100)
  schedule = optim.learning_rate_schedule(config, total_steps=1000)
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 50, 100, 500, 999, 5000)], [0.0, 1.5e-4, 3e-4, 3e-4, 3e-4, 3e-4], rtol=1e-6
  )


def test_fixed_schedule_does_not_depend_on_the_run_length():
  config = optim.OptimizerConfig(learning_rate=3e-4, schedule="fixed", warmup_steps=100)
  short = optim.learning_rate_schedule(config, total_steps=40)
  long = optim.learning_rate_schedule(config, total_steps=100_000)
  np.testing.assert_array_equal([short(s) for s in range(40)], [long(s) for s in range(40)])


def test_cosine_schedule_reaches_the_floor_at_the_end():
  config = optim.OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=10, min_learning_ratio=0.1)
  schedule = optim.learning_rate_schedule(config, total_steps=110)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  # halfway through the decay: floor + (peak - floor) / 2
  np.testing.assert_allclose(schedule(60), 1e-4 + 0.5 * 9e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(110), 1e-4, rtol=1e-5)


def test_wsd_schedule_holds_then_decays_over_the_last_fraction():
  config = optim.OptimizerConfig(
    learning_rate=1e-3, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_learning_ratio=0.0
  )
  schedule = optim.learning_rate_schedule(config, total_steps=100)
  np.testing.assert_allclose([schedule(s) for s in (10, 50, 80, 90, 100)], [1e-3, 1e-3, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_paper_defaults():
  config = optim.OptimizerConfig()
  assert (config.learning_rate, config.weight_decay, config.schedule) == (3e-4, 0.1, "fixed")
  assert (config.b1, config.b2, config.eps, config.gradient_clip_norm) == (0.9, 0.95, 1e-8, 1.0)


def test_weight_decay_applies_to_matrices_only():
  # With a zero gradient AdamW's update is exactly -lr * weight_decay * param (decoupled decay).
  config = optim.OptimizerConfig(learning_rate=0.5, warmup_steps=0, weight_decay=0.1)
  tx = optim.make_optimizer(config, total_steps=10).tx
  params = {"kernel": jnp.full((3, 4), 2.0), "norm_scale": jnp.full((4,), 2.0)}
  grads = {"kernel": jnp.zeros((3, 4)), "norm_scale": jnp.zeros((4,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.5 * 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["norm_scale"], 0.0)


def test_explicit_mask_keeps_stacked_vectors_undecayed():
  config = optim.OptimizerConfig(learning_rate=0.5, warmup_steps=0)
  params = {"stacked_norm": jnp.ones((4, 8))}
  tx = optim.make_optimizer(config, 10, weight_decay_mask={"stacked_norm": False}).tx
  updates, _ = tx.update({"stacked_norm": jnp.zeros((4, 8))}, tx.init(params), params)
  np.testing.assert_array_equal(updates["stacked_norm"], 0.0)


def test_gradients_are_clipped_to_global_norm_before_adam():
  config = optim.OptimizerConfig(warmup_steps=0, gradient_clip_norm=1.0)
  tx = optim.make_optimizer(config, 10).tx
  params = {"a": jnp.zeros((2, 2))}
  grads = {"a": jnp.full((2, 2), 5.0)}  # global norm 10
  _, state = tx.update(grads, tx.init(params), params)
  adam_state = next(s for s in optax.tree_utils.tree_get_all_with_path(state, "mu"))[1]
  # first moment after one step = (1 - b1) * clipped gradient = 0.1 * 5 / 10
  np.testing.assert_allclose(adam_state["a"], 0.1 * 0.5, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"schedule": "linear"}, "schedule 'linear' is unknown; valid: fixed, cosine, wsd"),
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"decay_fraction": 1.5}, "decay_fraction must lie in"),
    ({"gradient_clip_norm": -1.0}, "gradient_clip_norm must be positive"),
  ],
)
def test_bad_optimizer_config_fails_clearly(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optim.OptimizerConfig(**kwargs)
