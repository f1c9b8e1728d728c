"""SOAP's scaling: Adam in the eigenbasis of Shampoo's factors."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.transforms._cadence import refresh_if_due
from curvopt.transforms.kronecker._blocks import (
  MatrixAxes,
  from_blocks,
  layout_factory,
  stacked_identities,
  to_blocks,
)
from curvopt.transforms.kronecker._factors import factor_statistics, map_factors, mode_product

PyTree = Any
EigenbasisMethod = Literal["eigh", "power_qr"]
EIGENBASIS_METHODS = ("eigh", "power_qr")
Factors = tuple[tuple[jax.Array, ...], ...]


class ScaleBySoapState(NamedTuple):
  """State of `scale_by_soap`; float32 whatever the parameter dtype.

  Attributes:
    count: steps taken (int32).
    mu: EMA of gradients, in the parameters' own coordinates.
    nu: EMA of squared gradients in the eigenbasis (shaped like the
      parameters: each block's rotated entries sit where the block does).
    statistics: per block shape, per block axis, the EMA factors `(n, d, d)`.
    eigenbases: their eigenvectors for the next step, refreshed after every
      `precondition_frequency`-th step (identity before the first refresh).
  """

  count: jax.Array
  mu: PyTree
  nu: PyTree
  statistics: Factors
  eigenbases: Factors


def scale_by_soap(
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  shampoo_beta: float | None = None,
  *,
  precondition_frequency: int = 10,
  start_preconditioning_step: int = 0,
  block_size: int = 1024,
  merge_dims: bool = True,
  precondition_1d: bool = False,
  matrix_axes: MatrixAxes | None = None,
  one_sided: bool = True,
  block_sharding: jax.sharding.NamedSharding | None = None,
  eigenbasis_method: EigenbasisMethod = "eigh",
) -> optax.GradientTransformation:
  """Adam on each block rotated into the eigenbasis of its Kronecker factors.

  See `curvopt.soap` for the algorithm and the arguments.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_soap(one_sided=False)
    >>> g = jnp.array([[1.0, 2.0, 2.0], [2.0, 4.0, 4.0]])  # rank one: u v^T
    >>> state = tx.init(g)
    >>> first, state = tx.update(g, state)  # the identity basis: Adam's sign step
    >>> second, state = tx.update(g, state)  # the basis of the factors of g
    >>> (second / second[0, 0]).round(3)  # along g itself, not along its signs
    Array([[1., 2., 2.],
           [2., 4., 4.]], dtype=float32)

  References:
    Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade,
    "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025.
  """
  precondition_frequency = _checks.positive_int("precondition_frequency", precondition_frequency)
  _checks.one_of("eigenbasis_method", eigenbasis_method, EIGENBASIS_METHODS)
  if isinstance(start_preconditioning_step, bool) or not isinstance(
    start_preconditioning_step, int
  ):
    raise TypeError(
      f"start_preconditioning_step must be an integer, got {start_preconditioning_step!r}."
    )
  beta = b2 if shampoo_beta is None else shampoo_beta

  layout_of = layout_factory(
    block_size=block_size,
    merge_dims=merge_dims,
    precondition_1d=precondition_1d,
    matrix_axes=matrix_axes,
    one_sided=one_sided,
  )

  def init(params: PyTree) -> ScaleBySoapState:
    layout, dtype = layout_of(params), _tree.working_dtype(params)
    zeros = _tree.zeros(params, dtype)
    statistics = stacked_identities(layout, params, dtype, 0.0)
    eigenbases = stacked_identities(layout, params, dtype)
    return ScaleBySoapState(jnp.zeros((), jnp.int32), zeros, zeros, statistics, eigenbases)

  def update(updates, state, params=None):
    del params
    layout = layout_of(updates)
    grads = _tree.cast_like(updates, state.mu)
    blocks = to_blocks(layout, grads)
    statistics = tuple(
      tuple(beta * s + (1 - beta) * f for s, f in zip(old, factor_statistics(b, axes), strict=True))
      for old, b, axes in zip(state.statistics, blocks, layout.factor_axes, strict=True)
    )

    eigenbases = state.eigenbases
    count = optax.safe_increment(state.count)
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    rotate = lambda tree: [
      mode_product(x, q, axes, transpose=True)
      for x, q, axes in zip(to_blocks(layout, tree), eigenbases, layout.factor_axes, strict=True)
    ]
    # Second moments: rotated for the blocks, plain for the leaves without blocks.
    squares = from_blocks(
      layout, [r * r for r in rotate(grads)], jax.tree.map(jnp.square, grads), state.nu
    )
    nu = optax.tree.update_moment(squares, state.nu, b2, 1)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    adam = lambda m, v: m / (jnp.sqrt(v) + eps)
    rotated_steps = [
      mode_product(adam(m, v), q, axes)
      for m, v, q, axes in zip(
        rotate(mu_hat), to_blocks(layout, nu_hat), eigenbases, layout.factor_axes, strict=True
      )
    ]
    plain_steps = jax.tree.map(adam, mu_hat, nu_hat)
    out = from_blocks(layout, rotated_steps, plain_steps, updates)

    # The basis for the next step: never rotate a gradient by a basis fitted to it (the
    # reference's rule), where round-off entries of a concentrated rotation meet Adam's
    # normalization and become +-1.
    # The second moments live in the basis they were measured in: carried into the new
    # one with the basis change, else a coordinate whose old entry was ~0 (a sparse
    # gradient's) would divide the rotated momentum by eps.
    def refresh():
      if eigenbasis_method == "power_qr":  # eigh the first time, then one power step + QR
        first = state.count < start_preconditioning_step + precondition_frequency
        bases = jax.lax.cond(
          first,
          lambda: _eigenbases(statistics, eigenbases, block_sharding),
          lambda: _power_qr_bases(statistics, eigenbases, block_sharding),
        )
      else:
        bases = _eigenbases(statistics, eigenbases, block_sharding)
      return bases, _carry_second_moments(layout, nu, eigenbases, bases)

    refreshed = refresh_if_due(
      state.count, precondition_frequency, refresh, lambda: (eigenbases, nu)
    )
    started = state.count >= start_preconditioning_step
    eigenbases, nu = jax.tree.map(
      lambda new, old: jnp.where(started, new, old), refreshed, (eigenbases, nu)
    )
    return out, ScaleBySoapState(count, mu, nu, statistics, eigenbases)

  return optax.GradientTransformation(init, update)


def _carry_second_moments(layout, nu: PyTree, old: Factors, new: Factors) -> PyTree:
  """`nu`, the diagonal second moments in the `old` bases, as diagonals in the `new` ones.

  With `R = Q_new^T Q_old` per factor, a diagonal `diag(v)` in the old basis is
  `R diag(v) R^T` in the new, whose diagonal is `(R * R) v` along each factor axis.
  """

  def squared_overlaps(new_group, old_group):
    return [
      jnp.square(jnp.einsum("Nki,Nkj->Nij", q_new, q_old, precision=jax.lax.Precision.HIGHEST))
      for q_new, q_old in zip(new_group, old_group, strict=True)
    ]

  carried = [
    mode_product(v, squared_overlaps(new_group, old_group), axes)
    for v, new_group, old_group, axes in zip(
      to_blocks(layout, nu), new, old, layout.factor_axes, strict=True
    )
  ]
  return from_blocks(layout, carried, nu, nu)


def _finite_or_previous(fresh: Factors, previous: Factors) -> Factors:
  """Each fresh basis where all its entries are finite, else the previous one."""
  return tuple(
    tuple(
      jnp.where(jnp.all(jnp.isfinite(v), axis=(1, 2), keepdims=True), v, old)
      for v, old in zip(new_group, old_group, strict=True)
    )
    for new_group, old_group in zip(fresh, previous, strict=True)
  )


def _power_qr_bases(statistics: Factors, previous: Factors, sharding=None) -> Factors:
  """One power-iteration step and a QR per factor: `Q <- qr(S Q)` (Vyas et al.'s refresh).

  `Q`'s columns are first ordered by the estimated eigenvalues `diag(Q^T S Q)`,
  largest first, as the reference does; matrix products and a QR, which
  accelerators run faster than `eigh`. Non-finite results keep the old basis.
  """

  def step(_, stacked):  # (n, 2, d, d): the statistics and the previous bases
    s, q = stacked[:, 0], stacked[:, 1]
    with jax.default_matmul_precision("highest"):
      estimates = jnp.einsum("nki,nkl,nli->ni", q, s, q)
      order = jnp.argsort(-estimates, axis=-1)
      q = jnp.take_along_axis(q, order[:, None, :], axis=2)
      basis, _ = jnp.linalg.qr(s @ q)
    return basis

  paired = tuple(
    tuple(jnp.stack([s, q], axis=1) for s, q in zip(s_group, q_group, strict=True))
    for s_group, q_group in zip(statistics, previous, strict=True)
  )
  fresh = map_factors(step, paired, sharding=sharding)
  return _finite_or_previous(fresh, previous)


def _eigenbases(statistics: Factors, previous: Factors, sharding=None) -> Factors:
  """Eigenvectors of every factor, one batched `eigh` per factor size; non-finite ones are kept."""

  def eigenvectors(_, stacked):
    with jax.default_matmul_precision("highest"):
      _, vectors = jnp.linalg.eigh((stacked + jnp.swapaxes(stacked, -1, -2)) / 2)
    return vectors[..., ::-1]  # largest eigenvalue first, as the reference orders its basis

  fresh = map_factors(eigenvectors, statistics, sharding=sharding)
  return _finite_or_previous(fresh, previous)
