"""The inverse of a damped empirical Fisher over `m` gradients, without a `d x d` matrix.

`F = lambda I + (1/m) sum_i g_i g_i^T` for the rows `g_i` of `U` (`m x d`).
By Woodbury, `F^-1 = (1/lambda) (I - U^T A^-1 U)` with the `m x m` matrix
`A = m lambda I + U U^T`: a product costs `O(d m + m^2)` once `A` is factored
(`O(m^3)`), and `diag(F^-1)` costs `O(d m^2)`. M-FAC's dynamic
algorithm (Frantar, Kurtic and Alistarh 2021) keeps `A^-1` as gradients of a
sliding window are replaced: one row and column of `A` change, a rank-two
update of its inverse (`O(m^2)`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree

PyTree = Any


def factor(kernel: jax.Array, shift: jax.Array | float) -> Any:
  """`(L, True)` with `L L^T = shift I + kernel` for a PSD `kernel`: Cholesky, `O(k^3)`."""
  k = kernel.shape[0]
  return jax.scipy.linalg.cho_factor(kernel + shift * jnp.eye(k, dtype=kernel.dtype), lower=True)


def shifted_inverse(kernel: jax.Array, shift: jax.Array | float) -> jax.Array:
  """`(shift I + kernel)^-1` for a PSD `kernel` and `shift > 0`, by Cholesky: `O(k^3)`."""
  identity = jnp.eye(kernel.shape[0], dtype=kernel.dtype)
  return jax.scipy.linalg.cho_solve(factor(kernel, shift), identity)


def rank_two_update_inverse(inverse: jax.Array, basis: jax.Array, coupling: jax.Array) -> jax.Array:
  """`(A + U C U^T)^-1` from `A^-1` for `U` `(k, 2)` and symmetric invertible `C` `(2, 2)`.

  Woodbury: `A^-1 - A^-1 U (C^-1 + U^T A^-1 U)^-1 U^T A^-1`, in `O(k^2)`.
  """
  projected = inverse @ basis  # A^-1 U
  capacitance = jnp.linalg.inv(coupling) + basis.T @ projected
  updated = inverse - projected @ jnp.linalg.solve(capacitance, projected.T)
  return 0.5 * (updated + updated.T)  # rounding would otherwise drift off symmetric


def _flat_rows(grads: PyTree, name: str) -> tuple[jax.Array, Any]:
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError(f"{name} must hold at least one array, got an empty pytree.")
  counts = {x.shape[0] if x.ndim else None for x in leaves}
  if len(counts) != 1 or None in counts:
    raise ValueError(
      f"{name} must stack the m gradients on a leading axis of every leaf (jax.vmap(jax.grad)); "
      f"got leading sizes {sorted(c for c in counts if c is not None)}."
    )
  dtype = _tree.working_dtype(grads)
  rows = jax.vmap(lambda g: ravel_pytree(g)[0].astype(dtype))(grads)
  unravel = ravel_pytree(jax.tree.map(lambda x: x[0], grads))[1]
  return rows, unravel


def inverse_fisher_diagonal(grads: PyTree, damping: float) -> PyTree:
  """`diag(F^-1)` for `F = damping I + (1/m) sum_i g_i g_i^T`, in `O(d m^2)`.

  Args:
    grads: `m` gradients (per example or per batch) stacked on a leading axis
      of every leaf, e.g. `jax.vmap(jax.grad(loss), (None, 0))(params, batch)`.
    damping: `lambda > 0`.

  Returns:
    A pytree shaped like one gradient: `[F^-1]_ii`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # m = 2 gradients of d = 2 parameters
    >>> d = curvopt.estimators.inverse_fisher_diagonal(g, damping=0.5)  # F = diag(1, 2.5)
    >>> [round(float(x), 4) for x in d]
    [1.0, 0.4]

  References:
    Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations
    of Second-Order Information", NeurIPS 2021.
  """
  _checks.positive("damping", damping)
  rows, unravel = _flat_rows(grads, "grads")
  lower, _ = factor(rows @ rows.T, rows.shape[0] * damping)
  # diag(U^T A^-1 U) is the squared column norms of L^-1 U.
  whitened = jax.scipy.linalg.solve_triangular(lower, rows, lower=True)
  return unravel((1.0 - jnp.sum(whitened * whitened, axis=0)) / damping)


def obs_scores(grads: PyTree, params: PyTree, damping: float) -> PyTree:
  """Optimal Brain Surgeon saliencies `w_i^2 / (2 [F^-1]_ii)` with the empirical Fisher `F`.

  The loss increase of removing weight `i` alone (setting it to zero and
  letting the others compensate) under the quadratic model with curvature
  `F = damping I + (1/m) sum_j g_j g_j^T`: prune the smallest scores first.

  Args:
    grads: `m` gradients stacked on a leading axis (see `inverse_fisher_diagonal`).
    params: the weights, shaped like one gradient.
    damping: `lambda > 0`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> curvopt.estimators.obs_scores(g, jnp.array([1.0, 1.0]), damping=0.5).round(4)
    Array([0.5 , 1.25], dtype=float32)

  References:
    Hassibi and Stork, "Second order derivatives for network pruning: Optimal
    Brain Surgeon", NeurIPS 1992; Frantar, Kurtic, Alistarh, "M-FAC", NeurIPS 2021.
  """
  diagonal = inverse_fisher_diagonal(grads, damping)
  _checks.matches_structure("params", params, diagonal, what="one gradient of grads")
  return jax.tree.map(lambda w, d: w.astype(d.dtype) ** 2 / (2.0 * d), params, diagonal)
