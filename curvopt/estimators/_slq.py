"""Stochastic Lanczos quadrature: the spectral density of a symmetric operator."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvopt import _checks
from curvopt.estimators._lanczos import lanczos_recurrence, ritz_decomposition
from curvopt.estimators._loops import LoopMode, resolve_loop
from curvopt.oracles import LinearOperator, random_vector

PyTree = Any


class SpectralDensity(NamedTuple):
  """Gauss quadrature rules of the spectral measure, one per probe.

  For a unit probe `v`, the nodes `theta_j` and weights `tau_j` (summing to 1)
  satisfy `sum_j tau_j f(theta_j) ~ v^T f(A) v`, exactly for polynomials of
  degree below `2 m`; averaged over probes this estimates `tr f(A) / d`.

  Attributes:
    nodes: Ritz values, shape `(num_probes, m)`.
    weights: quadrature weights, shape `(num_probes, m)`.
    dimension: `d`, to turn means into traces.
    num_examples: the examples the operator was measured on (None if unknown).
  """

  nodes: jax.Array
  weights: jax.Array
  dimension: Any
  num_examples: Any = None

  def moment(self, power: int) -> jax.Array:
    """The estimate of `tr(A^power) / d`."""
    return jnp.mean(jnp.sum(self.weights * self.nodes**power, axis=-1))

  def trace(self, fn: Any = None) -> jax.Array:
    """The estimate of `tr f(A)` (`f` the identity by default)."""
    values = self.nodes if fn is None else fn(self.nodes)
    return self.dimension * jnp.mean(jnp.sum(self.weights * values, axis=-1))

  def density(self, grid: jax.Array, sigma: float) -> jax.Array:
    """The density smoothed by a Gaussian of width `sigma`, evaluated on `grid`.

    It integrates to 1 (up to the mass outside `grid`), as in Ghorbani,
    Krishnan and Xiao (2019).
    """
    grid = jnp.asarray(grid)
    z = (grid[:, None, None] - self.nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(self.weights[None] * kernel, axis=-1), axis=-1)


def spectral_density(
  operator: LinearOperator,
  key: jax.Array,
  *,
  num_iterations: int = 90,
  num_probes: int = 8,
  loop: LoopMode = "auto",
) -> SpectralDensity:
  """The spectral density of `operator` by stochastic Lanczos quadrature.

  Each probe is a normalized Rademacher vector; `num_iterations` Lanczos
  steps with full reorthogonalization give the tridiagonal `T`, whose
  eigenvalues are the nodes and whose eigenvectors' squared first entries
  are the weights. Probes run one after another (memory holds one basis).

  Args:
    operator: a symmetric `LinearOperator`.
    key: a PRNG key.
    num_iterations: Lanczos steps per probe (at most `d` are run).
    num_probes: independent probes to average (8: a spectrum's weights, and
      `.trace()`, average over probes; one probe's trace is off by several
      percent on a small MLP's Hessian, 8 cut that by sqrt(8). The cost is
      `num_probes * num_iterations` operator products, 720 by default. For the
      trace alone `curvopt.hutchpp_trace` is far more accurate per product).
    loop: "auto", "lax" or "unroll".

  Returns:
    A `SpectralDensity`; use `.density(grid, sigma)` for a smooth curve.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.diagonal_operator(jnp.array([1.0, 2.0, 3.0, 4.0]))
    >>> sd = curvopt.spectral_density(op, jax.random.key(0), num_iterations=4)
    >>> [round(float(x), 3) for x in sd.nodes[0]], round(float(sd.weights[0].sum()), 4)
    ([1.0, 2.0, 3.0, 4.0], 1.0)

  References:
    Ghorbani, Krishnan, Xiao, "An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density", ICML 2019.
    Golub and Meurant, "Matrices, Moments and Quadrature with Applications", 2010.
  """
  _checks.prng_key("key", key)
  num_probes = _checks.positive_int("num_probes", num_probes)
  m = min(_checks.positive_int("num_iterations", num_iterations), operator.size)
  plan = resolve_loop(loop, operator)

  def one_probe(probe_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    start_key, restart_key = jax.random.split(probe_key)
    start = random_vector(start_key, operator.in_structure, "rademacher", operator.dtype)
    out = lanczos_recurrence(operator, restart_key, m, start, loop=plan)
    theta, s, valid = ritz_decomposition(out.alphas, out.betas, out.num_iterations)
    weights = jnp.where(valid, s[0] ** 2, 0.0)
    order = jnp.argsort(jnp.where(valid, theta, jnp.inf))
    return theta[order], weights[order]

  keys = jax.random.split(key, num_probes)
  if plan.unroll:
    results = [one_probe(k) for k in keys]
    nodes = jnp.stack([r[0] for r in results])
    weights = jnp.stack([r[1] for r in results])
  else:
    nodes, weights = jax.lax.map(one_probe, keys)
  return SpectralDensity(nodes, weights, operator.size, operator.num_examples)
