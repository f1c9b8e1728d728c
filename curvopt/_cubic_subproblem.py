"""The cubic-regularized Newton subproblem, solved exactly in an eigenbasis."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BISECTION_STEPS = 100


def _step_norm(eigenvalues: jax.Array, g: jax.Array, m: jax.Array, r: jax.Array) -> jax.Array:
  """`||(Lambda + M r / 2)^{-1} g||`, the secular function's first term."""
  return jnp.linalg.norm(g / (eigenvalues + 0.5 * m * r))


def _scaled_norm(x: jax.Array) -> jax.Array:
  """`||x||` without underflow: the squares of a gradient below ~1e-19 (float32) vanish."""
  scale = jnp.max(jnp.abs(x))
  return scale * jnp.linalg.norm(x / jnp.where(scale > 0, scale, 1))


def cubic_subproblem(eigenvalues: jax.Array, g: jax.Array, regularization: jax.Array) -> jax.Array:
  """`argmin_h g^T h + h^T diag(eigenvalues) h / 2 + (M/6) ||h||^3`, globally, in the eigenbasis.

  The minimizer solves `(Lambda + M r/2) h = -g` with `r = ||h||` and
  `Lambda + M r/2 >= 0` (Nesterov and Polyak 2006, section 5). With
  `r_low = max(0, -2 lambda_min / M)`, `psi(r) = ||g / (Lambda + M r/2)|| - r`
  decreases on `(r_low, inf)`, and its root is bracketed by
  `[r_low, r_low + sqrt(2 ||g|| / M)]`: bisection (100 halvings, every one
  O(d)). When the root lies within rounding of `r_low` (the hard case: `g`
  orthogonal to the lowest eigenvector of an indefinite matrix), the step is
  `-g_j / (lambda_j - lambda_min)` off that eigenvector plus the component
  along it that makes `||h|| = r_low` (sign opposite to `g`'s, + when zero).

  Args:
    eigenvalues: `(d,)`, ascending (as `jnp.linalg.eigh` returns them).
    g: `(d,)`, the gradient in the same eigenbasis.
    regularization: `M > 0`.

  Returns:
    `h` in the eigenbasis, `(d,)`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> # 1-D closed form: h = -2 g / (a + sqrt(a^2 + 2 M |g|)) = -8 / (1 + 3) for a = M = 1, g = 4
    >>> curvopt.cubic_subproblem(jnp.array([1.0]), jnp.array([4.0]), 1.0)
    Array([-2.], dtype=float32)

  References:
    Nesterov and Polyak, "Cubic regularization of Newton method and its
    global performance", Math. Program. 2006; Conn, Gould, Toint,
    "Trust-Region Methods", 2000, section 7.3 (the hard case).
  """
  dtype = jnp.result_type(eigenvalues, g, jnp.float32)
  eigenvalues, g = eigenvalues.astype(dtype), g.astype(dtype)
  m = jnp.asarray(regularization, dtype)
  lowest = eigenvalues[0]
  r_low = jnp.maximum(0.0, -2.0 * lowest / m)
  tiny = jnp.finfo(dtype).tiny
  # Just above r_low every denominator is positive in floating point.
  r_edge = r_low * (1 + 16 * jnp.finfo(dtype).eps) + tiny
  hard = (lowest < 0) & (_step_norm(eigenvalues, g, m, r_edge) <= r_edge)
  return jnp.where(hard, _hard_case(eigenvalues, g, r_low), _easy_case(eigenvalues, g, m, r_edge))


def _easy_case(eigenvalues, g, m, r_edge):
  def halve(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    above = _step_norm(eigenvalues, g, m, mid) > mid
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  hi = r_edge + jnp.sqrt(2.0 * _scaled_norm(g) / m)
  _, r = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (r_edge, hi))
  denominators = eigenvalues + 0.5 * m * r
  return jnp.where(g == 0, 0.0, -g / jnp.where(g == 0, 1.0, denominators))


def _hard_case(eigenvalues, g, r_low):
  gap = eigenvalues - eigenvalues[0]
  scale = jnp.max(jnp.abs(eigenvalues))
  lowest_space = gap <= 8 * jnp.finfo(eigenvalues.dtype).eps * scale
  off = jnp.where(lowest_space, 0.0, -g / jnp.where(lowest_space, 1.0, gap))
  along = jnp.sqrt(jnp.maximum(r_low**2 - jnp.sum(off**2), 0.0))
  sign = jnp.where(g[0] > 0, -1.0, 1.0)
  return off.at[0].set(sign * along)


def regularized_newton_step(eigenvalues: jax.Array, g: jax.Array, damping: jax.Array) -> jax.Array:
  """`-(Lambda + damping)^{-1} g` in the eigenbasis (the quadratic-regularization variant).

  Needs `lambda_min + damping > 0` (a convex objective); a smaller
  denominator (one at or below zero included) is raised to machine epsilon
  times the largest `|eigenvalue|` (at least epsilon), so the step stays finite.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.regularized_newton_step(jnp.array([1.0, 3.0]), jnp.array([2.0, 2.0]), 1.0)
    Array([-1. , -0.5], dtype=float32)

  References:
    Mishchenko, "Regularized Newton Method with Global O(1/k^2)
    Convergence", SIAM J. Optim. 2023; Doikov, Chayti, Jaggi 2023 (its lazy form).
  """
  dtype = jnp.result_type(eigenvalues, g, jnp.float32)
  denominators = eigenvalues.astype(dtype) + jnp.asarray(damping, dtype)
  floor = jnp.finfo(dtype).eps * jnp.maximum(jnp.max(jnp.abs(eigenvalues)), 1.0)
  return -g.astype(dtype) / jnp.maximum(denominators, floor)
