"""Regression workloads: diabetes (MSE), an ill-conditioned quadratic, Rosenbrock."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from curvopt import _checks
from curvopt.bench import data, models
from curvopt.bench.workloads._base import Workload, check_batch_size

_NO_DATA = (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))


def diabetes_mlp(batch_size: int | None = 64) -> Workload:
  """MLP 10-32-1 (tanh) on sklearn diabetes with mean squared error (standardized targets)."""
  check_batch_size(batch_size)
  d = data.diabetes()
  x_test, y_test = jnp.asarray(d.x_test), jnp.asarray(d.y_test)
  return Workload(
    name="diabetes_mlp",
    description="sklearn diabetes (354 train / 88 test), MLP 10-32-1 tanh, mean squared error",
    loss_type="mean_squared_error",
    init_params=lambda key: models.init_mlp(key, (10, 32, 1)),
    model_fn=models.mlp,
    loss_fn=models.half_mean_squared_error,
    train=(d.x_train, d.y_train),
    batch_size=batch_size,
    test_metric="test_mse",
    test_metric_fn=lambda p: 2 * models.half_mean_squared_error(models.mlp(p, x_test), y_test),
    higher_is_better=False,
    target=0.22,
  )


def quadratic(dimension: int = 20, condition_number: float = 1e3) -> Workload:
  """`0.5 (w - w*)^T A (w - w*)` with eigenvalues log-spaced in [1, condition_number].

  Written as least squares, `model_fn` gives the residuals `A^{1/2} (w - w*)`,
  so Gauss-Newton methods see the exact Hessian. The optimum `w*` is known.
  """
  _checks.positive_int("dimension", dimension)
  if isinstance(condition_number, bool) or not (
    isinstance(condition_number, int | float) and 1 <= condition_number < float("inf")
  ):
    raise ValueError(f"condition_number must be a finite number >= 1, got {condition_number!r}.")
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
  root = jnp.asarray(
    np.sqrt(np.geomspace(1.0, condition_number, dimension))[:, None] * q.T, jnp.float32
  )
  optimum = jnp.asarray(rng.normal(size=dimension), jnp.float32)
  return Workload(
    name="quadratic",
    description=f"quadratic, {dimension}-d, condition number {condition_number:g}, known optimum",
    loss_type="least_squares",
    init_params=lambda key: {"w": jnp.zeros(dimension)},
    model_fn=lambda p, _: root @ (p["w"] - optimum),
    loss_fn=lambda residuals, _: 0.5 * jnp.sum(residuals**2),
    train=_NO_DATA,
    batch_size=None,
    test_metric="distance_to_optimum",
    test_metric_fn=lambda p: jnp.linalg.norm(p["w"] - optimum),
    higher_is_better=False,
    target=1e-4,
  )


def rosenbrock() -> Workload:
  """`100 (y - x^2)^2 + (1 - x)^2` from (-1.2, 1), as the residuals `(10 (y - x^2), 1 - x)`."""
  return Workload(
    name="rosenbrock",
    description="Rosenbrock's function from (-1.2, 1); minimum 0 at (1, 1)",
    loss_type="least_squares",
    init_params=lambda key: {"xy": jnp.array([-1.2, 1.0])},
    model_fn=lambda p, _: jnp.stack([10 * (p["xy"][1] - p["xy"][0] ** 2), 1 - p["xy"][0]]),
    loss_fn=lambda residuals, _: jnp.sum(residuals**2),
    train=_NO_DATA,
    batch_size=None,
    test_metric="distance_to_optimum",
    test_metric_fn=lambda p: jnp.linalg.norm(p["xy"] - 1.0),
    higher_is_better=False,
    target=1e-3,
  )
