"""Hutchinson's estimators of the diagonal and the trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvopt import _checks, _tree
from curvopt.estimators._loops import LoopMode, iterate, resolve_loop
from curvopt.oracles import LinearOperator, random_vector
from curvopt.oracles._probes import Distribution

PyTree = Any


class DiagonalEstimate(NamedTuple):
  """Result of `hutchinson_diagonal`.

  Attributes:
    diagonal: the estimate of `diag(A)`, shaped like the parameters.
    stderr: its standard error per coordinate (sample std / sqrt(probes)).
    num_probes: how many probes were used (fewer than asked when it stopped early).
    converged: whether `||stderr|| <= tol * ||diagonal||`.
    num_examples: the examples the operator was measured on (None if unknown).
  """

  diagonal: PyTree
  stderr: PyTree
  num_probes: jax.Array
  converged: jax.Array
  num_examples: Any = None


class TraceEstimate(NamedTuple):
  """Result of `hutchinson_trace` and `hutchpp_trace`.

  Attributes:
    trace: the estimate of `tr(A)`.
    stderr: its standard error.
    num_matvecs: how many operator products were spent.
    converged: whether `stderr <= tol * |trace|`.
    num_examples: the examples the operator was measured on (None if unknown).
  """

  trace: jax.Array
  stderr: jax.Array
  num_matvecs: jax.Array
  converged: jax.Array
  num_examples: Any = None


class _Moments(NamedTuple):
  count: jax.Array
  mean: PyTree
  m2: PyTree


def _merge(acc: _Moments, samples: PyTree, n: int) -> _Moments:
  """Adds `n` samples (leading axis) to running moments (Chan et al. 1979)."""
  total = acc.count + n
  chunk_mean = jax.tree.map(lambda s: jnp.mean(s, axis=0), samples)
  chunk_m2 = jax.tree.map(lambda s, m: jnp.sum((s - m) ** 2, axis=0), samples, chunk_mean)
  delta = jax.tree.map(jnp.subtract, chunk_mean, acc.mean)
  mean = jax.tree.map(lambda m, d: m + d * (n / total), acc.mean, delta)
  m2 = jax.tree.map(lambda a, b, d: a + b + d**2 * (acc.count * n / total), acc.m2, chunk_m2, delta)
  return _Moments(total, mean, m2)


def _stderr(moments: _Moments) -> PyTree:
  n = moments.count
  return jax.tree.map(
    lambda m2: jnp.where(n > 1, jnp.sqrt(m2 / jnp.maximum(n - 1, 1) / n), jnp.inf), moments.m2
  )


def _sample_probes(
  operator: LinearOperator,
  key: jax.Array,
  statistic: Callable[[PyTree, PyTree], PyTree],
  like: PyTree,
  *,
  num_probes: int,
  probes_per_step: int | None,
  distribution: Distribution,
  tol: float,
  loop: LoopMode,
) -> tuple[_Moments, jax.Array]:
  """Running mean and variance of `statistic(z, A z)` over random probes `z`."""
  _checks.prng_key("key", key)
  num_probes = _checks.positive_int("num_probes", num_probes)
  # None means all at once; 0 is refused, not read as None.
  per_step = (
    num_probes
    if probes_per_step is None
    else _checks.positive_int("probes_per_step", probes_per_step)
  )
  if num_probes % per_step:
    raise ValueError(
      f"num_probes ({num_probes}) must be a multiple of probes_per_step ({per_step})."
    )
  tol = _checks.non_negative_float("tol", tol)
  dtype = operator.dtype
  structure = operator.in_structure

  def body(step: jax.Array, acc: _Moments) -> _Moments:
    keys = jax.random.split(jax.random.fold_in(key, step), per_step)
    probes = jax.vmap(lambda k: random_vector(k, structure, distribution, dtype))(keys)
    products = _tree.cast(jax.vmap(operator.mv)(probes), dtype)
    return _merge(acc, jax.vmap(statistic)(probes, products), per_step)

  def done(acc: _Moments) -> jax.Array:
    return _converged(acc, tol)

  init = _Moments(jnp.zeros((), dtype), like, like)
  return iterate(
    num_probes // per_step,
    body,
    init,
    loop=resolve_loop(loop, operator),
    done=done if tol > 0 else None,
  )


def _converged(acc: _Moments, tol: float) -> jax.Array:
  err = _tree.norm(_stderr(acc))
  return (acc.count > 1) & (err <= tol * _tree.norm(acc.mean))


def hutchinson_diagonal(
  operator: LinearOperator,
  key: jax.Array,
  *,
  num_probes: int = 64,
  probes_per_step: int | None = 8,
  distribution: Distribution = "rademacher",
  tol: float = 0.0,
  loop: LoopMode = "auto",
) -> DiagonalEstimate:
  """Hutchinson's estimate of `diag(A)`: the mean of `z * (A z)` over probes `z`.

  Unbiased for any probe with independent entries of mean 0 and variance 1;
  Rademacher probes have the lowest variance (the variance of coordinate `i`
  is `sum_{j != i} A_ij^2` per probe). Probes are drawn `probes_per_step` at a
  time and pushed through the operator in one `vmap`.

  Args:
    operator: a symmetric `LinearOperator` (e.g. `curvopt.hessian(...)`).
    key: a PRNG key; the same key gives the same probes.
    num_probes: the largest number of probes.
    probes_per_step: probes per vmapped batch (`None`: all at once). Must divide
      `num_probes`.
    distribution: "rademacher" or "gaussian".
    tol: stop once `||stderr|| <= tol * ||diagonal||` (0: use every probe).
    loop: "auto", "lax" or "unroll" (see `curvopt.estimators` on CPU convolutions).

  Returns:
    A `DiagonalEstimate`, its leaves in float32 (float64 for float64 operators).

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.hessian(lambda w: jnp.sum(w**2) + w[0] * w[1], jnp.zeros(3))
    >>> est = curvopt.hutchinson_diagonal(op, jax.random.key(0), num_probes=4096)
    >>> est.diagonal.round(1)  # exact: [2, 2, 2]
    Array([2., 2., 2.], dtype=float32)

  References:
    Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix",
    Applied Numerical Mathematics 2007.
  """
  like = _tree.zeros(operator.in_structure, operator.dtype)
  moments, _ = _sample_probes(
    operator,
    key,
    lambda z, az: jax.tree.map(jnp.multiply, z, az),
    like,
    num_probes=num_probes,
    probes_per_step=probes_per_step,
    distribution=distribution,
    tol=tol,
    loop=loop,
  )
  return DiagonalEstimate(
    moments.mean,
    _stderr(moments),
    moments.count.astype(jnp.int32),
    _converged(moments, tol),
    operator.num_examples,
  )


def hutchinson_trace(
  operator: LinearOperator,
  key: jax.Array,
  *,
  num_probes: int = 64,
  probes_per_step: int | None = 8,
  distribution: Distribution = "rademacher",
  tol: float = 0.0,
  loop: LoopMode = "auto",
) -> TraceEstimate:
  """Hutchinson's estimate of `tr(A)`: the mean of `z^T A z` over probes `z`.

  Args:
    operator: a `LinearOperator`.
    key: a PRNG key.
    num_probes: the largest number of probes (one product each).
    probes_per_step: probes per vmapped batch (`None`: all at once).
    distribution: "rademacher" (variance `2 sum_{i != j} A_ij^2` per probe)
      or "gaussian" (`2 ||A||_F^2`).
    tol: stop once `stderr <= tol * |trace|` (0: use every probe).
    loop: "auto", "lax" or "unroll".

  Returns:
    A `TraceEstimate`.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.hessian(lambda w: jnp.sum(w**2), jnp.zeros(5))
    >>> float(curvopt.hutchinson_trace(op, jax.random.key(0), num_probes=8).trace)
    10.0

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", 1990.
  """
  dtype = operator.dtype
  moments, _ = _sample_probes(
    operator,
    key,
    _tree.dot,
    jnp.zeros((), dtype),
    num_probes=num_probes,
    probes_per_step=probes_per_step,
    distribution=distribution,
    tol=tol,
    loop=loop,
  )
  return TraceEstimate(
    moments.mean,
    _stderr(moments),
    moments.count.astype(jnp.int32),
    _converged(moments, tol),
    operator.num_examples,
  )
