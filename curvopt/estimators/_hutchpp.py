"""Hutch++: trace estimation with low-rank deflation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from curvopt import _checks, _tree
from curvopt.estimators._hutchinson import TraceEstimate
from curvopt.oracles import LinearOperator, random_vector
from curvopt.oracles._probes import Distribution

PyTree = Any


def _as_rows(stacked: PyTree, dtype: Any) -> jax.Array:
  """A stacked pytree (k leading) as a `k x d` matrix."""
  return jnp.concatenate(
    [leaf.reshape(leaf.shape[0], -1).astype(dtype) for leaf in jax.tree.leaves(stacked)], axis=1
  )


def _from_rows(rows: jax.Array, structure: PyTree) -> PyTree:
  """Inverse of `_as_rows`."""
  leaves, treedef = jax.tree.flatten(structure)
  out, start = [], 0
  for spec in leaves:
    size = _tree.size_of(spec)
    out.append(rows[:, start : start + size].reshape(rows.shape[0], *spec.shape))
    start += size
  return treedef.unflatten(out)


def hutchpp_trace(
  operator: LinearOperator,
  key: jax.Array,
  *,
  num_matvecs: int = 99,
  distribution: Distribution = "rademacher",
) -> TraceEstimate:
  """Hutch++'s estimate of `tr(A)` from `num_matvecs` products.

  A third of the budget sketches the top of the spectrum (`Q = orth(A S)`),
  whose trace `tr(Q^T A Q)` is computed exactly; a third estimates the rest,
  `tr((I - QQ^T) A (I - QQ^T))`, by Hutchinson. For PSD matrices the error
  falls as `O(1/m)` instead of Hutchinson's `O(1/sqrt(m))`, and it is exact
  when `rank(A) <= m/3`. It only beats Hutchinson when the spectrum decays
  fast; on flat spectra both are equal. All products run in three `vmap`s.

  Args:
    operator: a symmetric `LinearOperator`.
    key: a PRNG key.
    num_matvecs: the budget `m`, a multiple of 3, with `m/3 <= d`.
    distribution: "rademacher" or "gaussian".

  Returns:
    A `TraceEstimate`; `stderr` is that of the Hutchinson part, and
    `converged` is always True (the budget is fixed).

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.hessian(lambda w: jnp.sum(jnp.arange(1.0, 7.0) * w**2), jnp.zeros(6))
    >>> round(float(curvopt.hutchpp_trace(op, jax.random.key(0), num_matvecs=18).trace), 3)
    42.0

  References:
    Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal Stochastic Trace
    Estimation", SOSA 2021.
  """
  _checks.prng_key("key", key)
  m = _checks.positive_int("num_matvecs", num_matvecs)
  if m % 3:
    raise ValueError(f"num_matvecs must be a multiple of 3, got {m}.")
  k = m // 3
  d = operator.size
  if k > d:
    raise ValueError(
      f"num_matvecs // 3 = {k} exceeds the dimension d = {d}; compute the trace exactly "
      "with jnp.trace(operator.as_matrix())."
    )
  dtype = operator.dtype
  structure = operator.in_structure
  sketch_key, probe_key = jax.random.split(key)

  def probes(key: jax.Array) -> PyTree:
    draw = lambda k: random_vector(k, structure, distribution, dtype)
    return jax.vmap(draw)(jax.random.split(key, k))

  apply = jax.vmap(operator.mv)  # products are read through _as_rows, in `dtype`
  sketch = _as_rows(apply(probes(sketch_key)), dtype)
  q, _ = jnp.linalg.qr(sketch.T)
  q_rows = _from_rows(q.T, structure)
  top = jnp.sum(_as_rows(q_rows, dtype) * _as_rows(apply(q_rows), dtype))

  g = _as_rows(probes(probe_key), dtype)
  g_perp = g - (g @ q) @ q.T
  samples = jnp.sum(g_perp * _as_rows(apply(_from_rows(g_perp, structure)), dtype), axis=1)
  stderr = jnp.std(samples, ddof=1) / jnp.sqrt(k) if k > 1 else jnp.asarray(jnp.inf, dtype)
  return TraceEstimate(
    top + jnp.mean(samples),
    stderr,
    jnp.int32(3 * k),
    jnp.asarray(True),
    operator.num_examples,
  )
