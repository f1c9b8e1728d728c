"""curvopt operators as lineax operators, for lineax's solvers (lineax is optional)."""

from __future__ import annotations

from typing import Any

from curvopt.oracles._operator import POSITIVE_SEMIDEFINITE, SYMMETRIC, LinearOperator


def to_lineax(operator: LinearOperator) -> Any:
  """`operator` as a `lineax.FunctionLinearOperator`, its tags translated.

  So lineax's solvers (`CG`, `GMRES`, `Cholesky` on the materialized matrix,
  ...) run on curvopt's Hessian, Gauss-Newton and Fisher operators. Needs
  lineax (`pip install lineax`).

  Examples:
    >>> import jax.numpy as jnp, lineax as lx, curvopt
    >>> op = curvopt.linear_operator(
    ...   lambda v: 2.0 * v, jnp.zeros(2), symmetric=True, positive_semidefinite=True
    ... )
    >>> lx.linear_solve(curvopt.to_lineax(op), jnp.array([2.0, 4.0]), lx.CG(1e-6, 1e-6)).value
    Array([1., 2.], dtype=float32)

  References:
    Rader, Lyons and Kidger, "Lineax: unified linear solves and linear
    least-squares in JAX and Equinox", 2023.
  """
  try:
    import lineax
  except ImportError:
    raise ImportError("curvopt.to_lineax needs lineax: pip install lineax") from None
  if not isinstance(operator, LinearOperator):
    raise TypeError(f"operator must be a curvopt LinearOperator, got {type(operator).__name__}.")
  tags = set()
  if SYMMETRIC in operator.tags:
    tags.add(lineax.symmetric_tag)
  if POSITIVE_SEMIDEFINITE in operator.tags:
    tags.add(lineax.positive_semidefinite_tag)
  return lineax.FunctionLinearOperator(operator.mv, operator.in_structure, tags=frozenset(tags))
