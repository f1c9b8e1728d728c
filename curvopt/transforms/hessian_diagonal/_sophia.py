"""Sophia's scaling: a clipped diagonal Newton step with a lazily refreshed Hessian diagonal."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.transforms._cadence import refresh_if_due
from curvopt.transforms.hessian_diagonal._hutchinson import hutchinson_diagonal_estimator

PyTree = Any


class ScaleBySophiaState(NamedTuple):
  """State of `scale_by_sophia_h`; float32 whatever the parameter dtype.

  Attributes:
    count: steps taken (int32).
    mu: EMA of gradients.
    nu: EMA of Hessian-diagonal estimates, refreshed every `refresh_every` steps.
    estimator: the state of the Hessian-diagonal estimator (its PRNG key).
  """

  count: jax.Array
  mu: PyTree
  nu: PyTree
  estimator: Any


def scale_by_sophia_h(
  b1: float = 0.965,
  b2: float = 0.99,
  gamma: float = 0.01,
  eps: float = 1e-8,
  clip_threshold: float = 1.0,
  *,
  refresh_every: int = 10,
  hessian_diagonal_fn: optax.GradientTransformationExtraArgs | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescales gradients to Sophia's clipped Newton step.

  See `curvopt.sophia_h` for the update rule and the arguments.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_sophia_h()
    >>> params = jnp.ones(2)
    >>> updates, _ = tx.update(jnp.array([1.0, -1.0]), tx.init(params), params,
    ...                        value_fn=lambda w: jnp.sum(w**2))
    >>> updates  # the first step has no curvature yet: clipped to +-1
    Array([ 1., -1.], dtype=float32)

  References:
    Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order
    Optimizer for Language Model Pre-training", ICLR 2024.
  """
  refresh_every = _checks.positive_int("refresh_every", refresh_every)
  estimator = hessian_diagonal_fn or hutchinson_diagonal_estimator(name="sophia_h")

  def init(params: PyTree) -> ScaleBySophiaState:
    zeros = _tree.statistics_zeros(params)
    return ScaleBySophiaState(jnp.zeros((), jnp.int32), zeros, zeros, estimator.init(params))

  def update(updates, state, params=None, **extra_args):
    count = optax.safe_increment(state.count)
    grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.mu)
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    # The step uses the curvature known before this step, as optax's Sophia does.
    scaled = jax.tree.map(
      lambda m, h, p: jnp.clip(
        m / jnp.maximum(gamma * h, eps), -clip_threshold, clip_threshold
      ).astype(p.dtype),
      mu_hat,
      state.nu,
      updates,
    )

    def refresh():
      diagonal, estimator_state = estimator.update(updates, state.estimator, params, **extra_args)
      return optax.tree.update_moment(diagonal, state.nu, b2, 1), estimator_state

    nu, estimator_state = refresh_if_due(
      state.count, refresh_every, refresh, lambda: (state.nu, state.estimator)
    )
    return scaled, ScaleBySophiaState(count, mu, nu, estimator_state)

  return optax.GradientTransformationExtraArgs(init, update)
