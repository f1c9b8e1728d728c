"""Armijo backtracking against a plain-Python replica of the search, and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.transforms import gauss_newton_objective, scale_by_armijo_backtracking


def _replica(f, p, u, previous, maximum=1.0, c=0.1, shrink=0.8, grow=1.5, trials=15):
  """The search in plain Python: (rate, accepted)."""
  value, slope = f(p), min(float(jnp.vdot(jax.grad(f)(p), u)), 0.0)
  rate = min(grow * previous, maximum)
  for t in range(trials):
    if t > 0:
      rate *= shrink
    if f(p + rate * u) <= value + c * rate * slope:
      return rate, True
  return rate, False


def quartic(w):
  return jnp.sum(w**4) + 0.5 * jnp.sum(w**2)


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {
      "max_learning_rate": 4.0,
      "slope_fraction": 0.5,
      "decrease_factor": 0.5,
      "increase_factor": 2.0,
      "max_steps": 4,
    },
  ],
)
def test_each_step_takes_the_first_trial_with_sufficient_decrease(kwargs):
  names = {
    "max_learning_rate": "maximum",
    "slope_fraction": "c",
    "decrease_factor": "shrink",
    "increase_factor": "grow",
    "max_steps": "trials",
  }
  settings = {names[k]: v for k, v in kwargs.items()}
  tx = scale_by_armijo_backtracking(**kwargs)
  w = jnp.asarray([1.5, -0.7, 0.2])
  state = tx.init(w)
  previous, failures = kwargs.get("max_learning_rate", 1.0), 0
  assert float(state.learning_rate) == previous and int(state.failures) == 0
  for _ in range(4):
    u = -2.0 * jax.grad(quartic)(w)  # a long descent step: backtracking is needed
    step, state = tx.update(u, state, w, value_fn=quartic)
    rate, accepted = _replica(quartic, w, u, previous, **settings)
    failures += not accepted
    assert float(state.learning_rate) == pytest.approx(rate, rel=1e-14)
    assert int(state.failures) == failures
    np.testing.assert_allclose(step, (rate if accepted else 0.0) * u, rtol=1e-14)
    w, previous = w + step, rate


def test_an_ascent_direction_is_refused_with_a_zero_update_and_counted():
  tx = scale_by_armijo_backtracking(max_steps=5)
  w = jnp.asarray([1.0, -2.0])
  state = tx.init(w)
  for n in (1, 2):
    step, state = tx.update(jax.grad(quartic)(w), state, w, value_fn=quartic)
    np.testing.assert_array_equal(step, 0.0)
    assert int(state.failures) == n
  # The last trial's rate is kept: 0.8^4 of the first, which grew from the last (1.0, capped).
  assert float(state.learning_rate) == pytest.approx(0.8**4 * min(1.5 * 0.8**4, 1.0), rel=1e-14)


def test_an_ascent_direction_is_taken_only_where_the_loss_falls():
  # f(a) = a/2 - a^2 along u = +1 from 0: slope +1/2, f(a) <= 0 exactly for a >= 1/2.
  value_fn = lambda w: jnp.sum(0.5 * w - w**2)
  w, u = jnp.zeros(1), jnp.ones(1)
  for maximum, expected in ((1.0, 1.0), (0.48, 0.0)):  # f(0.48) = 0.0096 > 0: refused
    tx = scale_by_armijo_backtracking(max_learning_rate=maximum, max_steps=3)
    step, state = tx.update(u, tx.init(w), w, value_fn=value_fn)
    np.testing.assert_array_equal(step, [expected])
    assert int(state.failures) == (expected == 0.0)


def test_the_defaults_are_fifteen_trials_and_no_penalty():
  tx = scale_by_armijo_backtracking()
  w = jnp.asarray([1.0, -2.0])
  step, state = tx.update(jax.grad(quartic)(w), tx.init(w), w, value_fn=quartic)
  np.testing.assert_array_equal(step, 0.0)
  assert float(state.learning_rate) == pytest.approx(0.8**14, rel=1e-14)
  value_fn = gauss_newton_objective()({"model_fn": lambda p: 3.0 * p, "loss_fn": jnp.sum})
  assert float(value_fn(jnp.asarray([1.0, 2.0]))) == 9.0


def test_the_loss_sees_trial_parameters_in_their_own_dtype():
  def value_fn(w):
    assert w.dtype == jnp.bfloat16, w.dtype  # at trace time, for every trial
    return quartic(w.astype(jnp.float32))

  tx = scale_by_armijo_backtracking()
  w = jnp.asarray([1.5, -0.7], jnp.bfloat16)
  step, state = tx.update(-jax.grad(value_fn)(w), tx.init(w), w, value_fn=value_fn)
  assert step.dtype == jnp.bfloat16 and int(state.failures) == 0


@pytest.mark.parametrize("excess", [0.4, 0.6])
def test_a_float64_loss_of_float32_parameters_is_compared_in_float32(excess):
  # A rise of 1e-12 from 1 + excess ulp: invisible in float32 whichever way the value rounds.
  base = 1.0 + excess * 2.0**-23
  value_fn = lambda w: base + 1e-12 * jnp.sum(w.astype(jnp.float64))
  tx = scale_by_armijo_backtracking()
  w = jnp.ones(1, jnp.float32)
  step, state = tx.update(jnp.ones(1, jnp.float32), tx.init(w), w, value_fn=value_fn)
  np.testing.assert_array_equal(step, [1.0])
  assert int(state.failures) == 0


def test_a_flat_step_that_does_not_raise_the_loss_is_accepted_at_the_first_trial():
  # A loss constant along u: slope 0, f(p + a u) = f(p), accepted at once.
  value_fn = lambda w: (w[0] - 1.0) ** 2
  tx = scale_by_armijo_backtracking()
  w = jnp.asarray([0.0, 0.0])
  step, state = tx.update(jnp.asarray([0.0, 3.0]), tx.init(w), w, value_fn=value_fn)
  np.testing.assert_array_equal(step, [0.0, 3.0])
  assert float(state.learning_rate) == 1.0 and int(state.failures) == 0


def test_float32_parameters_search_in_float32_and_updates_keep_their_dtype():
  tx = scale_by_armijo_backtracking()
  w = jnp.asarray([1.5, -0.7], jnp.float32)
  state = tx.init(w)
  assert state.learning_rate.dtype == jnp.float32 and state.failures.dtype == jnp.int32
  u = (-jax.grad(quartic)(w)).astype(jnp.bfloat16)
  step, state = tx.update(u, state, w, value_fn=quartic)
  assert step.dtype == jnp.bfloat16 and state.learning_rate.dtype == jnp.float32


def test_gauss_newton_objective_is_the_penalized_loss_of_the_model():
  objective = gauss_newton_objective(l2_regularization=2.0, l2_mask={"a": True, "b": False})
  value_fn = objective({"model_fn": lambda p: 3.0 * p["a"] + p["b"], "loss_fn": jnp.sum})
  params = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([5.0, 5.0])}
  assert float(value_fn(params)) == 9.0 + 10.0 + 0.5 * 2.0 * 5.0
  with pytest.raises(
    TypeError, match=r"the line search needs the model and the loss apart.*loss_fn missing"
  ):
    objective({"model_fn": lambda p: p})


def test_missing_params_or_value_fn_and_bad_settings_are_named():
  tx = scale_by_armijo_backtracking()
  w = jnp.ones(2)
  with pytest.raises(
    ValueError,
    match=r"^scale_by_armijo_backtracking needs params in update\(\.\.\., params, \.\.\.\)\.$",
  ):
    tx.update(w, tx.init(w), None, value_fn=quartic)
  with pytest.raises(
    TypeError, match="scale_by_armijo_backtracking needs the loss as an extra argument"
  ):
    tx.update(w, tx.init(w), w)
  for kwargs, match in (
    ({"max_learning_rate": 0.0}, "max_learning_rate must be a finite number > 0"),
    ({"slope_fraction": 1.0}, r"slope_fraction must be in \[0.0, 1.0\)"),
    ({"decrease_factor": 1.0}, r"decrease_factor must be in \[0.0, 1.0\)"),
    ({"decrease_factor": 0.0}, "decrease_factor must be a finite number > 0"),
    ({"increase_factor": 0.99}, r"increase_factor must be in \[1.0, inf\)"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
  ):
    with pytest.raises(ValueError, match=match):
      scale_by_armijo_backtracking(**kwargs)
  scale_by_armijo_backtracking(slope_fraction=0.0, increase_factor=1.0)  # both ends allowed
