"""PSGD with a low-rank-plus-diagonal preconditioner `Q = (I + U V^T) diag(d)` ("UVd")."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvopt import _checks
from curvopt.transforms.psgd._driver import (
  Family,
  Fit,
  FitSettings,
  PreconditionerFamily,
  scale_by_psgd,
)

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


class LowRankFactors(NamedTuple):
  """`Q = (I + U V^T) diag(d)` on the flattened parameters, with one step bound per part.

  Attributes:
    u: `(n, rank)`.
    v: `(n, rank)`.
    d: `(n,)`.
    lipschitz: `(3,)`, the running bounds `L_U, L_V, L_d`.
  """

  u: jax.Array
  v: jax.Array
  d: jax.Array
  lipschitz: jax.Array


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _apply_q(f: LowRankFactors, x: jax.Array) -> jax.Array:
  """`Q x = (I + U V^T)(d * x)`."""
  dx = f.d * x
  return dx + _mm(f.u, _mm(dx, f.v))


def _apply_p(f: LowRankFactors, x: jax.Array) -> jax.Array:
  """`P x = Q^T Q x = d * (I + V U^T)(I + U V^T)(d * x)`."""
  qx = _apply_q(f, x)
  return f.d * (qx + _mm(f.v, _mm(qx, f.u)))


def _solve_q_transposed(f: LowRankFactors, x: jax.Array) -> jax.Array:
  """`Q^-T x = (I + V U^T)^-1 (x / d)`, by Woodbury with the `rank x rank` matrix `I + U^T V`."""
  y = x / f.d
  small = jnp.eye(f.u.shape[1], dtype=x.dtype) + _mm(f.u.T, f.v)
  return y - _mm(f.v, jnp.linalg.solve(small, _mm(f.u.T, y)))


def _running_bound(previous: jax.Array, ell: jax.Array, beta_l: float) -> jax.Array:
  return jnp.maximum(beta_l * previous + (1 - beta_l) * ell, ell)


def _fit(f: LowRankFactors, v, h, step, beta_l, update_u: jax.Array) -> LowRankFactors:
  """One normalized step of `U` or `V` (a coin flip) and of `d`; the psgd_torch LRA rule."""
  a, b = _apply_q(f, h), _solve_q_transposed(f, v)
  # U V^T is unchanged by U / r, V * r; equal norms keep the bounds L_U, L_V meaningful.
  ratio = jnp.sqrt(
    jnp.linalg.norm(f.u) / jnp.maximum(jnp.linalg.norm(f.v), jnp.finfo(h.dtype).tiny)
  )
  ratio = jnp.where(ratio > 0, ratio, 1.0)
  u, w = f.u / ratio, f.v * ratio
  tiny = jnp.finfo(h.dtype).tiny
  lip_u, lip_w, lip_d = f.lipschitz[0], f.lipschitz[1], f.lipschitz[2]
  if u.shape[1] > 0:
    small = jnp.eye(u.shape[1], dtype=h.dtype) + _mm(w.T, u)  # I + V^T U
    a_w, b_w = _mm(a, w), _mm(b, w)
    ell_u = jnp.linalg.norm(a) * jnp.linalg.norm(_mm(w, a_w)) + jnp.linalg.norm(
      b
    ) * jnp.linalg.norm(_mm(w, b_w))
    new_lip_u = _running_bound(lip_u, ell_u, beta_l)
    new_u = u - step / jnp.maximum(new_lip_u, tiny) * (
      jnp.outer(a, _mm(a_w, small)) - jnp.outer(b, _mm(b_w, small))
    )
    a_u, b_u = _mm(a, u), _mm(b, u)
    ell_w = jnp.linalg.norm(a) * jnp.linalg.norm(_mm(u, a_u)) + jnp.linalg.norm(
      b
    ) * jnp.linalg.norm(_mm(u, b_u))
    new_lip_w = _running_bound(lip_w, ell_w, beta_l)
    new_w = w - step / jnp.maximum(new_lip_w, tiny) * (
      jnp.outer(a + _mm(w, a_u), a_u) - jnp.outer(b + _mm(w, b_u), b_u)
    )
    u = jnp.where(update_u, new_u, u)
    w = jnp.where(update_u, w, new_w)
    lip_u = jnp.where(update_u, new_lip_u, lip_u)
    lip_w = jnp.where(update_u, lip_w, new_lip_w)
  aa, bb = a * a, b * b
  lip_d = _running_bound(lip_d, jnp.max(aa + bb), beta_l)
  # Q <- (I - mu diag(a^2 - b^2) / L_d) Q, written on the factors.
  s = 1 - step / jnp.maximum(lip_d, tiny) * (aa - bb)
  return LowRankFactors(u * s[:, None], w / s[:, None], f.d * s, jnp.stack([lip_u, lip_w, lip_d]))


def lra_family(tree: PyTree, settings: FitSettings, *, rank: int) -> PreconditionerFamily:
  """Low-rank-plus-diagonal PSGD on the flattened leaves of `tree`."""
  n = sum(x.size for x in jax.tree.leaves(tree))
  rank = min(rank, n - 1)  # a rank-n correction would not be low rank

  def view(t):
    return [ravel_pytree(t)[0]]

  def unview(x, like):
    return ravel_pytree(like)[1](x[0])

  def init(x, key):
    (vector,) = x
    # Derived here, not by the caller: the other families need no key, and an
    # init without random draws is cheap enough for skip_nonfinite to rebuild.
    ku, kv = jax.random.split(jax.random.fold_in(key, 1))
    u = jax.random.normal(ku, (n, rank), vector.dtype)
    w = jax.random.normal(kv, (n, rank), vector.dtype)
    tiny = jnp.finfo(vector.dtype).tiny
    u = u / jnp.maximum(jnp.linalg.norm(u), tiny)
    w = w / jnp.maximum(jnp.linalg.norm(w), tiny)
    return LowRankFactors(u, w, jnp.ones(n, vector.dtype), jnp.zeros(3, vector.dtype))

  def rescale(f, scales):
    (s,) = scales
    return f._replace(d=f.d * s)

  def fit(f, v, h, step, coin):
    return _fit(f, v[0], h[0], step, settings.beta_l, update_u=coin < 0.5)

  def apply(f, g):
    return [_apply_p(f, g[0])]

  return Family(view, unview, init, rescale, fit, apply)


def scale_by_psgd_lra(
  fit: Fit = "whitening",
  lr_preconditioner: optax.ScalarOrSchedule = 0.1,
  update_probability: optax.ScalarOrSchedule | None = None,
  init_scale: float | None = None,
  *,
  rank: int = 10,
  beta_l: float = 0.9,
  damping: float = 1e-9,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with `Q = (I + U V^T) diag(d)` on all `n` parameters: outputs `P g`, `P = Q^T Q`.

  `O(n rank)` memory and time: a full-matrix preconditioner's low-rank
  corrections to a diagonal one. Each fit (probability `update_probability`),
  with `a = Q h`, `b = Q^{-T} v` (a `rank x rank` solve), takes one
  normalized Lie-group step `dQ = E Q` on `U` or on `V` (a fair coin) and
  one on `d`:

  $$
  U \leftarrow U - \frac{\mu}{L_U}\left(a a^\top - b b^\top\right) V (I + V^\top U), \qquad
  d \leftarrow \left(1 - \tfrac{\mu}{L_d}(a^2 - b^2)\right) d,
  $$

  with `L` the running bounds of `scale_by_psgd_kron` and `U`, `V`
  rebalanced to equal norms first. `rank = 0` is a diagonal preconditioner.
  `U` and `V` start as Gaussian matrices of unit Frobenius norm, drawn from `seed`.

  Args:
    fit: "whitening" or "newton" (needs the extra argument `value_fn`); see `scale_by_psgd_kron`.
    lr_preconditioner: `mu`; a float or a schedule.
    update_probability: a float or a schedule; None: `psgd_update_probability()`.
    init_scale: `d = init_scale` at the start; None derives it from the first probe pair.
    rank: the rank of `U V^T` (at most `n - 1`: a model with fewer than
      `rank + 1` parameters gets `n - 1`).
    beta_l: decay of the running bounds.
    damping: see `scale_by_psgd_kron`.
    seed: the PRNG seed.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_psgd_lra(rank=2)
    >>> g = {"w": jnp.ones(5), "b": jnp.ones(())}
    >>> u, state = tx.update(g, tx.init(g))
    >>> state.preconditioner.u.shape
    (6, 2)

  References:
    Li, "Preconditioner on Matrix Lie Group for SGD", ICLR 2019 (the UVd
    form); Pooladzandi & Li, "Curvature-Informed SGD via General Purpose
    Lie-Group Preconditioners", 2024; psgd_torch's `LRAWhiten`/`LRANewton`.
  """
  _checks.static("rank", rank, "a Python integer")
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
    raise TypeError(f"rank must be a non-negative integer, got {rank!r} ({type(rank).__name__}).")
  if rank < 0:
    raise ValueError(f"rank must be a non-negative integer, got {rank}.")
  rank = int(rank)  # np.int64(3) is an integer like 3
  return scale_by_psgd(
    lambda tree, settings: lra_family(tree, settings, rank=rank),
    fit=fit,
    lr_preconditioner=lr_preconditioner,
    update_probability=update_probability,
    init_scale=init_scale,
    beta_l=beta_l,
    damping=damping,
    seed=seed,
    name="psgd_lra",
  )
