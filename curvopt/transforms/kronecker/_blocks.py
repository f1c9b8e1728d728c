"""Cutting parameter leaves into Kronecker blocks and stacking the blocks of one shape.

Shampoo and SOAP precondition each block of each leaf with one matrix per
block axis. Blocks of equal shape, from any leaves, are stacked into one
array `(n, *block_shape)`, so their statistics, roots and products are one
batched call each: the compiled program grows with the number of distinct
block shapes, not with the number of layers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt import _checks

PyTree = Any
MatrixAxes = Callable[[tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]] | None]


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """How one leaf becomes blocks: transpose, reshape to `(batch, *dims)`, cut each dim.

  A leaf with no block dims (a scalar, or a vector when vectors are not
  preconditioned) has `dims == ()` and is left to the diagonal fallback.
  """

  permutation: tuple[int, ...]
  batch: int
  dims: tuple[int, ...]
  block_size: int

  @property
  def preconditioned(self) -> bool:
    return bool(self.dims)

  def cells(self) -> list[tuple[slice, ...]]:
    """The grid of blocks over `dims`, each a tuple of slices, in row-major order."""
    ranges = [
      [slice(s, min(s + self.block_size, d)) for s in range(0, d, self.block_size)]
      for d in self.dims
    ]
    return list(itertools.product(*ranges))


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Every leaf's `LeafLayout`, and the groups of equal-shaped blocks.

  `groups[shape]` lists `(leaf index, cell index)` in stacking order; a cell
  contributes `batch` consecutive blocks. `factor_axes[g]` are the axes of
  group `g`'s blocks that get a Kronecker factor (see `block_layout`).
  """

  leaves: tuple[LeafLayout, ...]
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  groups: tuple[tuple[tuple[int, ...], tuple[tuple[int, int], ...]], ...]
  factor_axes: tuple[tuple[int, ...], ...]  # per group: the block axes that get a factor

  def group_shapes(self) -> list[tuple[int, ...]]:
    return [shape for shape, _ in self.groups]

  def group_sizes(self) -> list[int]:
    return [sum(self.leaves[leaf].batch for leaf, _ in members) for _, members in self.groups]


def merge_small_dims(shape: tuple[int, ...], limit: int) -> tuple[int, ...]:
  """Merges adjacent dims while their product stays <= `limit`; drops size-1 dims.

  Examples:
    >>> from curvopt.transforms.kronecker._blocks import merge_small_dims
    >>> merge_small_dims((1, 2, 768, 1, 2048), 4096)
    (1536, 2048)
  """
  merged: list[int] = []
  for d in shape:
    if d == 1:
      continue
    if merged and merged[-1] * d <= limit:
      merged[-1] *= d
    else:
      merged.append(d)
  return tuple(merged)


def leaf_layout(
  shape: tuple[int, ...],
  block_size: int,
  *,
  merge_dims: bool,
  precondition_1d: bool,
  matrix_axes: MatrixAxes | None,
) -> LeafLayout:
  """The layout of one leaf: `matrix_axes` if given (and not None for it), else merged dims.

  Merging joins adjacent dims while their product stays <= `block_size`,
  except the last dim, which stays apart so that a matrix stays a matrix:
  a conv kernel `(3, 3, 16, 32)` becomes `(144, 32)`.
  """
  ndim = len(shape)
  spec = matrix_axes(shape) if matrix_axes is not None else None
  if spec is not None:
    rows, columns = _checked_matrix_axes(shape, spec)
    batch_axes = tuple(a for a in range(ndim) if a not in rows + columns)
    dims = tuple(math.prod(shape[a] for a in axes) for axes in (rows, columns))
    dims = tuple(d for d in dims if d > 1)
    return LeafLayout(
      batch_axes + rows + columns,
      math.prod(shape[a] for a in batch_axes),
      dims,
      block_size,
    )
  dims = tuple(d for d in shape if d > 1)
  if merge_dims and len(dims) > 1:
    # The last dim stays apart, so a matrix stays a matrix (flax kernels are (..., in, out)).
    dims = merge_small_dims(dims[:-1], block_size) + dims[-1:]
  if len(dims) == 1 and not precondition_1d:
    dims = ()
  return LeafLayout(tuple(range(ndim)), 1, dims, block_size)


def _checked_matrix_axes(shape: tuple[int, ...], spec: Any) -> tuple[tuple[int, ...], ...]:
  """`spec` as two disjoint tuples of in-range axes, or a clear error naming `matrix_axes`."""
  ndim = len(shape)
  try:
    rows, columns = (tuple(int(a) for a in axes) for axes in spec)
  except (TypeError, ValueError):
    raise TypeError(
      f"matrix_axes must return (row_axes, column_axes), two tuples of ints, or None; "
      f"got {spec!r} for a leaf of shape {shape}."
    ) from None
  if any(not -ndim <= a < ndim for a in rows + columns):
    raise ValueError(f"matrix_axes returned {spec!r}: an axis out of range for shape {shape}.")
  rows, columns = tuple(a % ndim for a in rows), tuple(a % ndim for a in columns)
  if len(set(rows + columns)) != len(rows + columns):
    raise ValueError(f"matrix_axes returned {spec!r}: row and column axes must be distinct.")
  return rows, columns


def block_layout(
  tree: PyTree,
  block_size: int,
  *,
  merge_dims: bool = True,
  precondition_1d: bool = False,
  matrix_axes: MatrixAxes | None = None,
  one_sided: bool = True,
) -> BlockLayout:
  """The static layout of a pytree of arrays (or shape-dtype structs).

  With `one_sided`, an axis of a block of two or more axes gets no factor when
  the factor would hold more numbers than the block (`d^2 > block size`, i.e.
  `d` exceeds the product of the other axes): a thin `(128, 10)` block is
  preconditioned by its `10 x 10` factor alone.
  """
  leaves, treedef = jax.tree.flatten(tree)
  shapes = tuple(tuple(leaf.shape) for leaf in leaves)
  layouts = tuple(
    leaf_layout(
      s,
      block_size,
      merge_dims=merge_dims,
      precondition_1d=precondition_1d,
      matrix_axes=matrix_axes,
    )
    for s in shapes
  )
  groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
  for i, layout in enumerate(layouts):
    for j, cell in enumerate(layout.cells() if layout.preconditioned else []):
      shape = tuple(s.stop - s.start for s in cell)
      groups.setdefault(shape, []).append((i, j))
  ordered = tuple((shape, tuple(groups[shape])) for shape in sorted(groups))
  axes = tuple(_factor_axes(shape, one_sided) for shape, _ in ordered)
  return BlockLayout(layouts, treedef, shapes, ordered, axes)


def layout_factory(
  *,
  block_size: int,
  merge_dims: bool,
  precondition_1d: bool,
  matrix_axes: MatrixAxes | None,
  one_sided: bool,
) -> Callable[[PyTree], BlockLayout]:
  """`tree -> block_layout(tree, ...)`, its options checked now (when an optimizer is built)."""
  block_size = _checks.positive_int("block_size", block_size)
  for name, value in (
    ("merge_dims", merge_dims),
    ("precondition_1d", precondition_1d),
    ("one_sided", one_sided),
  ):
    _checks.flag(name, value)
  return functools.partial(
    block_layout,
    block_size=block_size,
    merge_dims=merge_dims,
    precondition_1d=precondition_1d,
    matrix_axes=matrix_axes,
    one_sided=one_sided,
  )


def _factor_axes(shape: tuple[int, ...], one_sided: bool) -> tuple[int, ...]:
  if len(shape) == 1 or not one_sided:
    return tuple(range(len(shape)))
  return tuple(i for i, d in enumerate(shape) if d * d <= math.prod(shape))


def _canonical(x: jax.Array, layout: LeafLayout) -> jax.Array:
  return jnp.transpose(x, layout.permutation).reshape(layout.batch, *layout.dims)


def to_blocks(layout: BlockLayout, tree: PyTree, dtype: Any = None) -> list[jax.Array]:
  """One stacked array `(n, *shape)` per group, in `layout.groups` order."""
  leaves = layout.treedef.flatten_up_to(tree)
  canonical = [
    _canonical(x.astype(dtype or x.dtype), lay) if lay.preconditioned else None
    for x, lay in zip(leaves, layout.leaves, strict=True)
  ]
  stacks = []
  for _, members in layout.groups:
    pieces = [canonical[i][(slice(None), *layout.leaves[i].cells()[j])] for i, j in members]
    stacks.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0))
  return stacks


def from_blocks(
  layout: BlockLayout, stacks: list[jax.Array], fallback: PyTree, dtype_like: PyTree
) -> PyTree:
  """Reassembles the leaves; leaves without blocks are taken from `fallback`.

  Outputs are cast to the dtypes of `dtype_like`'s leaves.
  """
  fallback_leaves = layout.treedef.flatten_up_to(fallback)
  like = layout.treedef.flatten_up_to(dtype_like)
  canonical: dict[int, jax.Array] = {}
  for (_, members), stack in zip(layout.groups, stacks, strict=True):
    offset = 0
    for i, j in members:
      lay = layout.leaves[i]
      piece = stack[offset : offset + lay.batch]
      offset += lay.batch
      if len(lay.cells()) == 1:  # one block covers the leaf: no scatter
        canonical[i] = piece
        continue
      if i not in canonical:
        canonical[i] = jnp.zeros((lay.batch, *lay.dims), stack.dtype)
      canonical[i] = canonical[i].at[(slice(None), *lay.cells()[j])].set(piece)
  out = []
  for i, (lay, shape) in enumerate(zip(layout.leaves, layout.shapes, strict=True)):
    if not lay.preconditioned:
      out.append(fallback_leaves[i].astype(like[i].dtype))
      continue
    permuted = tuple(shape[a] for a in lay.permutation)
    leaf = jnp.transpose(canonical[i].reshape(permuted), np.argsort(lay.permutation))
    out.append(leaf.astype(like[i].dtype))
  return layout.treedef.unflatten(out)


def stacked_identities(layout: BlockLayout, params: PyTree, dtype: Any, scale: float = 1.0):
  """Per group, per factor axis, `scale * I` stacked `(n, d, d)`: the initial factor state.

  `optax.tree.map_params` initializes with a leafless placeholder for the
  parameters; for it these shape-dependent fields become one non-parameter
  leaf (an empty array), which is a prefix of the real fields.
  """
  if not jax.tree.leaves(params):
    return jnp.zeros((0,), dtype)
  return tuple(
    tuple(
      scale * jnp.broadcast_to(jnp.eye(shape[a], dtype=dtype), (n, shape[a], shape[a]))
      for a in axes
    )
    for shape, n, axes in zip(
      layout.group_shapes(), layout.group_sizes(), layout.factor_axes, strict=True
    )
  )
