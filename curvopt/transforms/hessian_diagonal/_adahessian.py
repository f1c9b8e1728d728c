"""AdaHessian's scaling: Adam with a Hutchinson Hessian diagonal for the second moment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.transforms._cadence import refresh_if_due
from curvopt.transforms.hessian_diagonal._hutchinson import (
  hutchinson_diagonal_estimator,
  spatial_average,
)

PyTree = Any


class ScaleByAdaHessianState(NamedTuple):
  """State of `scale_by_adahessian`; moments are float32 whatever the parameter dtype.

  Attributes:
    count: steps taken (int32).
    mu: EMA of gradients.
    nu: EMA of squared, spatially averaged Hessian-diagonal estimates.
    diagonal: the latest averaged estimate, reused between refreshes (None
      when `refresh_every == 1`: nothing is reused).
    estimator: the state of the Hessian-diagonal estimator (its PRNG key).
  """

  count: jax.Array
  mu: PyTree
  nu: PyTree
  diagonal: PyTree
  estimator: Any


def scale_by_adahessian(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-4,
  hessian_power: float = 1.0,
  *,
  refresh_every: int = 1,
  absolute: bool = True,
  averaging_axes: str | Callable[[jax.Array], tuple[int, ...]] | PyTree | None = "flax",
  hessian_diagonal_fn: optax.GradientTransformationExtraArgs | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescales gradients by AdaHessian's bias-corrected moments.

  See `curvopt.adahessian` for the update rule and the arguments.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_adahessian(b1=0.0, b2=0.0, eps=0.0)
    >>> params = jnp.ones(2)
    >>> value_fn = lambda w: jnp.sum(jnp.array([2.0, 4.0]) * w**2)
    >>> updates, _ = tx.update(jnp.array([4.0, 8.0]), tx.init(params), params, value_fn=value_fn)
    >>> updates  # the diagonal Newton step g / |diag H|
    Array([1., 1.], dtype=float32)

  References:
    Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning", AAAI 2021.
  """
  refresh_every = _checks.positive_int("refresh_every", refresh_every)
  _checks.flag("absolute", absolute)
  if isinstance(averaging_axes, str):
    _checks.one_of("averaging_axes", averaging_axes, ("flax",))
  estimator = hessian_diagonal_fn or hutchinson_diagonal_estimator(name="adahessian")

  def init(params: PyTree) -> ScaleByAdaHessianState:
    zeros = _tree.statistics_zeros(params)
    kept = zeros if refresh_every > 1 else None
    return ScaleByAdaHessianState(
      jnp.zeros((), jnp.int32), zeros, zeros, kept, estimator.init(params)
    )

  def update(updates, state, params=None, **extra_args):
    def refresh():
      raw, estimator_state = estimator.update(updates, state.estimator, params, **extra_args)
      raw = jax.tree.map(jnp.abs, raw) if absolute else raw
      return spatial_average(raw, averaging_axes), estimator_state

    fresh, estimator_state = refresh_if_due(
      state.count, refresh_every, refresh, lambda: (state.diagonal, state.estimator)
    )
    count = optax.safe_increment(state.count)
    grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.mu)
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(fresh, state.nu, b2, 2)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    # One power, not sqrt then power (a float exponent costs a transcendental per entry);
    # XLA rewrites the default's v ** 0.5 into sqrt itself.
    scaled = jax.tree.map(
      lambda m, v, p: (m / (v ** (hessian_power / 2) + eps)).astype(p.dtype),
      mu_hat,
      nu_hat,
      updates,
    )
    kept = fresh if refresh_every > 1 else None
    return scaled, ScaleByAdaHessianState(count, mu, nu, kept, estimator_state)

  return optax.GradientTransformationExtraArgs(init, update)
