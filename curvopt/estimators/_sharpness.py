"""Sharpness: the largest algebraic eigenvalue of the Hessian of a loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from curvopt.estimators._lanczos import lanczos_eigenpairs
from curvopt.estimators._loops import LoopMode
from curvopt.oracles import LinearOperator, hessian

PyTree = Any


class SharpnessEstimate(NamedTuple):
  """Result of `estimate_sharpness`.

  Attributes:
    sharpness: the largest algebraic eigenvalue `lambda_max`.
    num_examples: the number of examples the curvature was measured on
      (mini-batch sharpness overestimates the full-batch one; Granziol et al.
      2022), or None when the operator does not know it.
    residual: `||A u - lambda_max u||`.
    converged: whether the residual is `<= tol * ||A||`.
    eigenvector: the unit top eigenvector (pass it as `warm_start` next time).
    num_iterations: Lanczos steps taken.
  """

  sharpness: jax.Array
  num_examples: Any
  residual: jax.Array
  converged: jax.Array
  eigenvector: PyTree
  num_iterations: jax.Array


def estimate_sharpness(
  operator: LinearOperator,
  key: jax.Array,
  *,
  num_iterations: int = 20,
  tol: float = 1e-5,
  warm_start: PyTree | None = None,
  loop: LoopMode = "auto",
) -> SharpnessEstimate:
  """The largest algebraic eigenvalue of `operator`, with what it was measured on.

  Works on any symmetric operator: a mini-batch Hessian, a full-data set
  `dataset_operator`, a Gauss-Newton matrix, or a `preconditioned` one.

  Args:
    operator: a symmetric `LinearOperator`.
    key: a PRNG key.
    num_iterations: the largest number of Lanczos steps.
    tol: stop once the residual is `<= tol * ||A||` (0: run every step).
    warm_start: the previous `eigenvector`, to converge in fewer steps.
    loop: "auto", "lax" or "unroll".

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.hessian(lambda w: w[0] ** 2 - 3 * w[1] ** 2, jnp.zeros(2), num_examples=1)
    >>> est = curvopt.estimate_sharpness(op, jax.random.key(0))
    >>> round(float(est.sharpness), 4), est.num_examples
    (2.0, 1)

  References:
    Cohen, Kaur, Li, Kolter, Talwalkar, "Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability", ICLR 2021.
  """
  pairs = lanczos_eigenpairs(
    operator,
    key,
    k=1,
    which="LA",
    num_iterations=num_iterations,
    tol=tol,
    warm_start=warm_start,
    loop=loop,
  )
  return SharpnessEstimate(
    pairs.eigenvalues[0],
    operator.num_examples,
    pairs.residuals[0],
    pairs.converged[0],
    jax.tree.map(lambda v: v[0], pairs.eigenvectors),
    pairs.num_iterations,
  )


def sharpness(
  value_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  *,
  key: jax.Array,
  num_iterations: int = 20,
  tol: float = 1e-5,
  loop: LoopMode = "auto",
) -> jax.Array:
  """The largest algebraic eigenvalue of the Hessian of `value_fn` at `params`.

  Not the largest magnitude (which power iteration returns and which can be
  a negative eigenvalue): this is the quantity that gradient descent with step
  size `eta` keeps near `2 / eta` at the edge of stability. The value is for
  the batch `value_fn` closes over; use `estimate_sharpness` with a
  `dataset_operator` for the full data set, and to get the batch size, the
  residual and the eigenvector back.

  Args:
    value_fn: `params -> scalar` loss on a fixed batch.
    params: the point.
    key: a PRNG key for Lanczos' starting vector.
    num_iterations: the largest number of Lanczos steps (HVPs).
    tol: stop once the residual is `<= tol * ||H||`.
    loop: "auto", "lax" or "unroll".

  Returns:
    A scalar array.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> f = lambda w: 0.5 * (3 * w[0] ** 2 - 5 * w[1] ** 2)
    >>> round(float(curvopt.sharpness(f, jnp.zeros(2), key=jax.random.key(0))), 4)
    3.0

  References:
    Cohen, Kaur, Li, Kolter, Talwalkar, "Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability", ICLR 2021.
  """
  return estimate_sharpness(
    hessian(value_fn, params), key, num_iterations=num_iterations, tol=tol, loop=loop
  ).sharpness
