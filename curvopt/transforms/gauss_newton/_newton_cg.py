"""Hessian-free Newton: truncated conjugate gradients on a damped curvature (Martens 2010)."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree, _xla_cpu
from curvopt.oracles import gauss_newton, hessian
from curvopt.transforms._extra_args import require_value_fn
from curvopt.transforms.gauss_newton._model import require_model_and_loss

PyTree = Any
Curvature = Literal["gauss_newton", "hessian"]
CURVATURES = ("gauss_newton", "hessian")


class NewtonCGState(NamedTuple):
  """State of `scale_by_newton_cg`.

  Attributes:
    previous: the last CG solution (flat), the next solve's warm start.
    cg_iterations: CG iterations of the last step.
    negative_curvature: steps whose CG met a direction of non-positive curvature.
  """

  previous: jax.Array
  cg_iterations: jax.Array
  negative_curvature: jax.Array


def snapshot_iterations(max_cg_iters: int) -> tuple[int, ...]:
  """The CG iterations whose iterates backtracking may return: `ceil(1.3^k)` (Martens 2010)."""
  out = {min(max_cg_iters, math.ceil(1.3**k)) for k in range(64)}
  return tuple(sorted(out))


class _CG(NamedTuple):
  i: jax.Array
  x: jax.Array
  r: jax.Array
  p: jax.Array
  rr: jax.Array
  negative: jax.Array
  snapshots: jax.Array


def _truncated_cg(matvec, b, x0, max_iters, tol):
  """CG on `A x = b` from `x0`, stopping at `||r|| <= tol ||b||` or at `p^T A p <= 0`.

  Written out rather than `jax.scipy.sparse.linalg.cg`, which exposes neither
  the iterates (backtracking picks among them) nor a curvature check (the
  Hessian is indefinite). At non-positive curvature the last step is taken
  with `|p^T A p|` and the loop stops. Returns the state with the snapshots
  of `snapshot_iterations(max_iters)`; a snapshot never reached repeats the last iterate.
  """
  stops = snapshot_iterations(max_iters)
  slot_of = np.full(max_iters + 1, -1, np.int32)
  slot_of[list(stops)] = np.arange(len(stops), dtype=np.int32)
  slot_of = jnp.asarray(slot_of)
  r0 = b - matvec(x0)
  threshold = (tol * jnp.linalg.norm(b)) ** 2

  def body(s: _CG) -> _CG:
    ap = matvec(s.p)
    pap = s.p @ ap
    negative = pap <= 0
    alpha = s.rr / jnp.where(negative, jnp.abs(pap) + jnp.finfo(pap.dtype).tiny, pap)
    x = s.x + alpha * s.p
    r = s.r - alpha * ap
    rr = r @ r
    p = r + (rr / jnp.maximum(s.rr, jnp.finfo(rr.dtype).tiny)) * s.p
    slot = slot_of[s.i + 1]
    snapshots = jnp.where(slot >= 0, s.snapshots.at[jnp.maximum(slot, 0)].set(x), s.snapshots)
    return _CG(s.i + 1, x, r, p, rr, negative, snapshots)

  def running(s: _CG) -> jax.Array:
    return (s.i < max_iters) & (s.rr > threshold) & ~s.negative

  init = _CG(
    jnp.zeros((), jnp.int32),
    x0,
    r0,
    r0,
    r0 @ r0,
    jnp.array(False),
    jnp.broadcast_to(x0, (len(stops), x0.size)),
  )
  out = jax.lax.while_loop(running, _xla_cpu.for_control_flow(body, init), init)
  # Snapshots past the exit repeat the final iterate.
  reached = jnp.asarray(stops) <= out.i
  snapshots = jnp.where(reached[:, None], out.snapshots, out.x)
  return out._replace(snapshots=snapshots)


def scale_by_newton_cg(
  damping: float | None = 1.0,
  *,
  curvature: Curvature = "gauss_newton",
  max_cg_iters: int = 50,
  cg_tol: float = 1e-4,
  warm_start: float = 0.95,
  backtracking: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Outputs `-x`, `x` a truncated CG solution of `(B + \lambda I) x = -g` (Hessian-free Newton).

  `B` is the Gauss-Newton matrix of `loss_fn(model_fn(.))` (extra arguments
  `model_fn`, `loss_fn`; positive semidefinite) or the Hessian of `value_fn`
  (extra argument `value_fn`; CG stops at the first direction of
  non-positive curvature, after a step with its absolute curvature). CG starts
  from `warm_start` times the previous solution and stops after
  `max_cg_iters` products or at a relative residual `cg_tol`. With
  `backtracking`, the iterates at CG iterations `ceil(1.3^k)` (the last of them
  the final iterate) are kept, and the one with the lowest loss at `params + x` on the current
  batch is returned (one forward pass each). `damping` None reads `lambda`
  from the extra argument `damping` (as `levenberg_marquardt` passes it).

  Args:
    damping: `lambda >= 0`, or None to read it from the extra argument.
    curvature: "gauss_newton" or "hessian".
    max_cg_iters: CG iterations (operator products) per step at most.
    cg_tol: CG stops at `||r|| <= cg_tol ||g||`.
    warm_start: the fraction of the previous solution CG starts from (0: cold).
    backtracking: choose among the stored CG iterates by the loss.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> a, b = jnp.array([[2.0, 0.0], [0.0, 4.0]]), jnp.array([2.0, 4.0])
    >>> loss = lambda w: 0.5 * w @ a @ w - b @ w
    >>> tx = curvopt.transforms.scale_by_newton_cg(0.0, curvature="hessian")
    >>> w = jnp.zeros(2)
    >>> u, _ = tx.update(a @ w - b, tx.init(w), w, value_fn=loss)
    >>> (w - u).round(4)  # one Newton step solves the quadratic
    Array([1., 1.], dtype=float32)

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010;
    Nocedal and Wright, "Numerical Optimization", ch. 7 (truncated Newton).
  """
  _checks.one_of("curvature", curvature, CURVATURES)
  if damping is not None:
    _checks.in_range("damping", damping, 0.0, float("inf"))
  _checks.positive_int("max_cg_iters", max_cg_iters)
  _checks.positive("cg_tol", cg_tol)
  _checks.in_range("warm_start", warm_start, 0.0, 1.0, high_inclusive=True)
  _checks.flag("backtracking", backtracking)
  name = "newton_cg"

  def init(params: PyTree) -> NewtonCGState:
    dtype = _tree.working_dtype(_tree.structure_of(params))
    d = _tree.size_of(_tree.structure_of(params))
    zero = jnp.zeros((), jnp.int32)
    return NewtonCGState(jnp.zeros(d, dtype), zero, zero)

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} needs params in update(updates, state, params, ...).")
    if curvature == "gauss_newton":
      model_fn, loss_fn = require_model_and_loss(
        name, extra_args.get("model_fn"), extra_args.get("loss_fn"), params
      )
      objective = lambda p: loss_fn(model_fn(p))
      operator = gauss_newton(model_fn, loss_fn, params)
    else:
      objective = require_value_fn(name, extra_args.get("value_fn"), params)
      operator = hessian(objective, params)
    lam = damping if damping is not None else extra_args.get("damping")
    if lam is None:
      raise TypeError(f"{name} with damping=None needs the extra argument damping.")
    dtype = state.previous.dtype
    g, unravel = ravel_pytree(_tree.cast(updates, dtype))
    flat_params = ravel_pytree(_tree.cast(params, dtype))[0]

    def matvec(v):
      product = ravel_pytree(_tree.cast(operator.mv(unravel(v)), dtype))[0]
      return product + jnp.asarray(lam, dtype) * v

    solved = _truncated_cg(matvec, -g, warm_start * state.previous, max_cg_iters, cg_tol)
    x = solved.x
    if backtracking:
      # The last snapshot (iteration `max_cg_iters`, or the exit) is the final iterate.
      candidates = solved.snapshots
      at = lambda c: objective(
        _tree.cast_like(unravel(flat_params + c), _tree.structure_of(params))
      )
      values = jax.lax.map(_xla_cpu.for_control_flow(at, x), candidates)
      values = jnp.where(jnp.isfinite(values), values, jnp.inf)
      x = candidates[jnp.argmin(values)]
    new_state = NewtonCGState(
      solved.x, solved.i, state.negative_curvature + solved.negative.astype(jnp.int32)
    )
    return _tree.cast_like(unravel(-x), _tree.structure_of(updates)), new_state

  return optax.GradientTransformationExtraArgs(init, update)
