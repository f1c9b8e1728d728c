"""Lanczos tridiagonalization with full reorthogonalization, and Ritz pairs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.estimators._loops import Loop, LoopMode, iterate, resolve_loop
from curvopt.oracles import LinearOperator, random_vector

PyTree = Any
Which = Literal["LA", "SA", "LM"]
WHICH = ("LA", "SA", "LM")

# A residual below this many units of roundoff (relative to ||A||) means the
# Krylov space is invariant: Lanczos restarts from a fresh orthogonal vector.
_BREAKDOWN_ULPS = 1e3
# Weight of the random part mixed into a warm start, so that Lanczos still
# explores directions the previous eigenvectors miss.
_WARM_START_NOISE = 1e-3


class LanczosDecomposition(NamedTuple):
  """`A V^T ~ V^T T`: an orthonormal basis `V` and a tridiagonal `T`.

  Attributes:
    alphas: the diagonal of `T`, shape `(m,)`.
    betas: `betas[j]` couples basis vectors `j` and `j + 1`; `betas[m-1]` is
      the norm of the final residual. A zero marks a restart after the Krylov
      space became invariant.
    basis: the orthonormal Lanczos vectors, shaped like the parameters with a
      leading axis of length `m`.
    num_iterations: how many steps ran; entries past it are zero.
  """

  alphas: jax.Array
  betas: jax.Array
  basis: PyTree
  num_iterations: jax.Array


class Eigenpairs(NamedTuple):
  """Result of `lanczos_eigenpairs`.

  Attributes:
    eigenvalues: the `k` Ritz values, ordered by `which` (descending for
      "LA", ascending for "SA", descending in magnitude for "LM").
    eigenvectors: the unit Ritz vectors, shaped like the parameters with a
      leading axis of length `k`.
    residuals: `||A u - theta u||` for each pair (from the recurrence).
    converged: whether each residual is `<= tol * ||A||`, with `||A||`
      estimated by the largest Ritz value in magnitude.
    num_iterations: Lanczos steps taken.
    num_examples: the examples the operator was measured on (None if unknown).
  """

  eigenvalues: jax.Array
  eigenvectors: PyTree
  residuals: jax.Array
  converged: jax.Array
  num_iterations: jax.Array
  num_examples: Any = None


class _State(NamedTuple):
  steps: jax.Array
  basis: PyTree
  alphas: jax.Array
  betas: jax.Array
  vector: PyTree
  scale: jax.Array


def _unit(v: PyTree) -> PyTree:
  n = _tree.norm(v)
  return optax.tree.scale(1.0 / jnp.where(n > 0, n, 1.0), v)


def lanczos_recurrence(
  operator: LinearOperator,
  key: jax.Array,
  num_iterations: int,
  start: PyTree,
  *,
  loop: Loop,
  done: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> LanczosDecomposition:
  """`num_iterations` Lanczos steps from `start` (shared by `lanczos` and the SLQ restarts).

  `done(alphas, betas, steps)`, when given, stops a `lax` loop early.
  """
  dtype = operator.dtype
  structure = operator.in_structure
  eps = jnp.finfo(dtype).eps
  # Restarts rotate one random vector instead of drawing a new one: as good
  # a direction, and the loop body stays small to compile.
  seed = random_vector(key, structure, "gaussian", dtype)

  def body(j: int | jax.Array, s: _State) -> _State:
    # Row j of the basis holds s.vector already; rows past j are zero, and
    # unrolled steps (static j) skip them. (Choosing among static prefixes
    # with `lax.switch` in `lax` loops was measured slower: it copies the basis.)
    filled = _tree.stacked_head(s.basis, j + 1) if isinstance(j, int) else s.basis
    w = _tree.cast(operator.mv(s.vector), dtype)
    alpha = _tree.dot(s.vector, w)
    # The three-term recurrence, then full reorthogonalization against every
    # earlier vector (which the recurrence alone loses in floating point).
    w = optax.tree.add_scale(w, -alpha, s.vector)
    if not isinstance(j, int) or j > 0:
      previous = jnp.maximum(j - 1, 0)
      w = optax.tree.add_scale(w, -s.betas[previous], _tree.stacked_get(s.basis, previous))
    w = _tree.orthogonalize(filled, w)
    beta = _tree.norm(w)
    scale = jnp.maximum(s.scale, jnp.maximum(jnp.abs(alpha), beta))
    breakdown = beta <= _BREAKDOWN_ULPS * eps * scale

    def restart() -> PyTree:
      fresh = jax.tree.map(lambda r: jnp.roll(r.ravel(), j + 1).reshape(r.shape), seed)
      return _unit(_tree.project_out(filled, _tree.project_out(filled, fresh)))

    def advance() -> PyTree:
      return optax.tree.scale(1.0 / jnp.where(breakdown, 1.0, beta), w)

    vector = jax.lax.cond(breakdown, restart, advance)
    return _State(
      s.steps + 1,
      # Writing the *next* vector, which depends on this step's reads of the
      # basis, lets XLA update the basis in place instead of copying it.
      _tree.stacked_set(s.basis, j + 1, vector),
      s.alphas.at[j].set(alpha),
      s.betas.at[j].set(jnp.where(breakdown, 0.0, beta)),
      vector,
      scale,
    )

  first = _unit(_tree.cast(start, dtype))
  init = _State(
    jnp.int32(0),
    _tree.stacked_set(_tree.stacked_zeros(num_iterations + 1, structure, dtype), 0, first),
    jnp.zeros(num_iterations, dtype),
    jnp.zeros(num_iterations, dtype),
    first,
    jnp.zeros((), dtype),
  )
  stop = None if done is None else lambda s: done(s.alphas, s.betas, s.steps)
  state, _ = iterate(num_iterations, body, init, loop=loop, done=stop)
  used = jnp.arange(num_iterations) < state.steps
  basis = jax.tree.map(
    lambda b: jnp.where(used.reshape(-1, *([1] * (b.ndim - 1))), b[:num_iterations], 0.0),
    state.basis,
  )
  return LanczosDecomposition(state.alphas, state.betas, basis, state.steps)


def ritz_decomposition(
  alphas: jax.Array, betas: jax.Array, steps: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eigenpairs of the leading `steps x steps` block of `T`, in fixed shapes.

  Returns `(theta, s, valid)`: the eigenvalues and eigenvectors (columns) of
  a `m x m` matrix whose leading block is `T` and whose trailing diagonal
  holds a sentinel below every eigenvalue of `T` (Gershgorin), so the two
  blocks never mix; `valid` marks the columns that belong to `T`.
  """
  m = alphas.shape[0]
  index = jnp.arange(m)
  valid_row = index < steps
  off = jnp.where(index[:-1] < steps - 1, betas[:-1], 0.0)
  left = jnp.concatenate([jnp.zeros(1, off.dtype), jnp.abs(off)])
  right = jnp.concatenate([jnp.abs(off), jnp.zeros(1, off.dtype)])
  lower = jnp.min(jnp.where(valid_row, alphas - left - right, jnp.inf))
  spread = jnp.max(jnp.where(valid_row, jnp.abs(alphas) + left + right, 0.0))
  sentinel = lower - 1.0 - spread
  tridiagonal = (
    jnp.diag(jnp.where(valid_row, alphas, sentinel)) + jnp.diag(off, 1) + jnp.diag(off, -1)
  )
  theta, s = jnp.linalg.eigh(tridiagonal)
  valid = jnp.sum(jnp.where(valid_row[:, None], s**2, 0.0), axis=0) > 0.5
  return theta, s, valid


def _select(theta: jax.Array, valid: jax.Array, k: int, which: Which) -> jax.Array:
  score = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
  return jax.lax.top_k(jnp.where(valid, score, -jnp.inf), k)[1]


def _ritz_pairs(
  alphas: jax.Array, betas: jax.Array, steps: jax.Array, k: int, which: Which
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The wanted `k` Ritz values, their coefficients, residuals and ||A|| estimate."""
  theta, s, valid = ritz_decomposition(alphas, betas, steps)
  chosen = _select(theta, valid, k, which)
  last = jnp.maximum(steps - 1, 0)
  residuals = jnp.abs(betas[last] * s[last, chosen])
  norm_estimate = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
  return theta[chosen], s[:, chosen], residuals, norm_estimate


def _start_vector(operator: LinearOperator, key: jax.Array, warm_start: PyTree | None) -> PyTree:
  dtype = operator.dtype
  structure = operator.in_structure
  noise = random_vector(key, structure, "gaussian", dtype)
  if warm_start is None:
    return noise
  if jax.tree.structure(warm_start) != jax.tree.structure(structure):
    _checks.matches_structure("warm_start", warm_start, structure)
  leaves, specs = jax.tree.leaves(warm_start), jax.tree.leaves(structure)
  stacked = all(leaf.ndim == len(spec.shape) + 1 for leaf, spec in zip(leaves, specs, strict=True))
  if stacked:
    warm_start = jax.tree.map(lambda x: jnp.sum(x, axis=0), warm_start)
  _checks.matches_structure("warm_start", warm_start, structure)
  warm = _unit(_tree.cast(warm_start, dtype))
  return optax.tree.add_scale(warm, _WARM_START_NOISE, _unit(noise))


def lanczos(
  operator: LinearOperator,
  key: jax.Array,
  *,
  num_iterations: int = 30,
  initial_vector: PyTree | None = None,
  loop: LoopMode = "auto",
) -> LanczosDecomposition:
  """`num_iterations` steps of Lanczos with full reorthogonalization.

  Every new vector is orthogonalized against the whole basis, twice, so no
  spurious ("ghost") copies of converged eigenvalues appear (Paige 1976). When
  the Krylov space becomes invariant the recurrence restarts from a random
  vector orthogonal to the basis and records a zero `beta`. Iterations past
  the dimension `d` are dropped.

  Args:
    operator: a symmetric `LinearOperator`.
    key: a PRNG key for the Gaussian starting vector and restarts.
    num_iterations: the number of steps `m` (at most `d` are run).
    initial_vector: a starting vector instead of a random one.
    loop: "auto", "lax" or "unroll".

  Returns:
    A `LanczosDecomposition`.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.diagonal_operator(jnp.array([1.0, 2.0, 3.0]))
    >>> out = curvopt.lanczos(op, jax.random.key(0), num_iterations=3)
    >>> jnp.linalg.eigvalsh(jnp.diag(out.alphas) + jnp.diag(out.betas[:-1], 1)
    ...     + jnp.diag(out.betas[:-1], -1)).round(4)
    Array([1., 2., 3.], dtype=float32)

  References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", 1950.
  """
  _checks.prng_key("key", key)
  m = min(_checks.positive_int("num_iterations", num_iterations), operator.size)
  if initial_vector is None:
    start = random_vector(key, operator.in_structure, "gaussian", operator.dtype)
  else:
    _checks.matches_structure("initial_vector", initial_vector, operator.in_structure)
    start = initial_vector
  return lanczos_recurrence(operator, key, m, start, loop=resolve_loop(loop, operator))


def lanczos_eigenpairs(
  operator: LinearOperator,
  key: jax.Array,
  *,
  k: int = 1,
  which: Which = "LA",
  num_iterations: int | None = None,
  tol: float = 1e-5,
  warm_start: PyTree | None = None,
  loop: LoopMode = "auto",
) -> Eigenpairs:
  """The `k` extreme eigenpairs of a symmetric operator, by Lanczos.

  Args:
    operator: a symmetric `LinearOperator`.
    key: a PRNG key.
    k: how many eigenpairs (`k <= d`).
    which: "LA" largest algebraic (the sharpness), "SA" smallest algebraic
      (the most negative curvature), or "LM" largest magnitude.
    num_iterations: the largest number of Lanczos steps (default
      `max(20, 2k + 10)`, at most `d`); must be at least `k`.
    tol: stop once every wanted residual is `<= tol * ||A||` (0: run all steps).
    warm_start: eigenvectors from a previous call (stacked, or one vector), to
      converge in fewer steps when the operator changed little (for instance
      between training steps).
    loop: "auto", "lax" or "unroll".

  Returns:
    `Eigenpairs`, in float32 (float64 for float64 operators).

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.diagonal_operator(jnp.array([1.0, -5.0, 3.0, 2.0]))
    >>> curvopt.lanczos_eigenpairs(op, jax.random.key(0), k=2).eigenvalues.round(4)
    Array([3., 2.], dtype=float32)
    >>> curvopt.lanczos_eigenpairs(op, jax.random.key(0), k=1, which="LM").eigenvalues.round(4)
    Array([-5.], dtype=float32)

  References:
    Golub and Van Loan, "Matrix Computations", 4th ed., section 10.1.
  """
  _checks.prng_key("key", key)
  k = _checks.positive_int("k", k)
  _checks.one_of("which", which, WHICH)
  tol = _checks.non_negative_float("tol", tol)
  d = operator.size
  if k > d:
    raise ValueError(f"k ({k}) must not exceed the operator's dimension d = {d}.")
  if num_iterations is None:
    m = min(d, max(20, 2 * k + 10))
  else:
    m = min(_checks.positive_int("num_iterations", num_iterations), d)
    if m < k:
      raise ValueError(f"num_iterations ({num_iterations}) must be at least k ({k}).")
  start_key, restart_key = jax.random.split(key)

  def converged(alphas: jax.Array, betas: jax.Array, steps: jax.Array) -> jax.Array:
    _, _, residuals, norm = _ritz_pairs(alphas, betas, steps, k, which)
    return (steps >= k) & jnp.all(residuals <= tol * norm)

  decomposition = lanczos_recurrence(
    operator,
    restart_key,
    m,
    _start_vector(operator, start_key, warm_start),
    loop=resolve_loop(loop, operator),
    done=converged if tol > 0 else None,
  )
  steps = decomposition.num_iterations
  values, coefficients, residuals, norm = _ritz_pairs(
    decomposition.alphas, decomposition.betas, steps, k, which
  )
  vectors = _tree.stacked_combine(decomposition.basis, coefficients)
  return Eigenpairs(
    values, vectors, residuals, residuals <= tol * norm, steps, operator.num_examples
  )
