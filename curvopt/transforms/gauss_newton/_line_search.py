"""Armijo backtracking that never accepts an increase of the loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.transforms._extra_args import require_value_fn
from curvopt.transforms.gauss_newton._model import GaussNewtonModel, require_model_and_loss

PyTree = Any
Objective = Callable[[dict], Callable[[PyTree], jax.Array]]


class ArmijoState(NamedTuple):
  """State of `scale_by_armijo_backtracking`.

  Attributes:
    learning_rate: the last step size tried (accepted, or the smallest on failure).
    failures: searches that found no decrease (their update was zero).
  """

  learning_rate: jax.Array
  failures: jax.Array


def value_fn_objective(extra_args: dict) -> Callable[[PyTree], jax.Array]:
  """The objective is the extra argument `value_fn`."""
  return require_value_fn("scale_by_armijo_backtracking", extra_args.get("value_fn"))


def gauss_newton_objective(l2_regularization: Any = 0.0, l2_mask: Any = None) -> Objective:
  """The objective is `loss_fn(model_fn(p))` (plus an L2 term), from those extra arguments.

  For `scale_by_armijo_backtracking(objective=...)` in Gauss-Newton methods,
  whose callers pass the model and the loss apart rather than `value_fn`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> objective = curvopt.transforms.gauss_newton_objective(l2_regularization=2.0)
    >>> value_fn = objective({"model_fn": lambda w: 3 * w, "loss_fn": jnp.sum})
    >>> value_fn(jnp.array([1.0]))  # 3 + (2/2) * 1^2
    Array(4., dtype=float32)

  References:
    Korbit, Adeoye, Bemporad, Zanon 2024 (the line search of EGN).
  """

  def objective(extra_args: dict) -> Callable[[PyTree], jax.Array]:
    model_fn, loss_fn = require_model_and_loss(
      "the line search", extra_args.get("model_fn"), extra_args.get("loss_fn")
    )
    return GaussNewtonModel(model_fn, loss_fn, l2_regularization, l2_mask).value

  return objective


def scale_by_armijo_backtracking(
  max_learning_rate: float = 1.0,
  *,
  slope_fraction: float = 0.1,
  decrease_factor: float = 0.8,
  increase_factor: float = 1.5,
  max_steps: int = 15,
  objective: Objective = value_fn_objective,
) -> optax.GradientTransformationExtraArgs:
  """Scales a descent update `u` by the first `a` with sufficient decrease.

  Tries `a_0 = min(increase_factor a_prev, max_learning_rate)`, then
  `a_0 decrease_factor^i`, for at most `max_steps` trials, and accepts the
  first with `f(p + a u) <= f(p) + slope_fraction a min(g^T u, 0)` (Armijo
  on the current batch; the `min` means an ascent direction is accepted only
  where the loss does not rise). If none passes, the update is zero and
  `failures` counts it: the loss never increases, unlike
  `optax.scale_by_backtracking_linesearch`, which keeps its last trial.
  Defaults are the EGN paper-era code's (aggressiveness 0.9, factor 0.8,
  15 trials, growth 1.5). One gradient and up to `max_steps` losses per
  step, in a `lax.while_loop`.

  Args:
    max_learning_rate: the largest step size tried (and the first).
    slope_fraction: `c` in the Armijo test, in (0, 1).
    decrease_factor: shrink factor between trials, in (0, 1).
    increase_factor: growth of the first trial over the last accepted step (>= 1).
    max_steps: trials per step.
    objective: `extra_args -> (params -> scalar)`; default: the extra
      argument `value_fn`. `gauss_newton_objective()` builds it from
      `model_fn` and `loss_fn`.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_armijo_backtracking(max_learning_rate=4.0)
    >>> value_fn = lambda w: jnp.sum(w**2)
    >>> w = jnp.array([1.0])
    >>> u, state = tx.update(-jax.grad(value_fn)(w), tx.init(w), w, value_fn=value_fn)
    >>> state.learning_rate  # 4 * 0.8^7: the first trial with sufficient decrease
    Array(0.8388609, dtype=float32)

  References:
    Armijo 1966; Vaswani et al., "Painless Stochastic Gradient", 2019 (on
    the batch); Korbit et al. 2024 (its use in EGN).
  """
  _checks.positive("max_learning_rate", max_learning_rate)
  _checks.in_range("slope_fraction", slope_fraction, 0.0, 1.0)
  _checks.in_range("decrease_factor", decrease_factor, 0.0, 1.0)
  _checks.positive("decrease_factor", decrease_factor)
  _checks.in_range("increase_factor", increase_factor, 1.0, float("inf"))
  max_steps = _checks.positive_int("max_steps", max_steps)

  def init(params: PyTree) -> ArmijoState:
    dtype = _tree.working_dtype(_tree.structure_of(params))
    return ArmijoState(jnp.asarray(max_learning_rate, dtype), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("scale_by_armijo_backtracking needs params in update(..., params, ...).")
    value_fn = objective(extra_args)
    dtype = state.learning_rate.dtype
    value, grad = jax.value_and_grad(value_fn)(params)
    value = value.astype(dtype)
    slope = jnp.minimum(_tree.dot(_tree.cast(grad, dtype), _tree.cast(updates, dtype)), 0.0)

    def trial_value(rate):
      trial = jax.tree.map(lambda p, u: p + (rate * u).astype(p.dtype), params, updates)
      return value_fn(trial).astype(dtype)

    def searching(carry):
      _, trials, accepted = carry
      return (~accepted) & (trials < max_steps)

    def try_next(carry):
      rate, trials, _ = carry
      rate = jnp.where(trials > 0, rate * decrease_factor, rate)
      accepted = trial_value(rate) <= value + slope_fraction * rate * slope
      return rate, trials + 1, accepted

    first = jnp.minimum(increase_factor * state.learning_rate, max_learning_rate).astype(dtype)
    rate, _, accepted = jax.lax.while_loop(
      searching, try_next, (first, jnp.zeros((), jnp.int32), jnp.array(False))
    )
    applied = jnp.where(accepted, rate, 0.0)
    scaled = jax.tree.map(lambda u: (applied * u.astype(dtype)).astype(u.dtype), updates)
    return scaled, ArmijoState(rate, state.failures + (~accepted).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init, update)
