"""The generalized Gauss-Newton matrix `J^T H_L J`, matrix-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from curvopt import _checks, _tree
from curvopt.oracles._operator import POSITIVE_SEMIDEFINITE, SYMMETRIC, LinearOperator

PyTree = Any


def _leading_dim(tree: PyTree) -> int | None:
  leaves = jax.tree.leaves(tree)
  if leaves and getattr(leaves[0], "ndim", 0) >= 1:
    return int(leaves[0].shape[0])
  return None


def gauss_newton(
  model_fn: Callable[[PyTree], PyTree],
  loss_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  *,
  positive_semidefinite: bool = True,
) -> LinearOperator:
  """The generalized Gauss-Newton matrix `G = J^T H_L J` at `params`.

  `J` is the Jacobian of `model_fn` (parameters to outputs) and `H_L` the
  Hessian of `loss_fn` with respect to the outputs. A product is a JVP through
  the model, an exact Hessian-vector product of the loss on the outputs (by
  autodiff, so any `loss_fn` works), and a VJP back. The model is linearized
  once, when the operator is built, and each product reuses it.

  For softmax cross-entropy and mean squared error, `G` equals the true Fisher
  information (Martens 2020), so this is also the Fisher operator of such
  models; it equals the Hessian when the model is linear in its parameters.

  Args:
    model_fn: `params -> outputs` on a fixed batch (any pytree of outputs).
    loss_fn: `outputs -> scalar` mean loss (close over the targets).
    params: the point of linearization.
    positive_semidefinite: tag the result PSD; true whenever `loss_fn` is
      convex in the outputs (MSE, softmax cross-entropy). An unchecked promise.

  Returns:
    A symmetric `LinearOperator`; `num_examples` is the leading dimension of
    the first output leaf.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> op = curvopt.gauss_newton(lambda w: x @ w, lambda out: 0.5 * jnp.mean(out**2), jnp.ones(2))
    >>> op.as_matrix()  # x.T @ x / 2 for a linear model
    Array([[ 5.,  7.],
           [ 7., 10.]], dtype=float32)

  References:
    Schraudolph, "Fast Curvature Matrix-Vector Products for Second-Order
    Gradient Descent", Neural Computation 2002.
    Martens, "New Insights and Perspectives on the Natural Gradient Method", JMLR 2020.
  """
  _checks.callable_arg("model_fn", model_fn)
  _checks.callable_arg("loss_fn", loss_fn)
  _checks.float_pytree("params", params)
  outputs, model_jvp = jax.linearize(model_fn, params)
  _checks.scalar_function("loss_fn", loss_fn, outputs)
  model_vjp = jax.linear_transpose(model_jvp, params)
  loss_grad = jax.grad(loss_fn)

  def matvec(vector: PyTree) -> PyTree:
    jv = model_jvp(vector)
    hjv = jax.jvp(loss_grad, (outputs,), (jv,))[1]
    return model_vjp(hjv)[0]

  tags = {SYMMETRIC, POSITIVE_SEMIDEFINITE} if positive_semidefinite else {SYMMETRIC}
  return LinearOperator(matvec, _tree.structure_of(params), frozenset(tags), _leading_dim(outputs))
