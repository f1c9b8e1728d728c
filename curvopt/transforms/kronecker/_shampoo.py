"""Shampoo's scaling: Kronecker-factored preconditioning of blocks, with grafting."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt._matrix_roots import ROOT_METHODS, RootMethod, matrix_inverse_root
from curvopt.transforms._cadence import refresh_if_due
from curvopt.transforms.kronecker._blocks import (
  BlockLayout,
  MatrixAxes,
  from_blocks,
  layout_factory,
  stacked_identities,
  to_blocks,
)
from curvopt.transforms.kronecker._factors import (
  factor_statistics,
  map_factors,
  mode_product,
  pack_symmetric,
  packed_shape,
  unpack_symmetric,
)
from curvopt.transforms.kronecker._grafting import Grafting, grafting_transform

PyTree = Any
Factors = tuple[tuple[jax.Array, ...], ...]  # per block shape, per block axis: (n, d, d)


class ScaleByShampooState(NamedTuple):
  """State of `scale_by_shampoo`; float32 whatever the parameter dtype.

  Attributes:
    count: steps taken (int32).
    statistics: per block shape (sorted), per block axis, the stacked factor
      statistics `(n, d, d)` of the `n` blocks of that shape; with
      `packed_statistics`, their upper triangles by rows, `(n, d (d + 1) / 2)`.
    roots: their inverse roots, same structure, refreshed every
      `precondition_frequency` steps.
    failures: root computations rejected so far (non-finite or inaccurate:
      the previous root was kept), counted per block factor.
    graft: the grafting transform's state.
  """

  count: jax.Array
  statistics: Factors
  roots: Factors
  failures: jax.Array
  graft: optax.OptState


def scale_by_shampoo(
  block_size: int = 1024,
  beta2: float = 1.0,
  epsilon: float = 1e-6,
  *,
  precondition_frequency: int = 10,
  start_preconditioning_step: int | None = None,
  relative_epsilon: bool = True,
  root_method: RootMethod = "eigh",
  exponent_override: int | None = None,
  rank_rtol: float | None = None,
  failure_threshold: float = 0.1,
  grafting: Grafting | optax.GradientTransformation | None = "adam",
  grafting_b2: float = 0.999,
  grafting_eps: float = 1e-8,
  merge_dims: bool = True,
  precondition_1d: bool = False,
  matrix_axes: MatrixAxes | None = None,
  one_sided: bool = True,
  block_sharding: jax.sharding.NamedSharding | None = None,
  packed_statistics: bool = False,
) -> optax.GradientTransformation:
  """Preconditions each block by its Kronecker factors' inverse roots, grafted.

  See `curvopt.shampoo` for the algorithm and the arguments.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_shampoo(
    ...   precondition_frequency=1, start_preconditioning_step=0, grafting=None
    ... )
    >>> g = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates.round(3)  # (G G^T)^(-1/4) G (G^T G)^(-1/4): the polar factor of G
    Array([[1., 0.],
           [0., 1.]], dtype=float32)

  References:
    Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor
    Optimization", ICML 2018; Anil et al., "Scalable Second Order
    Optimization for Deep Learning", 2020; Shi et al., "A Distributed
    Data-Parallel PyTorch Implementation of the Distributed Shampoo
    Optimizer", 2023.
  """
  precondition_frequency = _checks.positive_int("precondition_frequency", precondition_frequency)
  start = (
    precondition_frequency if start_preconditioning_step is None else start_preconditioning_step
  )
  if isinstance(start, bool) or not isinstance(start, int) or start < 0:
    raise ValueError(f"start_preconditioning_step must be an integer >= 0, got {start!r}.")
  _checks.one_of("root_method", root_method, ROOT_METHODS)
  _checks.flag("relative_epsilon", relative_epsilon)
  _checks.flag("packed_statistics", packed_statistics)
  if exponent_override is not None:
    _checks.positive_int("exponent_override", exponent_override)
  _checks.in_range("beta2", beta2, 0.0, 1.0, high_inclusive=True)
  _checks.in_range("epsilon", epsilon, 0.0, float("inf"))
  _checks.in_range("failure_threshold", failure_threshold, 0.0, float("inf"))
  _checks.in_range("grafting_b2", grafting_b2, 0.0, 1.0)
  _checks.in_range("grafting_eps", grafting_eps, 0.0, float("inf"))
  if rank_rtol is not None:
    _checks.in_range("rank_rtol", rank_rtol, 0.0, 1.0)
  graft = grafting_transform(grafting, grafting_b2, grafting_eps)

  layout_of = layout_factory(
    block_size=block_size,
    merge_dims=merge_dims,
    precondition_1d=precondition_1d,
    matrix_axes=matrix_axes,
    one_sided=one_sided,
  )

  def init(params: PyTree) -> ScaleByShampooState:
    layout, dtype = layout_of(params), _tree.working_dtype(_tree.structure_of(params))
    if packed_statistics:  # packed zeros from the full factors' shapes, never the factors
      full = jax.eval_shape(lambda: stacked_identities(layout, params, dtype, 0.0))
      zeros = jax.tree.map(lambda s: jnp.zeros(packed_shape(s.shape), s.dtype), full)
    else:
      zeros = stacked_identities(layout, params, dtype, 0.0)
    identities = stacked_identities(layout, params, dtype)
    graft_state = graft.init(_tree.cast(params, dtype)) if graft is not None else optax.EmptyState()
    return ScaleByShampooState(
      jnp.zeros((), jnp.int32), zeros, identities, jnp.zeros((), jnp.int32), graft_state
    )

  def inverse_roots(layout: BlockLayout, statistics: Factors, roots: Factors, count: jax.Array):
    """Roots of every factor, batched by (size, exponent); failures keep the old root."""
    # Shampoo's statistics with beta2 < 1 are an EMA started at zero: debias before the root.
    debias = jnp.where(beta2 < 1, 1 - beta2 ** (count + 1), 1.0)
    exponents = [exponent_override or 2 * len(axes) for axes in layout.factor_axes]

    def roots_of(key, stacked):
      _, p = key
      root = jax.vmap(
        lambda s: matrix_inverse_root(
          s / debias.astype(s.dtype),
          p,
          method=root_method,
          epsilon=epsilon,
          relative_epsilon=relative_epsilon,
          rank_rtol=rank_rtol,
        )
      )(stacked)
      ok = jnp.isfinite(root.residual) & (root.residual < failure_threshold)
      return root.matrix, ok & jnp.all(jnp.isfinite(stacked), axis=(1, 2))

    results = map_factors(
      roots_of,
      statistics,
      key=lambda g, a: (statistics[g][a].shape[-1], exponents[g]),
      sharding=block_sharding,
    )
    new = tuple(
      tuple(
        jnp.where(ok[:, None, None], root, old)
        for (root, ok), old in zip(group_results, group_roots, strict=True)
      )
      for group_results, group_roots in zip(results, roots, strict=True)
    )
    failed = sum((jnp.sum(~ok) for group in results for _, ok in group), jnp.int32(0))
    return new, failed.astype(jnp.int32)

  def update(updates, state, params=None):
    del params
    layout = layout_of(updates)
    dtype = _tree.working_dtype(_tree.structure_of(updates))
    grads = _tree.cast(updates, dtype)
    blocks = to_blocks(layout, grads)
    weight = jnp.where(beta2 == 1, 1.0, 1 - jnp.asarray(beta2, dtype)).astype(dtype)
    stored = pack_symmetric if packed_statistics else lambda f: f
    statistics = tuple(
      tuple(
        beta2 * s + weight * stored(f) for s, f in zip(old, factor_statistics(b, axes), strict=True)
      )
      for old, b, axes in zip(state.statistics, blocks, layout.factor_axes, strict=True)
    )

    def refresh():
      full = jax.tree.map(unpack_symmetric, statistics) if packed_statistics else statistics
      roots, failed = inverse_roots(layout, full, state.roots, state.count)
      # A non-finite factor cannot recover by accumulation: restart it from zero.
      clean = jax.tree.map(
        lambda s: jnp.where(
          jnp.all(jnp.isfinite(s), axis=tuple(range(1, s.ndim)), keepdims=True), s, 0
        ),
        statistics,
      )
      return roots, state.failures + failed, clean

    roots, failures, statistics = refresh_if_due(
      state.count,
      precondition_frequency,
      refresh,
      lambda: (state.roots, state.failures, statistics),
    )
    preconditioned = [
      mode_product(b, r, axes) for b, r, axes in zip(blocks, roots, layout.factor_axes, strict=True)
    ]
    if graft is not None:
      direction, graft_state = graft.update(grads, state.graft)
      graft_blocks = to_blocks(layout, direction)
      preconditioned = [
        x * (_block_norm(u) / (_block_norm(x) + 1e-16))
        for x, u in zip(preconditioned, graft_blocks, strict=True)
      ]
    else:
      direction, graft_state, graft_blocks = grads, state.graft, blocks
    warm = state.count < start
    out = [jnp.where(warm, u, x) for x, u in zip(preconditioned, graft_blocks, strict=True)]
    new_state = ScaleByShampooState(
      optax.safe_increment(state.count), statistics, roots, failures, graft_state
    )
    return from_blocks(layout, out, direction, updates), new_state

  return optax.GradientTransformation(init, update)


def _block_norm(x: jax.Array) -> jax.Array:
  """The Frobenius norm of each block of a stack, shaped to broadcast against it."""
  return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))
