"""Exact Gauss-Newton: the Levenberg-Marquardt direction solved in the batch space."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy as jsp
import optax
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree
from curvopt._jaxpr import forward_flops
from curvopt.oracles import GaussNewtonFactor, gauss_newton_factor
from curvopt.transforms.gauss_newton._model import GaussNewtonModel, Mask, require_model_and_loss

PyTree = Any
SOLVERS = ("auto", "cholesky", "cg", "parameter_cholesky")
_HIGHEST = jax.lax.Precision.HIGHEST


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _solve_batch_cholesky(factor, diagonal, rhs_extra, unravel):
  """`z = (I + A D^-1 A^T)^-1 (w - A D^-1 q)`, `d = D^-1 (A^T z + q)`: `b k x b k` SPD."""
  a = factor.as_matrix()
  inverse = 1.0 / ravel_pytree(diagonal)[0]
  q = ravel_pytree(rhs_extra)[0]
  scaled = a * jnp.sqrt(inverse)
  system = jnp.eye(a.shape[0], dtype=a.dtype) + _matmul(scaled, scaled.T)
  rhs = factor.curvature.coefficients.reshape(-1) - _matmul(a, inverse * q)
  z = jsp.linalg.cho_solve(jsp.linalg.cho_factor(system, lower=True), rhs)
  return unravel(inverse * (_matmul(a.T, z) + q))


def _solve_parameter_cholesky(factor, diagonal, rhs_extra, unravel):
  """`(A^T A + D) d = A^T w + q` directly: `d x d`, for models smaller than the batch."""
  a = factor.as_matrix()
  system = _matmul(a.T, a) + jnp.diag(ravel_pytree(diagonal)[0])
  rhs = _matmul(a.T, factor.curvature.coefficients.reshape(-1)) + ravel_pytree(rhs_extra)[0]
  return unravel(jsp.linalg.cho_solve(jsp.linalg.cho_factor(system, lower=True), rhs))


def _solve_cg(factor, diagonal, rhs_extra, tol, maxiter):
  """The batch-space system by conjugate gradients: one JVP and one VJP per iteration."""
  scale = lambda tree: jax.tree.map(jnp.divide, tree, diagonal)

  def system(z):
    return z + factor.mv(scale(factor.rmv(z)))

  rhs = factor.curvature.coefficients - factor.mv(scale(rhs_extra))
  z, _ = jsp.sparse.linalg.cg(system, rhs, tol=tol, maxiter=maxiter)
  return scale(jax.tree.map(jnp.add, factor.rmv(z), rhs_extra))


# A batch of vmapped products and one factorization do several times more
# useful work per flop than CG's sequence of matrix-vector products, and they
# are exact: factor unless that costs this many times CG's estimate.
_FACTOR_PREFERENCE = 4.0


def solver_costs(
  num_params: int, num_rows: int, product_flops: float, cg_maxiter: int
) -> dict[str, float]:
  """Estimated flops of each solver for `d` parameters, `n = b k` rows, one product `F`.

  Materializing `A` costs `min(d, n)` products (JVPs or VJPs); the batch
  Cholesky then forms `A A^T` (`n^2 d`) and factors it (`n^3 / 3`), the
  parameter Cholesky `A^T A` (`d^2 n`) and `d^3 / 3`; CG costs a JVP and a
  VJP per iteration, `2 cg_maxiter F` at most.
  """
  d, n = float(num_params), float(num_rows)
  materialize = min(d, n) * product_flops
  return {
    "cholesky": materialize + n * n * d + n**3 / 3,
    "parameter_cholesky": materialize + d * d * n + d**3 / 3,
    "cg": 2.0 * cg_maxiter * product_flops,
  }


def choose_solver(
  num_params: int,
  num_rows: int,
  max_factor_size: int,
  product_flops: float,
  cg_maxiter: int,
) -> str:
  """`auto`: the cheaper factorization unless CG is much cheaper; CG above `max_factor_size`.

  `product_flops` is one model product's cost (`curvopt._jaxpr.forward_flops`
  of `model_fn`): on a convolutional net each of the `b k` products that
  materialize `A` costs a full pass, and CG's 100 passes win; on an MLP
  the factorization does.
  """
  costs = solver_costs(num_params, num_rows, product_flops, cg_maxiter)
  allowed = [
    s
    for s, size in (("parameter_cholesky", num_params), ("cholesky", num_rows))
    if size <= max_factor_size
  ]
  if not allowed:
    return "cg"
  best = min(allowed, key=costs.__getitem__)
  return "cg" if costs[best] > _FACTOR_PREFERENCE * costs["cg"] else best


def scale_by_egn(
  damping: float = 1.0,
  *,
  solver: str = "auto",
  l2_regularization: float = 0.0,
  l2_mask: Mask = None,
  max_factor_size: int = 1024,
  cg_tol: float = 1e-6,
  cg_maxiter: int = 50,
  name: str = "egn",
) -> optax.GradientTransformationExtraArgs:
  r"""The Exact Gauss-Newton direction `(G + \lambda I)^{-1} g`, solved in the batch space.

  `G = J^T B J` is the Gauss-Newton matrix of `loss_fn(model_fn(params))` on
  the current batch and `g` its gradient (plus an optional coupled L2 term,
  whose gradient and curvature enter exactly). With `G = A^T A`, `A = S^T J`
  (`curvopt.oracles.gauss_newton_factor`, `b k` rows) and the
  push-through identity, the `d x d` system becomes a symmetric positive
  definite `b k x b k` one (the symmetric form of spec 4.2; the paper-era
  code's `assume_a='sym'` solve of the nonsymmetric `Q J J^T` was wrong):

  `z = (I + A D^{-1} A^T)^{-1} (w - A D^{-1} q)`,  `d = D^{-1} (A^T z + q)`,

  with `D = \lambda + l2 mask`, `g = A^T w + q` and `q` the gradient outside
  `range(A^T)` (the L2 term; zero-curvature output directions).
  Solvers: `"cholesky"` (the above), `"cg"` (matrix-free conjugate gradients
  on the same system, one JVP and one VJP per iteration, for batches too
  large to factor), `"parameter_cholesky"` (the `d x d` system, for models
  smaller than the batch), or `"auto"`: by estimated cost (`solver_costs`,
  with one model product's flops counted from `model_fn`'s jaxpr), the
  cheaper factorization with at most `max_factor_size` rows unless it costs
  more than 4x CG. On a convolutional net every row of the factor costs a full
  pass, so a batch of 64 x 10 classes goes to CG; on an MLP the factorization
  wins.

  The direction is computed from `model_fn` and `loss_fn` (the extra
  arguments): the incoming gradient is not used, so transforms before this
  one (gradient clipping) do not change the direction; clip after it.
  The extra argument `damping`, when given (`levenberg_marquardt` passes
  it), replaces the fixed `damping`. Outputs keep the updates' dtype; the
  solve runs in float32 (float64 for float64 parameters).

  Args:
    damping: `lambda > 0`, on the scale of the mean loss.
    solver: one of `SOLVERS`.
    l2_regularization: coupled L2 strength `l2` (objective `+ l2/2 ||p||^2`).
    l2_mask: pytree of booleans (or a function of params returning one)
      choosing the penalized leaves; None penalizes all.
    max_factor_size: the largest system `"auto"` factors.
    cg_tol: relative residual tolerance of `"cg"`.
    cg_maxiter: iteration cap of `"cg"`.
    name: the optimizer's name in error messages.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 2.0])
    >>> tx = curvopt.transforms.scale_by_egn(damping=1e-6)
    >>> w = jnp.zeros(2)
    >>> d, _ = tx.update(w, tx.init(w), w, model_fn=lambda w: x @ w,
    ...                  loss_fn=lambda f: 0.5 * jnp.sum((f - y) ** 2))
    >>> (w - d).round(4)  # one (nearly) undamped Gauss-Newton step solves least squares
    Array([1., 1.], dtype=float32)

  References:
    Korbit, Adeoye, Bemporad, Zanon, "Exact Gauss-Newton Optimization for
    Training Deep Neural Networks", 2024 (arXiv 2405.14402).
  """
  _checks.one_of("solver", solver, SOLVERS)
  _checks.positive("damping", damping, " (a softmax's output Hessian is singular)")
  _checks.in_range("l2_regularization", l2_regularization, 0.0, float("inf"))
  max_factor_size = _checks.positive_int("max_factor_size", max_factor_size)
  cg_maxiter = _checks.positive_int("cg_maxiter", cg_maxiter)
  _checks.in_range("cg_tol", cg_tol, 0.0, 1.0)

  def init(params: PyTree) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, model_fn=None, loss_fn=None, **extra_args):
    model_fn, loss_fn = require_model_and_loss(name, model_fn, loss_fn, params)
    if params is None:
      raise ValueError(f"{name} needs params in update(updates, state, params, ...).")
    lam = extra_args.get("damping")
    direction = egn_direction(
      GaussNewtonModel(model_fn, loss_fn, l2_regularization, l2_mask),
      params,
      damping if lam is None else lam,
      solver=solver,
      max_factor_size=max_factor_size,
      cg_tol=cg_tol,
      cg_maxiter=cg_maxiter,
    )
    return _tree.cast_like(direction, updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def egn_direction(
  model: GaussNewtonModel,
  params: PyTree,
  damping: Any,
  *,
  solver: str = "auto",
  max_factor_size: int = 1024,
  cg_tol: float = 1e-6,
  cg_maxiter: int = 50,
) -> PyTree:
  """`(G + damping I)^{-1} g` for `model` at `params`, in the working dtype."""
  working = _tree.working_dtype(_tree.structure_of(params))
  params = _tree.cast(params, working)
  factor: GaussNewtonFactor = gauss_newton_factor(model.model_fn, model.loss_fn, params)
  mask = model.penalty_mask(params)
  diagonal = jax.tree.map(lambda m: jnp.asarray(damping, working) + model.l2 * m, mask)
  rhs_extra = model.penalty_gradient(params)
  if factor.curvature.null_gradient is not None:
    null_part = factor.output_vjp(factor.curvature.null_gradient)
    rhs_extra = jax.tree.map(jnp.add, rhs_extra, null_part)
  flat, unravel = ravel_pytree(params)
  b, k = factor.row_shape
  if solver == "auto":
    flops = forward_flops(model.model_fn, params)
    solver = choose_solver(flat.size, b * k, max_factor_size, flops, cg_maxiter)
  if solver == "cg":
    return _solve_cg(factor, diagonal, rhs_extra, cg_tol, cg_maxiter)
  solve: Callable = _solve_batch_cholesky if solver == "cholesky" else _solve_parameter_cholesky
  return solve(factor, diagonal, rhs_extra, unravel)
