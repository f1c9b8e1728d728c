"""The empirical Fisher matrix from per-example gradients, matrix-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from curvopt import _checks, _tree
from curvopt.oracles._operator import POSITIVE_SEMIDEFINITE, SYMMETRIC, LinearOperator

PyTree = Any


def empirical_fisher(
  per_example_loss_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> LinearOperator:
  """The empirical Fisher `F = (1/n) sum_i g_i g_i^T` at `params`.

  `g_i` is the gradient of example `i`'s loss. With `J` the `n x d` Jacobian of
  the per-example losses, `F v = J^T (J v) / n`: one JVP and one VJP of the
  linearized per-example losses, so no per-example gradient is ever stored.

  The empirical Fisher uses the observed labels; it is *not* the Fisher
  information (use `gauss_newton` for that) and can differ from it sharply
  away from a minimum (Kunstner, Balles, Hennig 2019).

  Args:
    per_example_loss_fn: `params -> (n,)` array of per-example losses on a
      fixed batch.
    params: the point where the gradients are taken.

  Returns:
    A `LinearOperator` tagged symmetric and positive semidefinite, with
    `num_examples = n`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> op = curvopt.empirical_fisher(lambda w: x @ w, jnp.zeros(2))  # g_i = x_i
    >>> op.as_matrix()
    Array([[0.5, 0. ],
           [0. , 2. ]], dtype=float32)

  References:
    Kunstner, Balles, Hennig, "Limitations of the Empirical Fisher
    Approximation for Natural Gradient Descent", NeurIPS 2019.
  """
  _checks.callable_arg("per_example_loss_fn", per_example_loss_fn)
  _checks.float_pytree("params", params)
  losses, losses_jvp = jax.linearize(per_example_loss_fn, params)
  if not isinstance(losses, jax.Array) or losses.ndim != 1:
    raise ValueError(
      "per_example_loss_fn must return a 1-D array of per-example losses, "
      f"got shape {getattr(losses, 'shape', type(losses).__name__)}."
    )
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise TypeError(f"per_example_loss_fn must return floating-point losses, got {losses.dtype}.")
  num_examples = int(losses.shape[0])
  losses_vjp = jax.linear_transpose(losses_jvp, params)

  def matvec(vector: PyTree) -> PyTree:
    return losses_vjp(losses_jvp(vector) / num_examples)[0]

  return LinearOperator(
    matvec,
    _tree.structure_of(params),
    frozenset({SYMMETRIC, POSITIVE_SEMIDEFINITE}),
    num_examples,
  )
