"""Levenberg-Marquardt damping from the gain ratio, around any damped transform."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.transforms.gauss_newton._model import GaussNewtonModel, Mask, require_model_and_loss

PyTree = Any


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real)


class LevenbergMarquardtState(NamedTuple):
  """State of `levenberg_marquardt`.

  Attributes:
    damping: the damping the next step uses.
    gain_ratio: the last step's actual over predicted decrease (0 if unmeasured).
    measured: whether the last step's gain ratio could be measured (a state
      holds no NaN sentinel: `skip_nonfinite` treats NaN as corruption).
    rejected: how many steps were rejected (not applied).
    inner_state: the wrapped transform's state.
  """

  damping: jax.Array
  gain_ratio: jax.Array
  measured: jax.Array
  rejected: jax.Array
  inner_state: Any


def levenberg_marquardt(
  inner: optax.GradientTransformation,
  initial_damping: float = 1.0,
  *,
  increase: float = 1.5,
  decrease: float = 0.5,
  low: float = 0.25,
  high: float = 0.75,
  min_damping: float = 1e-12,
  max_damping: float = 1e6,
  gain_ratio_clip: float = 5.0,
  reject_below: float | None = 0.0,
  l2_regularization: float = 0.0,
  l2_mask: Mask = None,
  name: str = "levenberg_marquardt",
) -> optax.GradientTransformationExtraArgs:
  """Adapts the damping of `inner` from the gain ratio of the step it takes.

  `inner` (typically `chain(scale_by_egn, ..., scale_by_learning_rate)`) is
  called with the extra argument `damping`. For the step `s` it returns,
  `rho = (f(p) - f(p + s)) / pred`, with the damped Gauss-Newton model's
  `pred = -(g^T s + (s^T G s + damping ||s||^2)/2)` and `f =
  loss_fn(model_fn(.)) + l2/2 ||mask p||^2` on the current batch (one JVP,
  one forward pass). Then (somax v1's trust-region policy) `rho < low`:
  `damping *= increase`; `rho > high`: `damping *= decrease`; `rho` clipped
  to `+-gain_ratio_clip`, the damping to `[min_damping, max_damping]`, and
  left alone when `rho` is not finite or `pred <= 1e-16`. A step with
  `rho <= reject_below` (by default: the loss went up) is rejected: the
  update is zero and the damping rises (`None` never rejects on `rho`, as
  somax v1). So is a step after which the loss is not finite, or rose where
  `pred <= 1e-16` left nothing to measure (a step too long for the model,
  e.g. from momentum). `inner`'s state advances either way.

  Args:
    inner: the damped transform; reads the extra argument `damping`.
    initial_damping: damping of the first step (> 0).
    increase: factor after a poor step (> 1).
    decrease: factor after a good step (in (0, 1)).
    low: gain ratio below which the damping rises.
    high: gain ratio above which it falls.
    min_damping: lower clamp.
    max_damping: upper clamp.
    gain_ratio_clip: `rho` is clipped to `[-clip, clip]` before the rule.
    reject_below: steps whose gain ratio is at most this are not applied.
    l2_regularization: the coupled L2 term of the objective (as in `scale_by_egn`).
    l2_mask: which leaves it penalizes.
    name: for error messages.

  Examples:
    >>> import jax.numpy as jnp, optax, curvopt
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 2.0])
    >>> tx = curvopt.transforms.levenberg_marquardt(
    ...     optax.chain(curvopt.transforms.scale_by_egn(), optax.scale(-1.0)), 1.0)
    >>> w = jnp.zeros(2)
    >>> s, state = tx.update(w, tx.init(w), w, model_fn=lambda w: x @ w,
    ...                      loss_fn=lambda f: 0.5 * jnp.sum((f - y) ** 2))
    >>> float(state.damping)  # exact model of a quadratic: rho = 1, damping halves
    0.5

  References:
    Levenberg 1944; Marquardt 1963; Nocedal and Wright, "Numerical
    Optimization", ch. 4 (gain ratio); somax v1 (trust_region.py) for the constants.
  """
  _checks.positive("initial_damping", initial_damping)
  _checks.in_range("increase", increase, 1.0, float("inf"))
  _checks.in_range("decrease", decrease, 0.0, 1.0)
  _checks.positive("decrease", decrease)
  _checks.positive("min_damping", min_damping)
  _checks.positive("max_damping", max_damping)
  _checks.positive("gain_ratio_clip", gain_ratio_clip)
  numbers_given = all(map(_is_number, (low, high, min_damping, max_damping)))
  if numbers_given and (low > high or min_damping > max_damping):
    raise ValueError(
      f"need low <= high and min_damping <= max_damping, got {low}, {high}, "
      f"{min_damping}, {max_damping}."
    )

  def init(params: PyTree) -> LevenbergMarquardtState:
    dtype = _tree.working_dtype(_tree.structure_of(params))
    return LevenbergMarquardtState(
      jnp.asarray(initial_damping, dtype),
      jnp.zeros((), dtype),
      jnp.array(False),
      jnp.zeros((), jnp.int32),
      inner.init(params),
    )

  def update(updates, state, params=None, *, model_fn=None, loss_fn=None, **extra_args):
    model_fn, loss_fn = require_model_and_loss(name, model_fn, loss_fn, params)
    if params is None:
      raise ValueError(f"{name} needs params in update(updates, state, params, ...).")
    extra_args.pop("damping", None)
    step, inner_state = inner.update(
      updates,
      state.inner_state,
      params,
      model_fn=model_fn,
      loss_fn=loss_fn,
      damping=state.damping,
      **extra_args,
    )
    model = GaussNewtonModel(model_fn, loss_fn, l2_regularization, l2_mask)
    working = _tree.cast(params, state.damping.dtype)
    s = _tree.cast(step, state.damping.dtype)
    before, predicted = model.value_and_predicted_decrease(working, s, state.damping)
    predicted = predicted.astype(state.damping.dtype)
    after = model.value(jax.tree.map(jnp.add, working, s))
    ratio = ((before - after) / predicted).astype(state.damping.dtype)
    measured = jnp.isfinite(ratio) & (predicted > 1e-16)
    # A non-finite step (a NaN learning rate, a NaN gradient) is not the damping's fault:
    # it passes through unchanged so the guard around the optimizer skips it, counts it
    # in `skipped` and keeps this state as it was.
    proposed_finite = jnp.isfinite(_tree.max_abs(s))
    # The loss rose (or became non-finite) where the model saw no decrease to measure.
    failed = proposed_finite & (~jnp.isfinite(after) | (~measured & (after > before)))
    rejected = failed
    if reject_below is not None:
      rejected = rejected | (measured & (ratio <= reject_below))
    clipped = jnp.clip(ratio, -gain_ratio_clip, gain_ratio_clip)
    factor = jnp.where(clipped < low, increase, jnp.where(clipped > high, decrease, 1.0))
    factor = jnp.where(measured, factor, jnp.where(failed, increase, 1.0))
    damping = jnp.clip(state.damping * factor, min_damping, max_damping).astype(state.damping.dtype)
    step = jax.tree.map(lambda u: jnp.where(rejected, jnp.zeros_like(u), u), step)
    new_state = LevenbergMarquardtState(
      damping,
      jnp.where(measured, ratio, 0.0).astype(state.damping.dtype),
      measured,
      state.rejected + rejected.astype(jnp.int32),
      inner_state,
    )
    return step, new_state

  return optax.GradientTransformationExtraArgs(init, update)
