"""Cubic-regularized Newton with lazy Hessians: one curvature snapshot reused for m steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree
from curvopt._cubic_subproblem import cubic_subproblem, regularized_newton_step
from curvopt.estimators import lanczos
from curvopt.oracles import hessian, hvp
from curvopt.transforms._cadence import refresh_when
from curvopt.transforms._extra_args import require_value_fn

PyTree = Any
MODES = ("auto", "dense", "matrix_free")
REGULARIZATIONS = ("cubic", "quadratic")
_HIGHEST = jax.lax.Precision.HIGHEST


class LazyNewtonState(NamedTuple):
  """State of `scale_by_lazy_newton`.

  Attributes:
    count: steps taken.
    eigenvalues: `(k,)` of the snapshot Hessian (dense: `k = d`; matrix-free:
      of its Lanczos matrix).
    eigenvectors: dense `(d, d)` eigenvectors; matrix-free `(k, d)`: the
      Lanczos basis already rotated into the eigenvectors of its matrix.
    snapshot: the parameters where the Hessian was taken, raveled
      (matrix-free mode, for the stale Hessian-vector product), else `()`:
      no zero-size array, which checkpointers such as orbax refuse.
    regularization: the current `M` (or the quadratic variant's constant).
    hessians: curvature snapshots computed so far (dense Hessians or Krylov bases).
    function_values: loss evaluations by the adaptive search for `M`.
    key: the PRNG key Lanczos restarts draw from (matrix-free mode).
    rejected_steps: steps returned as exactly zero because `max_doublings`
      doublings of `M` never reached sufficient decrease (a visible count,
      not a silent stall).
  """

  count: jax.Array
  eigenvalues: jax.Array
  eigenvectors: jax.Array
  snapshot: jax.Array | tuple[()]
  regularization: jax.Array
  hessians: jax.Array
  function_values: jax.Array
  key: jax.Array
  rejected_steps: jax.Array


def _in_gradient_units(value_fn, gradient):
  """`value_fn / c` and `c = max |g|`: the curvature in units where float32 squares fit."""
  c = jnp.max(jnp.abs(gradient))
  c = jnp.where((c > 0) & jnp.isfinite(c), c, 1.0)
  return (lambda p: value_fn(p) / c.astype(value_fn(p).dtype)), c


def _dense_snapshot(value_fn, params, gradient, flat_dtype):
  scaled, c = _in_gradient_units(value_fn, gradient)
  matrix = hessian(scaled, params).as_matrix().astype(flat_dtype)
  values, vectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
  return values * c, vectors


def _krylov_snapshot(value_fn, params, gradient, key, dim, unravel, dtype):
  """Lanczos from the gradient; the basis rotated into the eigenvectors of its matrix."""
  scaled, c = _in_gradient_units(value_fn, gradient)
  decomposition = lanczos(
    hessian(scaled, params), key, num_iterations=dim, initial_vector=unravel(gradient / c)
  )
  alphas, betas = decomposition.alphas.astype(dtype), decomposition.betas.astype(dtype)
  tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  eigenvalues, rotation = jnp.linalg.eigh(tridiagonal)
  eigenvalues = eigenvalues * c
  basis = jax.vmap(lambda i: ravel_pytree(_tree.stacked_get(decomposition.basis, i))[0])(
    jnp.arange(alphas.size)
  ).astype(dtype)
  return eigenvalues, jnp.matmul(rotation.T, basis, precision=_HIGHEST)


def scale_by_lazy_newton(
  regularization: float = 1.0,
  *,
  hessian_every: int | None = None,
  mode: str = "auto",
  kind: str = "cubic",
  adaptive: bool = True,
  min_regularization: float = 1e-10,
  max_doublings: int = 40,
  krylov_dim: int = 20,
  max_dense_size: int = 4096,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Cubic Newton steps with a Hessian reused for `hessian_every` steps (Doikov et al. 2023).

  Every `m = hessian_every` steps (the default `m = d` in dense mode,
  `krylov_dim` in matrix-free mode) a snapshot of the curvature is taken at
  the current point: dense mode computes the Hessian of `value_fn` (the
  extra argument) with `d` Hessian-vector products, symmetrizes it and keeps
  its eigendecomposition; matrix-free mode keeps a `krylov_dim`-step Lanczos
  basis started from the gradient, and the snapshot point. Every step then
  solves, with the fresh gradient `g` (the incoming updates),

  `h = argmin g^T h + h^T A h / 2 + (M/6) ||h||^3`

  exactly in the cached eigenbasis (`curvopt.cubic_subproblem`: O(d^2) per
  step, the hard case included). In matrix-free mode the subspace is the
  Lanczos basis plus the part of `g` outside it, whose curvature comes from
  one Hessian-vector product at the snapshot point (the stale operator).
  `kind="quadratic"` takes `h = -(A + lambda I)^{-1} g` with
  `lambda = sqrt(M ||g||)` instead (the gradient-regularized Newton step of
  the paper's Algorithm 2; convex objectives only).

  With `adaptive`, a step is accepted when `f(p + h) <= f(p) - M ||h||^3 / 12`
  (Nesterov and Polyak's sufficient decrease, up to 16 ulps of `f`; a NaN
  `f(p + h)` is no decrease), else `M` doubles and only the
  O(d^2) subproblem is re-solved, at most `max_doublings` times (then the
  step is zero); `M` is divided by 4 at every new snapshot, down to
  `min_regularization`. Outputs are `-h` (so `scale_by_learning_rate(1.0)`
  applies `h`).

  Args:
    regularization: `M > 0` (the initial one when `adaptive`).
    hessian_every: `m`, steps between snapshots; None: `d` (dense) or `krylov_dim`.
    mode: "dense", "matrix_free", or "auto" (dense up to `max_dense_size` parameters).
    kind: "cubic" or "quadratic".
    adaptive: search for `M` by sufficient decrease (uses `value_fn`).
    min_regularization: the floor of the adaptive `M`.
    max_doublings: the cap on the search.
    krylov_dim: Lanczos steps per matrix-free snapshot.
    max_dense_size: the largest `d` "auto" treats densely (a `d x d` state).
    seed: for Lanczos restarts.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> value_fn = lambda w: jnp.sum(w**2) + jnp.sum(w**4) / 4
    >>> tx = curvopt.transforms.scale_by_lazy_newton(1e-6, adaptive=False)
    >>> w = jnp.array([0.5, -0.5])
    >>> u, state = tx.update(jax.grad(value_fn)(w), tx.init(w), w, value_fn=value_fn)
    >>> (w - u).round(2), int(state.hessians)  # one Newton step: 0.5 - 1.125 / 2.75
    (Array([ 0.09, -0.09], dtype=float32), 1)

  References:
    Doikov, Chayti, Jaggi, "Second-order optimization with lazy Hessians",
    ICML 2023; Nesterov and Polyak, "Cubic regularization of Newton method
    and its global performance", Math. Program. 2006.
  """
  _checks.positive("regularization", regularization)
  _checks.one_of("mode", mode, MODES)
  _checks.one_of("kind", kind, REGULARIZATIONS)
  _checks.flag("adaptive", adaptive)
  _checks.positive("min_regularization", min_regularization)
  max_doublings = _checks.positive_int("max_doublings", max_doublings)
  krylov_dim = _checks.positive_int("krylov_dim", krylov_dim)
  max_dense_size = _checks.positive_int("max_dense_size", max_dense_size)
  if hessian_every is not None:
    hessian_every = _checks.positive_int("hessian_every", hessian_every)
  make_key = _checks.seed("seed", seed)

  def layout(params):
    flat, unravel = ravel_pytree(params)
    d = flat.size
    dense = mode == "dense" or (mode == "auto" and d <= max_dense_size)
    k = d if dense else min(krylov_dim, d)
    every = hessian_every or (d if dense else k)
    return dense, d, k, every, unravel

  def init(params: PyTree) -> LazyNewtonState:
    dense, d, k, _, _ = layout(params)
    dtype = _tree.working_dtype(_tree.structure_of(params))
    zero = jnp.zeros((), jnp.int32)
    return LazyNewtonState(
      count=zero,
      eigenvalues=jnp.zeros(k, dtype),
      eigenvectors=jnp.zeros((d, d) if dense else (k, d), dtype),
      snapshot=() if dense else jnp.zeros(d, dtype),
      regularization=jnp.asarray(regularization, dtype),
      hessians=zero,
      function_values=zero,
      key=make_key(),
      rejected_steps=zero,
    )

  def update(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("lazy_newton needs params in update(updates, state, params, ...).")
    value_fn = require_value_fn("lazy_newton", value_fn, params)
    dense, _, _, every, unravel = layout(params)
    dtype = state.eigenvalues.dtype
    params_w = _tree.cast(params, dtype)
    flat_params, unravel_w = ravel_pytree(params_w)
    g = ravel_pytree(_tree.cast(updates, dtype))[0]
    key, krylov_key = jax.random.split(state.key)

    def refresh():
      if dense:
        values, vectors = _dense_snapshot(value_fn, params_w, g, dtype)
        snapshot = state.snapshot
      else:
        values, vectors = _krylov_snapshot(
          value_fn, params_w, g, krylov_key, state.eigenvalues.shape[0], unravel_w, dtype
        )
        snapshot = flat_params
      m = (
        jnp.maximum(state.regularization / 4, min_regularization)
        if adaptive
        else (state.regularization)
      )
      return values, vectors, snapshot, m.astype(dtype), state.hessians + 1

    def keep():
      return (
        state.eigenvalues,
        state.eigenvectors,
        state.snapshot,
        state.regularization,
        state.hessians,
      )

    values, vectors, snapshot, m, hessians = refresh_when(state.count % every == 0, refresh, keep)
    if dense:
      solve_in_basis = _basis_solver(values, vectors, g, kind)
    else:
      solve_in_basis = _krylov_solver(values, vectors, snapshot, g, value_fn, unravel_w, kind)

    if adaptive:
      value = value_fn(params_w).astype(dtype)
      # Decreases below rounding cannot be measured: without this slack M doubles
      # at every step near the optimum.
      slack = 16 * jnp.finfo(dtype).eps * jnp.abs(value)

      def insufficient(carry):
        m, step, trials = carry
        trial = value_fn(unravel_w(flat_params + step)).astype(dtype)
        required = value - m * jnp.linalg.norm(step) ** 3 / 12 + slack
        # Not `trial > required`: a NaN loss at the trial point is no decrease either.
        return ~(trial <= required) & (trials < max_doublings)

      def double(carry):
        m, _, trials = carry
        return 2 * m, solve_in_basis(2 * m), trials + 1

      m, step, trials = jax.lax.while_loop(
        insufficient, double, (m, solve_in_basis(m), jnp.zeros((), jnp.int32))
      )
      rejected = trials >= max_doublings
      step = jnp.where(rejected, 0.0, step)
      evaluations = trials + 1
    else:
      step, evaluations, rejected = solve_in_basis(m), 0, False
    out = _tree.cast_like(unravel(-step), updates)
    new_state = LazyNewtonState(
      state.count + 1,
      values,
      vectors,
      snapshot,
      m,
      hessians,
      state.function_values + evaluations,
      key,
      state.rejected_steps + jnp.asarray(rejected, jnp.int32),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init, update)


def _subproblem(kind: str) -> Callable:
  if kind == "cubic":
    return cubic_subproblem
  return lambda values, g, m: regularized_newton_step(values, g, jnp.sqrt(m * jnp.linalg.norm(g)))


def _loss_scale(values: jax.Array, g: jax.Array) -> jax.Array:
  """The model's scale `c = max(|lambda|, |g|)`, 1 for a zero model.

  The subproblem's minimizer is unchanged when `g`, `H` and `M` are all
  divided by `c`, and in those units `||g||^2` cannot overflow: a loss scaled
  by 1e19 in float32 gave an exactly zero step before.
  """
  c = jnp.maximum(jnp.max(jnp.abs(values)), jnp.max(jnp.abs(g)))
  return jnp.where((c > 0) & jnp.isfinite(c), c, 1.0)


def _basis_solver(values, vectors, g, kind):
  """Dense mode: `M -> h` in parameter space, the eigenbasis fixed."""
  c = _loss_scale(values, g)
  g_basis = jnp.matmul(vectors.T, g / c, precision=_HIGHEST)
  solve = _subproblem(kind)
  return lambda m: jnp.matmul(vectors, solve(values / c, g_basis, m / c), precision=_HIGHEST)


def _krylov_solver(values, basis, snapshot, g, value_fn, unravel, kind):
  """Matrix-free mode: the Krylov basis plus the gradient's remainder, curvature at the snapshot."""
  c = _loss_scale(values, g)
  g, values = g / c, values / c
  coefficients = jnp.matmul(basis, g, precision=_HIGHEST)
  remainder = g - jnp.matmul(basis.T, coefficients, precision=_HIGHEST)
  # Twice, and dropped at round-off size: a "remainder" of rounding errors
  # lies inside the basis and would make the subspace degenerate.
  remainder = remainder - jnp.matmul(basis.T, basis @ remainder, precision=_HIGHEST)
  norm = jnp.linalg.norm(remainder)
  kept = norm > 1e3 * jnp.finfo(g.dtype).eps * jnp.linalg.norm(g)
  u = jnp.where(kept, remainder / jnp.where(kept, norm, 1.0), 0.0)
  norm = jnp.where(kept, norm, 0.0)
  hu = ravel_pytree(hvp(value_fn, unravel(snapshot), unravel(u)))[0].astype(g.dtype) / c
  cross = jnp.matmul(basis, hu, precision=_HIGHEST)
  k = values.size
  projected = jnp.zeros((k + 1, k + 1), g.dtype)
  projected = projected.at[:k, :k].set(jnp.diag(values))
  projected = projected.at[:k, k].set(cross).at[k, :k].set(cross).at[k, k].set(u @ hu)
  small_values, small_vectors = jnp.linalg.eigh(projected)
  full_basis = jnp.concatenate([basis, u[None]], axis=0)
  g_small = small_vectors.T @ jnp.concatenate([coefficients, norm[None]])
  solve = _subproblem(kind)

  def step(m):
    h_small = small_vectors @ solve(small_values, g_small, m / c)
    return jnp.matmul(full_basis.T, h_small, precision=_HIGHEST)

  return step
