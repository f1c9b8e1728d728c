"""Inverse p-th roots of symmetric positive semi-definite matrices (Shampoo's refresh)."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from curvopt import _checks

RootMethod = Literal["eigh", "newton"]
ROOT_METHODS = ("eigh", "newton")


class InverseRoot(NamedTuple):
  """An inverse p-th root and how far it can be trusted.

  Attributes:
    matrix: `(A + eps I)^(-1/p)`, symmetric.
    residual: for "newton", the iteration's final `max |M - I|` (`M` tends to
      `H^p (A + eps I)` = I); for "eigh", 0 (inf when the decomposition is
      not finite). A caller keeps its previous root when it is too large.
  """

  matrix: jax.Array
  residual: jax.Array


def matrix_inverse_root(
  a: jax.Array,
  p: int,
  *,
  method: RootMethod = "eigh",
  epsilon: float = 1e-6,
  relative_epsilon: bool = True,
  rank_rtol: float | None = None,
  max_iterations: int = 100,
  tolerance: float | None = None,
) -> InverseRoot:
  r"""`(A + \epsilon I)^{-1/p}` for a symmetric positive semi-definite `A`.

  Args:
    a: a symmetric PSD matrix `(d, d)` (symmetrized before use; `vmap` for a
      stack).
    p: the root, a positive integer (Shampoo uses `2 x` the tensor order).
    method: "eigh" (eigendecomposition; exact up to round-off, the default)
      or "newton" (the coupled Newton iteration of Higham 2008, eq. 7.18:
      matrix products only, so it suits accelerators; it stops at
      `tolerance`, at `max_iterations`, or when the residual grows by 1.2x,
      returning the iterate before).
    epsilon: the damping, relative to the largest eigenvalue by default.
    relative_epsilon: if True, `eps = epsilon * lambda_max(A)` (`lambda_max`
      from the eigenvalues, or a power iteration for "newton"), so the root
      does not change when the statistics are rescaled and directions below
      float32 round-off (about `1e-7 lambda_max`) are not amplified; if
      False, `eps = epsilon`.
    rank_rtol: "eigh" only: a truncated pseudo-inverse root. Eigenvalues at
      or below `rank_rtol * lambda_max` get a zero inverse root instead of a huge
      one (rank-deficient statistics, as Meta's Shampoo offers).
    max_iterations: "newton" only.
    tolerance: "newton" only: the target `max |M - I|`; defaults to 1e-6 in
      float32 and 1e-12 in float64.

  Returns:
    `InverseRoot(matrix, residual)`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> a = jnp.array([[4.0, 0.0], [0.0, 16.0]])
    >>> curvopt.matrix_inverse_root(a, 2, epsilon=0.0).matrix
    Array([[0.5 , 0.  ],
           [0.  , 0.25]], dtype=float32)

  References:
    Higham, "Functions of Matrices", SIAM 2008, eq. 7.18 (coupled Newton);
    Gupta, Koren, Singer, "Shampoo", ICML 2018; Anil et al., "Scalable
    Second Order Optimization for Deep Learning", 2020.
  """
  _checks.positive_int("p", p)
  _checks.one_of("method", method, ROOT_METHODS)
  _checks.in_range("epsilon", epsilon, 0.0, float("inf"))
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"a must be a square matrix (d, d), got shape {a.shape}.")
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"a must be a floating-point matrix, got {a.dtype}.")
  if rank_rtol is not None and method != "eigh":
    raise ValueError('rank_rtol (a pseudo-inverse root) needs method="eigh".')
  a = (a + a.T) / 2
  with jax.default_matmul_precision("highest"):
    if method == "eigh":
      return _eigh_root(a, p, epsilon, relative_epsilon, rank_rtol)
    return _newton_root(a, p, epsilon, relative_epsilon, max_iterations, tolerance)


def _damping(lambda_max: jax.Array, epsilon: float, relative: bool, dtype: Any) -> jax.Array:
  # A zero matrix (zero gradients) gets the finite root epsilon^(-1/p) I, as if lambda_max = 1.
  return epsilon * jnp.where(lambda_max > 0, lambda_max, 1).astype(dtype) if relative else epsilon


def _eigh_root(a, p, epsilon, relative, rank_rtol) -> InverseRoot:
  w, u = jnp.linalg.eigh(a)
  # Round-off can make the eigenvalues of a PSD matrix slightly negative: project onto PSD.
  w = jnp.maximum(w, 0)
  lambda_max = w[-1]
  roots = (w + _damping(lambda_max, epsilon, relative, a.dtype)) ** (-1.0 / p)
  if rank_rtol is not None:
    roots = jnp.where(w > rank_rtol * lambda_max, roots, 0)
  matrix = (u * roots) @ u.T
  finite = jnp.all(jnp.isfinite(matrix))
  residual = jnp.where(finite, 0.0, jnp.inf).astype(a.dtype)
  return InverseRoot(matrix, residual)


def _largest_eigenvalue(a: jax.Array, iterations: int = 32) -> jax.Array:
  """Power iteration from a fixed all-ones start (a PSD matrix's top eigenvalue)."""

  def step(_, v):
    w = a @ v
    return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(a.dtype).tiny)

  v = jax.lax.fori_loop(0, iterations, step, jnp.ones(a.shape[0], a.dtype) / a.shape[0] ** 0.5)
  return v @ a @ v


def _newton_root(a, p, epsilon, relative, max_iterations, tolerance) -> InverseRoot:
  dtype, d = a.dtype, a.shape[0]
  if tolerance is None:
    tolerance = 1e-12 if dtype == jnp.float64 else 1e-6
  identity = jnp.eye(d, dtype=dtype)
  a = a + _damping(_largest_eigenvalue(a), epsilon, relative, dtype) * identity
  z = (1 + p) / (2 * jnp.linalg.norm(a))
  alpha = -1.0 / p

  def cond(carry):
    i, _, _, error, _, previous_error = carry
    return (i < max_iterations) & (error > tolerance) & (error < 1.2 * previous_error)

  def body(carry):
    i, m, h, error, _, _ = carry
    t = (1 - alpha) * identity + alpha * m
    m_next = jnp.linalg.matrix_power(t, p) @ m
    h_next = h @ t
    return i + 1, m_next, h_next, jnp.max(jnp.abs(m_next - identity)), h, error

  m0 = z * a
  h0 = z ** (1.0 / p) * identity
  start = (0, m0, h0, jnp.max(jnp.abs(m0 - identity)), h0, jnp.asarray(jnp.inf, dtype))
  _, _, h, error, h_before, error_before = jax.lax.while_loop(cond, body, start)
  # A diverging step (residual up 1.2x) is undone: return the iterate before it.
  diverged = error >= 1.2 * error_before
  matrix = jnp.where(diverged, h_before, h)
  residual = jnp.where(diverged, error_before, error)
  residual = jnp.where(jnp.all(jnp.isfinite(matrix)), residual, jnp.inf)
  return InverseRoot((matrix + matrix.T) / 2, residual)
