"""PSGD with Kronecker-factored preconditioners `Q = Q_1 (x) ... (x) Q_k`, and the dense one."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

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
from curvopt.transforms.psgd._grouping import group_indices, map_grouped

PyTree = Any
Geometry = Literal["Q0.5EQ1.5", "QE", "EQ"]
GEOMETRIES = ("Q0.5EQ1.5", "QE", "EQ")
_HIGHEST = jax.lax.Precision.HIGHEST


class KronFactors(NamedTuple):
  """Per leaf, one factor per axis: a `(d, d)` matrix or, for a diagonal factor, a `(d,)` vector.

  Attributes:
    q: the factors of `Q`.
    p: the factors of `P = Q^T Q` (`Q_i^T Q_i`), cached so a step costs one
      product per axis.
    lipschitz: per leaf, the `(k,)` running bounds `L_i` that normalize each
      factor's step.
  """

  q: tuple
  p: tuple
  lipschitz: tuple


def dense_axes(shape: tuple[int, ...], max_size: int | None, max_skew: float) -> tuple[bool, ...]:
  """Which axes get a dense factor: `1 < d <= max_size` and `d^2 <= max_skew * numel`.

  The others get a diagonal factor (psgd_torch's rule): with `max_skew = 1` a
  matrix's longer side is diagonal and a vector's only side too.

  Examples:
    >>> from curvopt.transforms.psgd._kron import dense_axes
    >>> dense_axes((64, 32), None, 1.0), dense_axes((5,), None, 1.0)
    ((False, True), (False,))
  """
  numel = math.prod(shape)
  return tuple(
    d > 1 and (max_size is None or d <= max_size) and d * d <= max_skew * numel for d in shape
  )


def norm_lower_bound(a: jax.Array) -> jax.Array:
  """A cheap lower bound of the spectral norm of a symmetric matrix (tight within sqrt(d)).

  One power step from the row of largest norm, after scaling by `max |a|` so
  no square overflows (psgd_torch's `norm_lower_bound_herm`).
  """
  peak = jnp.max(jnp.abs(a))
  scaled = a / jnp.where(peak > 0, peak, 1.0)
  row = scaled[jnp.argmax(jnp.sum(scaled * scaled, axis=1))]
  x = jnp.matmul(scaled, row, precision=_HIGHEST)
  x = x / jnp.maximum(jnp.linalg.norm(x), jnp.finfo(a.dtype).tiny)
  return peak * jnp.linalg.norm(jnp.matmul(scaled, x, precision=_HIGHEST))


def _mode_product(x: jax.Array, m: jax.Array, axis: int) -> jax.Array:
  """`m` applied along `axis` of `x`; a vector `m` is a diagonal matrix."""
  if m.ndim == 1:
    return x * m.reshape(m.shape + (1,) * (x.ndim - axis - 1))
  if axis == x.ndim - 1:  # no transposes for the common last axis
    return jnp.matmul(x, m.T, precision=_HIGHEST)
  return jnp.moveaxis(jnp.tensordot(m, x, axes=(1, axis), precision=_HIGHEST), 0, axis)


def _solve_transposed_mode(x: jax.Array, q: jax.Array, axis: int) -> jax.Array:
  """`Q^-T` applied along `axis` of `x`, for an upper-triangular (or diagonal) `Q`."""
  if q.ndim == 1:
    return x / q.reshape(q.shape + (1,) * (x.ndim - axis - 1))
  moved = jnp.moveaxis(x, axis, 0)
  solved = jax.scipy.linalg.solve_triangular(
    q, moved.reshape(moved.shape[0], -1), trans="T", lower=False
  )
  return jnp.moveaxis(solved.reshape(moved.shape), 0, axis)


def _contract(a: jax.Array, b: jax.Array, axis: int, dense: bool) -> jax.Array:
  """`A_(i) B_(i)^T`: contracted over every axis but `axis` (only its diagonal if not dense)."""
  others = tuple(i for i in range(a.ndim) if i != axis)
  if dense:
    return jnp.tensordot(a, b, axes=(others, others), precision=_HIGHEST)
  return jnp.sum(a * b, axis=others)


def _procrustes_step(q: jax.Array) -> jax.Array:
  """One rotation of `Q` towards a symmetric positive definite matrix, `P = Q^T Q` unchanged.

  `Q <- Q + s (R Q + s R^2 Q / 2)` with `R = Q^T - Q` (skew) scaled to unit
  norm, a second-order `exp(s R) Q`; `s` maximizes `tr(Q)` along it, at most
  1/8 (psgd_torch's Q0.5EQ1.5 geometry).
  """
  r = q.T - q
  # Scaled by max |r| before squaring, so a round-off-sized r neither underflows nor blows up.
  peak = jnp.max(jnp.abs(r))
  r = r / jnp.where(peak > 0, peak, 1.0)
  size = jnp.sqrt(norm_lower_bound(jnp.matmul(r.T, r, precision=_HIGHEST)))
  r = r / jnp.where(size > 0, size, 1.0)
  rq = jnp.matmul(r, q, precision=_HIGHEST)
  rrq = jnp.matmul(r, rq, precision=_HIGHEST)
  slope, curvature = jnp.trace(rq), jnp.trace(rrq)
  safe = jnp.where(curvature < 0, curvature, -1.0)
  s = jnp.where(curvature < 0, jnp.minimum(0.125, -slope / safe), 0.125)
  return q + s * (rq + 0.5 * s * rrq)


def _balance(qs: list[jax.Array]) -> list[jax.Array]:
  """Rescales the factors to equal largest entries; their product is unchanged."""
  if len(qs) < 2:
    return qs
  peaks = jnp.stack([jnp.max(jnp.abs(q)) for q in qs])
  target = jnp.exp(jnp.mean(jnp.log(peaks)))
  return [q * (target / peak) for q, peak in zip(qs, peaks, strict=True)]


def _squared(q: jax.Array) -> jax.Array:
  return q * q if q.ndim == 1 else jnp.matmul(q.T, q, precision=_HIGHEST)


def _probe_statistics(q, p, v, h, whitening, geometry, dense):
  """Per axis `i` of one leaf: `T_1` and `T_2`, the contractions over every other axis.

  For whitening outside EQ, `v` is integrated out: `E[contract(v, v)] =
  (numel / d_i) I` for `v ~ N(0, I)`, and `T_2` is that scalar `numel / d_i`.
  """
  if geometry == "EQ":
    a, b = h, v
    for i, qi in enumerate(q):
      a = _mode_product(a, qi, i)
      b = _solve_transposed_mode(b, qi, i)
  else:
    a, b = h, v
    for i, pi in enumerate(p):
      a = _mode_product(a, pi, i)
  t1 = tuple(_contract(a, a, i, di) for i, di in enumerate(dense))
  if whitening and geometry != "EQ":
    t2 = tuple(jnp.asarray(h.size / d, h.dtype) for d in h.shape)
  else:
    t2 = tuple(_contract(b, b, i, di) for i, di in enumerate(dense))
  return t1, t2


def _factor_step(qi, lipschitz, t1, t2, step, beta_l, integrated, geometry, dense):
  """One normalized Lie-group step of one factor: `(Q_i, L_i)` after it."""
  if integrated:  # t2 is the scalar standing for (numel / d_i) I
    ell = (norm_lower_bound(t1) if dense else jnp.max(t1)) + t2
    if dense:
      t2 = t2 * jnp.eye(t1.shape[0], dtype=t1.dtype)
  else:
    ell = norm_lower_bound(t1 + t2) if dense else jnp.max(t1 + t2)
  bound = jnp.maximum(beta_l * lipschitz + (1 - beta_l) * ell, ell)
  mu = step / jnp.maximum(bound, jnp.finfo(t1.dtype).tiny)
  e = t1 - t2
  if not dense:
    return qi - mu * e * qi, bound
  if geometry == "QE":
    return qi - mu * jnp.matmul(qi, e, precision=_HIGHEST), bound
  if geometry == "EQ":
    return qi - mu * jnp.matmul(jnp.triu(e), qi, precision=_HIGHEST), bound
  return _procrustes_step(qi - mu * jnp.matmul(e, qi, precision=_HIGHEST)), bound


def _balanced(q: tuple) -> tuple[tuple, tuple]:
  """One leaf's factors balanced, and the factors of `P` they give."""
  q = _balance(list(q))
  return tuple(q), tuple(_squared(qi) for qi in q)


def kron_family(
  tree: PyTree,
  settings: FitSettings,
  *,
  geometry: Geometry,
  max_size: int | None = None,
  max_skew: float = 1.0,
  flatten: bool = False,
) -> PreconditionerFamily:
  """Kronecker-factored PSGD on the leaves of `tree` (`flatten`: one dense `Q` on the vector).

  `max_size` and `max_skew` choose the dense axes (`dense_axes`) of unflattened leaves.
  """
  leaves = jax.tree.leaves(tree)
  if flatten:
    shapes = [(sum(math.prod(x.shape) for x in leaves),)]
    layout = [(True,)]
  else:
    shapes = [tuple(x.shape) or (1,) for x in leaves]
    layout = [dense_axes(s, max_size, max_skew) for s in shapes]
  groups = group_indices(list(zip(shapes, layout, strict=True)))
  # Every factor as (leaf, axis), grouped by its shape and kind across leaves.
  factors = [(leaf, axis) for leaf, dense in enumerate(layout) for axis in range(len(dense))]
  factor_groups = group_indices(
    [(shapes[leaf][axis], layout[leaf][axis]) for leaf, axis in factors]
  )

  def view(t):
    if flatten:
      return [ravel_pytree(t)[0]]
    return [x.reshape(s) for x, s in zip(jax.tree.leaves(t), shapes, strict=True)]

  def unview(x, like):
    if flatten:
      return ravel_pytree(like)[1](x[0])
    out = [y.reshape(z.shape) for y, z in zip(x, jax.tree.leaves(like), strict=True)]
    return jax.tree.unflatten(jax.tree.structure(like), out)

  def init(x, key):
    del key
    q = tuple(
      tuple(
        jnp.eye(d, dtype=t.dtype) if di else jnp.ones(d, t.dtype)
        for d, di in zip(t.shape, dense, strict=True)
      )
      for t, dense in zip(x, layout, strict=True)
    )
    lipschitz = tuple(jnp.zeros(t.ndim, t.dtype) for t in x)
    return KronFactors(q, q, lipschitz)

  def rescale(state, scales):
    q = tuple(
      tuple(qi * s ** (1 / len(qs)) for qi in qs) for qs, s in zip(state.q, scales, strict=True)
    )
    p = tuple(
      tuple(pi * s ** (2 / len(ps)) for pi in ps) for ps, s in zip(state.p, scales, strict=True)
    )
    return KronFactors(q, p, state.lipschitz)

  def fit(state, v, h, step, coin):
    del coin  # every factor takes its step
    whitening = settings.whitening
    integrated = whitening and geometry != "EQ"

    def statistics_for(i):
      return lambda q, p, vi, hi: _probe_statistics(q, p, vi, hi, whitening, geometry, layout[i])

    stats = map_grouped(statistics_for, groups, list(state.q), list(state.p), list(v), list(h))

    # The factor steps run per factor shape, across leaves: the step's program
    # (about 50 XLA kernels for a dense factor) is compiled once per shape.
    def step_for(f):
      leaf, axis = factors[f]
      dense = layout[leaf][axis]
      return lambda qi, li, t1, t2: _factor_step(
        qi, li, t1, t2, step, settings.beta_l, integrated, geometry, dense
      )

    columns = [
      [state.q[leaf][axis] for leaf, axis in factors],
      [state.lipschitz[leaf][axis] for leaf, axis in factors],
      [stats[leaf][0][axis] for leaf, axis in factors],
      [stats[leaf][1][axis] for leaf, axis in factors],
    ]
    stepped = iter(map_grouped(step_for, factor_groups, *columns))
    new_q, bounds = [], []
    for dense in layout:
      leaf = [next(stepped) for _ in dense]
      new_q.append(tuple(qi for qi, _ in leaf))
      bounds.append(jnp.stack([bound for _, bound in leaf]))
    q, p = zip(*map_grouped(lambda i: _balanced, groups, new_q), strict=True)
    return KronFactors(tuple(q), tuple(p), tuple(bounds))

  def apply(state, g):
    def apply_leaf(ps, x):
      for i, pi in enumerate(ps):
        x = _mode_product(x, pi, i)
      return x

    return map_grouped(lambda i: apply_leaf, groups, list(state.p), list(g))

  return Family(view, unview, init, rescale, fit, apply)


def scale_by_psgd_kron(
  fit: Fit = "whitening",
  lr_preconditioner: optax.ScalarOrSchedule = 0.1,
  update_probability: optax.ScalarOrSchedule | None = None,
  init_scale: float | None = None,
  *,
  beta_l: float = 0.9,
  damping: float = 1e-9,
  max_size: int | None = None,
  max_skew: float = 1.0,
  geometry: Geometry = "Q0.5EQ1.5",
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""PSGD's Kronecker-factored preconditioner: outputs `P g`, `P = Q^T Q` fitted on a Lie group.

  Each leaf (a tensor of shape `(d_1, ..., d_k)`; a scalar is `(1,)`) has
  `Q = Q_1 (x) ... (x) Q_k`, each `Q_i` a `d_i x d_i` matrix or, where
  `d_i > max_size` or `d_i^2 > max_skew * numel`, a diagonal. With probability
  `update_probability` per step (always the first), every factor takes one
  step on the fitting criterion `E[h^T P h + v^T P^{-1} v]`: with `A = P h`
  (Q0.5EQ1.5, QE) or `A = Q h`, `B = Q^{-T} v` (EQ), `T_1`, `T_2` the
  contractions of `A A` and `V V` (`B B` for EQ) over all axes but `i`,

  $$
  L_i \leftarrow \max(\beta_L L_i + (1 - \beta_L)\,\ell, \ell), \quad
  \ell = \lVert T_1 + T_2 \rVert_2, \qquad
  Q_i \leftarrow Q_i - \frac{\mu}{L_i} (T_1 - T_2)\, Q_i
  $$

  (`Q_i (T_1 - T_2)` for QE, `triu(T_1 - T_2) Q_i` for EQ), followed for
  Q0.5EQ1.5 by one Procrustes rotation keeping `Q_i` near symmetric
  positive definite. The normalization keeps `I - mu E / L` invertible, so `Q`
  stays in its group without an inverse of `P` ever being formed. After the
  step, factors are balanced to equal largest entries (the product is
  unchanged) and `P_i = Q_i^T Q_i` is cached. For whitening, `v` is
  integrated out (`E[T_2] = numel / d_i I`) except in EQ.

  Args:
    fit: "whitening" (`h = g`; `P -> E[g g^T]^{-1/2}`, no extra argument) or
      "newton" (`h = H v`, `v ~ N(0, I)`, from the extra argument `value_fn`;
      `P -> |H|^{-1}`).
    lr_preconditioner: `mu`, in (0, 1]; a float or a schedule of the step.
    update_probability: per-step probability of fitting `Q`; a float or a
      schedule. None: `psgd_update_probability()` (1 for 500 steps, then
      decaying to 0.03).
    init_scale: `Q = init_scale I` at the start; None derives it from the first
      probe pair (see `initial_scales`; 1 for a zero gradient).
    beta_l: decay of the running bound `L_i`; 0 gives the paper's per-step
      normalizer `mu / ||T_1 + T_2||` (psgd_jax).
    damping: `h + (damping rms(h) + eps |h|) xi`, `xi ~ N(0, I)`, with `rms(h)` over all
      leaves (1 if `h` is zero); bounds `P <= I / (damping rms(h))`.
    max_size: largest dense factor; None for no limit.
    max_skew: dense only if `d_i^2 <= max_skew * numel`; `float("inf")` for all dense.
    geometry: "Q0.5EQ1.5" (psgd_torch 2026, default), "QE" (psgd_torch 2025)
      or "EQ" (upper-triangular `Q`, the paper and psgd_jax).
    seed: the PRNG seed of the probes and coin flips (the key lives in the state).

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_psgd_kron(init_scale=1.0)
    >>> g = jnp.ones((2, 3))
    >>> u, state = tx.update(g, tx.init(g))
    >>> u.shape, int(state.fits)
    ((2, 3), 1)

  References:
    Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018;
    Li, "Preconditioner on Matrix Lie Group for SGD", ICLR 2019; Pooladzandi &
    Li, "Curvature-Informed SGD via General Purpose Lie-Group
    Preconditioners", 2024; psgd_torch (github.com/lixilinx/psgd_torch).
  """
  _checks.one_of("geometry", geometry, GEOMETRIES)
  if max_size is not None:
    _checks.positive_int("max_size", max_size)
  _checks.static("max_skew", max_skew)
  _checks.in_range("max_skew", max_skew, 0.0, float("inf"), high_inclusive=True)
  return scale_by_psgd(
    lambda tree, settings: kron_family(
      tree, settings, geometry=geometry, max_size=max_size, max_skew=max_skew
    ),
    fit=fit,
    lr_preconditioner=lr_preconditioner,
    update_probability=update_probability,
    init_scale=init_scale,
    beta_l=beta_l,
    damping=damping,
    seed=seed,
    name="psgd_kron",
  )
