"""Levenberg-Marquardt damping against a plain replica of the gain-ratio rule, branch by branch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.transforms import levenberg_marquardt

P = jnp.asarray([1.0, -0.5, 0.3])
loss_fn = lambda f: 0.5 * jnp.sum(f**2) + 0.3 * jnp.sum(f**3)
model_fn = lambda p: p  # the Gauss-Newton matrix of an identity model is the loss Hessian


def _passing_step():
  """An inner transform whose step is its input, and which records the damping it was given."""
  seen = []

  def update(updates, state, params=None, *, damping=None, **extra):
    seen.append(damping)
    return updates, state

  return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update), seen


def _replica(
  s,
  damping,
  *,
  l2=0.0,
  low=0.25,
  high=0.75,
  increase=1.5,
  decrease=0.5,
  min_damping=1e-12,
  max_damping=1e6,
  gain_ratio_clip=5.0,
  reject_below=0.0,
):
  p, s = np.asarray(P), np.asarray(s)
  f = lambda w: float(loss_fn(jnp.asarray(w))) + 0.5 * l2 * float(np.dot(w, w))
  g = np.asarray(jax.grad(loss_fn)(P)) + l2 * p
  h = np.asarray(jax.hessian(loss_fn)(P))
  before, after = f(p), f(p + s) if np.all(np.isfinite(s)) else math.nan
  with np.errstate(all="ignore"):
    predicted = -(g @ s + 0.5 * (s @ h @ s + l2 * s @ s + damping * s @ s))
    ratio = (before - after) / predicted
  measured = bool(np.isfinite(ratio) and predicted > 1e-16)
  finite = bool(np.all(np.isfinite(s)))
  failed = finite and (not math.isfinite(after) or (not measured and after > before))
  rejected = failed or (reject_below is not None and measured and ratio <= reject_below)
  if measured:
    c = min(max(ratio, -gain_ratio_clip), gain_ratio_clip)
    factor = increase if c < low else (decrease if c > high else 1.0)
  else:
    factor = increase if failed else 1.0
  new = min(max(damping * factor, min_damping), max_damping)
  branch = (
    "failed"
    if failed
    else (
      "unmeasured"
      if not measured
      else ("rejected" if rejected else ("low" if c < low else "high" if c > high else "middle"))
    )
  )
  return new, (ratio if measured else 0.0), measured, rejected, branch


def _one_step(s, damping=1.0, **kwargs):
  inner, seen = _passing_step()
  settings = {k: v for k, v in kwargs.items() if k != "l2"}
  tx = levenberg_marquardt(inner, damping, l2_regularization=kwargs.get("l2", 0.0), **settings)
  step, state = tx.update(
    jnp.asarray(s), tx.init(P), P, model_fn=model_fn, loss_fn=loss_fn, damping=123.0
  )
  assert float(seen[0]) == damping  # the state's damping, not the caller's
  return step, state


E = np.eye(3)
# Along axis 1 the loss curves far from the model (H = 0.1 there, the cubic term dominates).
STEPS = {
  "high": -0.3 * E[0],  # rho = 1.02: the damping falls
  "middle": 0.5 * E[1],  # rho = 0.71
  "low": 0.8 * E[1],  # rho = 0.19: the damping rises
  "rejected": 1.0 * E[1],  # rho = -0.34: the loss rose
  "failed": 0.3 * E[0],  # an ascent step: nothing predicted, the loss rose
  "unmeasured": -0.5 * E[2],  # nothing predicted, the loss fell
}
DAMPING = 0.01


@pytest.mark.parametrize("l2", [0.0, 0.2])
@pytest.mark.parametrize("name", sorted(STEPS))
def test_the_damping_rule_and_rejection_equal_the_replica(name, l2):
  s = STEPS[name]
  step, state = _one_step(s, DAMPING, l2=l2)
  damping, ratio, measured, rejected, _ = _replica(s, DAMPING, l2=l2)
  assert float(state.damping) == pytest.approx(damping, rel=1e-12)
  assert float(state.gain_ratio) == pytest.approx(ratio, rel=1e-9, abs=1e-12)
  assert bool(state.measured) == measured and int(state.rejected) == int(rejected)
  np.testing.assert_array_equal(step, np.zeros(3) if rejected else s)


def test_the_steps_cover_every_branch_of_the_rule():
  assert {name: _replica(s, DAMPING)[-1] for name, s in STEPS.items()} == {n: n for n in STEPS}


@pytest.mark.parametrize(
  "kwargs",
  [
    {"low": 0.6, "high": 0.95, "increase": 3.0},
    {"decrease": 0.1},
    {"min_damping": 0.008},
    {"max_damping": 0.012},
    {"gain_ratio_clip": 0.7, "high": 0.72},
    {"reject_below": None},
    {"reject_below": 0.5},
  ],
)
def test_every_setting_enters_the_rule(kwargs):
  outcomes, defaults = [], []
  for s in STEPS.values():
    _, state = _one_step(s, DAMPING, **kwargs)
    damping, _, _, rejected, _ = _replica(s, DAMPING, **kwargs)
    assert float(state.damping) == pytest.approx(damping, rel=1e-12)
    assert int(state.rejected) == int(rejected)
    outcomes.append((damping, bool(rejected)))
    default_damping, _, _, default_rejected, _ = _replica(s, DAMPING)
    defaults.append((default_damping, bool(default_rejected)))
  assert outcomes != defaults  # the setting mattered


def test_a_non_finite_step_passes_through_with_the_damping_unchanged():
  s = np.asarray([math.nan, 0.0, 0.0])
  step, state = _one_step(s, 2.0)
  assert math.isnan(float(step[0]))
  assert float(state.damping) == 2.0 and not bool(state.measured)
  assert int(state.rejected) == 0 and float(state.gain_ratio) == 0.0


def test_a_step_to_a_non_finite_loss_is_rejected():
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner, 1.0)
  log_loss = lambda f: -jnp.sum(jnp.log(f))
  w = jnp.asarray([1.0, 1.0])
  step, state = tx.update(
    jnp.asarray([-2.0, 0.0]), tx.init(w), w, model_fn=model_fn, loss_fn=log_loss
  )
  np.testing.assert_array_equal(step, 0.0)
  assert int(state.rejected) == 1 and float(state.damping) == 1.5


def test_state_dtypes_follow_the_parameters():
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner, 1.0)
  state = tx.init(P.astype(jnp.float32))
  assert state.damping.dtype == jnp.float32 and state.gain_ratio.dtype == jnp.float32
  assert state.measured.dtype == jnp.bool_ and state.rejected.dtype == jnp.int32
  assert float(state.damping) == 1.0 and not bool(state.measured)
  _, state = tx.update(
    P.astype(jnp.float32) * -0.1, state, P.astype(jnp.float32), model_fn=model_fn, loss_fn=loss_fn
  )
  assert state.damping.dtype == jnp.float32 and state.gain_ratio.dtype == jnp.float32


def test_missing_pieces_and_bad_settings_are_named():
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner, name="lm")
  with pytest.raises(
    ValueError, match=r"lm needs params in update\(updates, state, params, \.\.\.\)"
  ):
    tx.update(P, tx.init(P), None, model_fn=model_fn, loss_fn=loss_fn)
  with pytest.raises(TypeError, match="lm needs the model and the loss apart"):
    tx.update(P, tx.init(P), P, model_fn=model_fn)
  for kwargs, match in (
    ({"initial_damping": 0.0}, "initial_damping must be a finite number > 0"),
    ({"increase": 0.9}, r"increase must be in \[1.0, inf\)"),
    ({"decrease": 1.0}, r"decrease must be in \[0.0, 1.0\)"),
    ({"decrease": 0.0}, "decrease must be a finite number > 0"),
    ({"min_damping": 0.0}, "min_damping must be a finite number > 0"),
    ({"max_damping": -1.0}, "max_damping must be a finite number > 0"),
    ({"gain_ratio_clip": 0.0}, "gain_ratio_clip must be a finite number > 0"),
    (
      {"low": 0.8, "high": 0.7},
      r"need low <= high and min_damping <= max_damping, got 0.8, 0.7, 1e-12, 1000000.0",
    ),
    ({"min_damping": 2.0, "max_damping": 1.0}, "need low <= high"),
  ):
    with pytest.raises(ValueError, match=match):
      levenberg_marquardt(inner, **kwargs)
  levenberg_marquardt(inner, low=0.5, high=0.5, min_damping=1.0, max_damping=1.0)  # equal ends


def test_the_defaults_damping_one_no_penalty_and_a_clip_at_five():
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner)
  state = tx.init(P)
  assert float(state.damping) == 1.0
  s = STEPS["middle"]
  _, state = tx.update(jnp.asarray(s), state, P, model_fn=model_fn, loss_fn=loss_fn)
  damping, ratio, _, _, _ = _replica(s, 1.0)  # l2 = 0
  assert float(state.gain_ratio) == pytest.approx(ratio, rel=1e-9)
  assert float(state.damping) == pytest.approx(damping, rel=1e-12)
  # rho = -6.2 is clipped to -5, above low = -5.5: the damping stays (unclipped, it would rise).
  s = 2.0 * E[1]
  assert _replica(s, DAMPING, low=-5.5)[1] < -6.0
  _, state = _one_step(s, DAMPING, low=-5.5)
  assert float(state.damping) == DAMPING
  with pytest.raises(ValueError, match=r"^levenberg_marquardt needs params in update"):
    tx.update(P, tx.init(P), None, model_fn=model_fn, loss_fn=loss_fn)


def test_an_l2_mask_that_excludes_the_parameters_removes_the_penalty():
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner, DAMPING, l2_regularization=0.2, l2_mask=False)
  s = STEPS["middle"]
  _, state = tx.update(jnp.asarray(s), tx.init(P), P, model_fn=model_fn, loss_fn=loss_fn)
  assert float(state.gain_ratio) == pytest.approx(_replica(s, DAMPING)[1], rel=1e-9)


def test_the_inner_transform_gets_its_state_params_model_loss_and_extra_arguments():
  calls = []

  def init(params):
    return {"count": jnp.zeros((), jnp.int32), "like": jnp.zeros_like(params)}

  def update(updates, state, params=None, **extra):
    calls.append((params, extra))
    return updates, {"count": state["count"] + 1, "like": state["like"]}

  tx = levenberg_marquardt(optax.GradientTransformationExtraArgs(init, update), DAMPING)
  state = tx.init(P)
  for _ in range(2):
    _, state = tx.update(
      jnp.asarray(STEPS["middle"]), state, P, model_fn=model_fn, loss_fn=loss_fn, batch=7
    )
  assert int(state.inner_state["count"]) == 2 and state.inner_state["like"].shape == (3,)
  params, extra = calls[-1]
  assert params is P and extra["model_fn"] is model_fn and extra["loss_fn"] is loss_fn
  assert extra["batch"] == 7 and float(extra["damping"]) == DAMPING  # middle: unchanged


def test_a_zero_step_keeps_the_damping_and_is_not_rejected():
  step, state = _one_step(np.zeros(3), DAMPING)
  np.testing.assert_array_equal(step, 0.0)
  assert float(state.damping) == DAMPING and int(state.rejected) == 0
  assert not bool(state.measured)


def test_a_step_that_leaves_the_loss_unchanged_is_rejected():
  # cos is even: from -1 to +1 the loss is unchanged, while the model predicted a decrease
  # (2 sin 1 - 2 cos 1 - 2 damping > 0): rho = 0, which is at most reject_below = 0.
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner, DAMPING)
  w = jnp.asarray([-1.0])
  step, state = tx.update(
    jnp.asarray([2.0]), tx.init(w), w, model_fn=model_fn, loss_fn=lambda f: -jnp.sum(jnp.cos(f))
  )
  assert bool(state.measured) and float(state.gain_ratio) == 0.0
  np.testing.assert_array_equal(step, 0.0)
  assert int(state.rejected) == 1


def test_masked_parameters_are_refused_by_name():
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner, name="lm")
  params = {"a": P, "b": optax.MaskedNode()}
  with pytest.raises(TypeError, match="lm evaluates the loss"):
    tx.update(params, tx.init(params), params, model_fn=lambda p: p["a"], loss_fn=loss_fn)


def test_bfloat16_parameters_and_steps_are_measured_in_float32():
  inner, _ = _passing_step()
  tx = levenberg_marquardt(inner, DAMPING)
  p16, s16 = P.astype(jnp.bfloat16), jnp.asarray(STEPS["middle"], jnp.bfloat16)
  _, state = tx.update(s16, tx.init(p16), p16, model_fn=model_fn, loss_fn=loss_fn)
  p32, s32 = p16.astype(jnp.float32), s16.astype(jnp.float32)
  _, expected = tx.update(s32, tx.init(p32), p32, model_fn=model_fn, loss_fn=loss_fn)
  assert state.gain_ratio.dtype == jnp.float32
  assert float(state.gain_ratio) == float(expected.gain_ratio)
