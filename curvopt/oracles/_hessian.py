"""The Hessian of a scalar loss, matrix-free, by forward-over-reverse autodiff."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from curvopt import _checks, _tree
from curvopt.oracles._operator import SYMMETRIC, LinearOperator

PyTree = Any


def _checked(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> None:
  _checks.callable_arg("value_fn", value_fn)
  _checks.float_pytree("params", params)
  _checks.scalar_function("value_fn", value_fn, params)


def hessian(
  value_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  *,
  num_examples: int | None = None,
) -> LinearOperator:
  """The Hessian of `value_fn` at `params` as a symmetric operator.

  Products are forward-over-reverse, `jvp(grad(value_fn))`, the cheapest
  exact Hessian-vector product (Pearlmutter 1994; JAX autodiff cookbook).
  The gradient is linearized once when the operator is built, so repeated
  products (Lanczos, Hutchinson) reuse the forward and backward passes and
  pay only for the tangent pass; under `jit`, an unused operator costs nothing.

  Args:
    value_fn: `params -> scalar` loss on a fixed batch (close over the batch).
    params: the point where the Hessian is taken.
    num_examples: the batch size `value_fn` averages over, reported by the
      estimators beside their results.

  Returns:
    A `LinearOperator` tagged symmetric.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> op = curvopt.hessian(lambda w: w[0] ** 2 * w[1], jnp.array([1.0, 2.0]))
    >>> op.as_matrix()
    Array([[4., 2.],
           [2., 0.]], dtype=float32)

  References:
    Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 1994.
  """
  _checked(value_fn, params)
  # Linearizing once puts the forward and backward passes outside the loops
  # of the estimators, so each product costs only the tangent pass.
  _, matvec = jax.linearize(jax.grad(value_fn), params)
  return LinearOperator(matvec, _tree.structure_of(params), frozenset({SYMMETRIC}), num_examples)


def hvp(value_fn: Callable[[PyTree], jax.Array], params: PyTree, vector: PyTree) -> PyTree:
  """The Hessian-vector product `H v` of `value_fn` at `params`, shaped like `params`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.hvp(lambda w: jnp.sum(w**3), jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
    Array([ 6., 12.], dtype=float32)
  """
  return hessian(value_fn, params).mv(vector)


def value_grad_hvp(
  value_fn: Callable[[PyTree], jax.Array], params: PyTree, vector: PyTree
) -> tuple[jax.Array, PyTree, PyTree]:
  """`(value, gradient, H v)` from one forward-over-reverse pass.

  The gradient is the primal output of the pass that computes `H v`, so a
  training step that needs both never computes the gradient twice.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> f = lambda w: jnp.sum(w**3)
    >>> value, grad, hv = curvopt.value_grad_hvp(f, jnp.array([1.0, 2.0]), jnp.ones(2))
    >>> value, grad, hv
    (Array(9., dtype=float32), Array([ 3., 12.], dtype=float32), Array([ 6., 12.], dtype=float32))
  """
  _checked(value_fn, params)
  structure = _tree.structure_of(params)
  _checks.matches_structure("vector", vector, structure)
  tangent = _tree.cast_like(vector, structure)
  (value, grad), (_, hv) = jax.jvp(jax.value_and_grad(value_fn), (params,), (tangent,))
  return value, grad, hv
