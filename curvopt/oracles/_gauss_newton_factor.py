"""The Gauss-Newton matrix as `A^T A`, with `A = S^T J` in the batch (row) space."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree
from curvopt.oracles._operator import POSITIVE_SEMIDEFINITE, SYMMETRIC, LinearOperator
from curvopt.oracles._output_loss import OutputCurvature, output_curvature

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class GaussNewtonFactor:
  """`G = A^T A` and `g = A^T w + J^T n` on one batch, `A = S^T J` of shape `(b k, d)`.

  `J` is the Jacobian of the outputs (`b x c` rows) and `S` the per-example
  square root of the loss Hessian on them (`OutputCurvature`). Products with
  `A` are one JVP (`mv`) and one VJP (`rmv`) of the linearized model;
  `as_matrix` materializes `A` with whichever of the two is cheaper.

  Attributes:
    outputs: the model outputs at the linearization point.
    curvature: the `OutputCurvature` of the loss on them.
    in_structure: the parameters' `ShapeDtypeStruct`s.
  """

  outputs: jax.Array
  curvature: OutputCurvature
  in_structure: PyTree
  _jvp: Callable[[PyTree], jax.Array]
  _vjp: Callable[[jax.Array], PyTree]

  @property
  def row_shape(self) -> tuple[int, int]:
    """`(b, k)`: examples and curvature directions per example."""
    return self.curvature.coefficients.shape

  def mv(self, vector: PyTree) -> jax.Array:
    """`A v`, shape `(b, k)`."""
    jv = self._jvp(vector).reshape(self.curvature.root.shape[:2])
    return jnp.einsum("bck,bc->bk", self.curvature.root, jv, precision=_HIGHEST)

  def rmv(self, rows: jax.Array) -> PyTree:
    """`A^T z` for `z` of shape `(b, k)`, a parameter pytree."""
    return self.output_vjp(jnp.einsum("bck,bk->bc", self.curvature.root, rows, precision=_HIGHEST))

  def output_vjp(self, cotangent: jax.Array) -> PyTree:
    """`J^T u` for `u` of shape `(b, c)`."""
    return self._vjp(cotangent.reshape(self.outputs.shape))

  def gradient(self) -> PyTree:
    """The loss gradient `J^T (S w + n)`, one VJP."""
    curvature = self.curvature
    root_part = jnp.einsum("bck,bk->bc", curvature.root, curvature.coefficients, precision=_HIGHEST)
    if curvature.null_gradient is not None:
      root_part = root_part + curvature.null_gradient
    return self.output_vjp(root_part)

  def as_matrix(self) -> jax.Array:
    """`A` as a `(b k, d)` array over the raveled parameters (`jax.flatten_util`)."""
    flat, unravel = ravel_pytree(_tree.zeros(self.in_structure))
    d, (b, k) = flat.size, self.row_shape
    if d <= b * k:  # d JVPs
      columns = jax.vmap(lambda e: self.mv(unravel(e)).reshape(-1))(jnp.eye(d, dtype=flat.dtype))
      return columns.T
    basis = jnp.eye(b * k, dtype=flat.dtype).reshape(b * k, b, k)  # b k VJPs
    return jax.vmap(lambda e: ravel_pytree(self.rmv(e))[0])(basis)

  def operator(self) -> LinearOperator:
    """`G = A^T A` as a `LinearOperator` (equal to `gauss_newton`'s for a convex loss)."""
    return LinearOperator(
      lambda v: self.rmv(self.mv(v)),
      self.in_structure,
      frozenset({SYMMETRIC, POSITIVE_SEMIDEFINITE}),
      self.row_shape[0],
    )


def gauss_newton_factor(
  model_fn: Callable[[PyTree], jax.Array],
  loss_fn: Callable[[jax.Array], jax.Array],
  params: PyTree,
) -> GaussNewtonFactor:
  """The Gauss-Newton matrix of `loss_fn(model_fn(params))` factored in the batch space.

  `G = J^T B J = A^T A` with `A = S^T J`, `B_i = S_i S_i^T` per example
  (`output_curvature`): a `b k x b k` matrix `A A^T` then stands in for the
  `d x d` `G`, which is how Exact Gauss-Newton solves `(G + lambda I) d = g`
  when the batch is smaller than the model (the Duncan-Guttman identity).
  The model is linearized once; every product reuses it.

  Args:
    model_fn: `params -> outputs`, one array with the example axis first.
    loss_fn: `outputs -> scalar` batch loss, a sum or mean of per-example
      terms; `SquaredError`, `SoftmaxCrossEntropy` and `SigmoidCrossEntropy`
      factor in closed form.
    params: the point of linearization.

  Returns:
    A `GaussNewtonFactor`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> factor = curvopt.oracles.gauss_newton_factor(
    ...     lambda w: x @ w, curvopt.oracles.SquaredError(jnp.zeros(2)), jnp.ones(2))
    >>> a = factor.as_matrix()
    >>> (a.T @ a).round(4)  # x.T @ x / 2, as `gauss_newton` gives
    Array([[ 5.,  7.],
           [ 7., 10.]], dtype=float32)

  References:
    Korbit, Adeoye, Bemporad, Zanon, "Exact Gauss-Newton Optimization for
    Training Deep Neural Networks", 2024 (arXiv 2405.14402);
    Duncan 1944, Guttman 1946 (the push-through identity).
  """
  _checks.callable_arg("model_fn", model_fn)
  _checks.callable_arg("loss_fn", loss_fn)
  _checks.float_pytree("params", params)
  outputs, model_jvp = jax.linearize(model_fn, params)
  curvature = output_curvature(loss_fn, outputs)
  model_vjp = jax.linear_transpose(model_jvp, params)
  return GaussNewtonFactor(
    outputs,
    curvature,
    _tree.structure_of(params),
    model_jvp,
    lambda cotangent: model_vjp(cotangent)[0],
  )
