"""Power iteration for the eigenvalue of largest magnitude."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.estimators._loops import LoopMode, iterate, resolve_loop
from curvopt.oracles import LinearOperator, random_vector

PyTree = Any


class PowerIterationResult(NamedTuple):
  """Result of `power_iteration`.

  Attributes:
    eigenvalue: the Rayleigh quotient `v^T A v` of the final unit vector.
    eigenvector: that unit vector, shaped like the parameters.
    residual: `||A v - eigenvalue * v||`.
    num_iterations: products spent in the loop.
    converged: whether the last change of the eigenvalue was `<= tol * |eigenvalue|`.
    num_examples: the examples the operator was measured on (None if unknown).
  """

  eigenvalue: jax.Array
  eigenvector: PyTree
  residual: jax.Array
  num_iterations: jax.Array
  converged: jax.Array
  num_examples: Any = None


class _State(NamedTuple):
  vector: PyTree
  eigenvalue: jax.Array
  change: jax.Array


def _normalized(v: PyTree, fallback: PyTree) -> PyTree:
  n = _tree.norm(v)
  safe = jnp.where(n > 0, n, 1.0)
  return jax.tree.map(lambda x, f: jnp.where(n > 0, x / safe, f), v, fallback)


def power_iteration(
  operator: LinearOperator,
  key: jax.Array,
  *,
  num_iterations: int = 100,
  tol: float = 1e-6,
  initial_vector: PyTree | None = None,
  loop: LoopMode = "auto",
) -> PowerIterationResult:
  """The eigenpair of largest magnitude, by power iteration.

  This is the *largest magnitude* eigenvalue, which can be negative for an
  indefinite Hessian: use `curvopt.sharpness` or `curvopt.lanczos_eigenpairs`
  (`which="LA"`) for the largest algebraic one. Convergence is linear in
  `|lambda_2 / lambda_1|`; Lanczos needs far fewer products for the same
  accuracy.

  Args:
    operator: a symmetric `LinearOperator`.
    key: a PRNG key for the Gaussian starting vector.
    num_iterations: the largest number of products.
    tol: stop once the eigenvalue changes by at most `tol * |eigenvalue|`.
    initial_vector: a starting vector (e.g. the previous step's eigenvector).
    loop: "auto", "lax" or "unroll".

  Returns:
    A `PowerIterationResult`.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.diagonal_operator(jnp.array([1.0, -3.0, 2.0]))
    >>> round(float(curvopt.power_iteration(op, jax.random.key(0)).eigenvalue), 4)
    -3.0

  References:
    Golub and Van Loan, "Matrix Computations", 4th ed., section 8.2.1.
  """
  _checks.prng_key("key", key)
  num_iterations = _checks.positive_int("num_iterations", num_iterations)
  tol = _checks.non_negative_float("tol", tol)
  dtype = operator.dtype
  structure = operator.in_structure
  if initial_vector is None:
    start = random_vector(key, structure, "gaussian", dtype)
  else:
    _checks.matches_structure("initial_vector", initial_vector, structure)
    start = _tree.cast(initial_vector, dtype)
  start = _normalized(start, random_vector(key, structure, "gaussian", dtype))

  def body(_: jax.Array, state: _State) -> _State:
    w = _tree.cast(operator.mv(state.vector), dtype)
    eigenvalue = _tree.dot(state.vector, w)
    return _State(_normalized(w, state.vector), eigenvalue, jnp.abs(eigenvalue - state.eigenvalue))

  def done(state: _State) -> jax.Array:
    return state.change <= tol * jnp.abs(state.eigenvalue)

  init = _State(start, jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype))
  state, steps = iterate(num_iterations, body, init, loop=resolve_loop(loop, operator), done=done)
  w = _tree.cast(operator.mv(state.vector), dtype)
  eigenvalue = _tree.dot(state.vector, w)
  residual = _tree.norm(optax.tree.add_scale(w, -eigenvalue, state.vector))
  return PowerIterationResult(
    eigenvalue, state.vector, residual, steps, done(state), operator.num_examples
  )
