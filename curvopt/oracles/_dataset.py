"""Curvature of a whole data set, accumulated over mini-batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.oracles._operator import LinearOperator

PyTree = Any


def _leading_dim(batch: PyTree) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves or jnp.ndim(leaves[0]) < 1:
    raise ValueError(
      "cannot infer the batch size: the first leaf of each batch must have a leading "
      "example axis, or pass batch_size_fn."
    )
  return int(jnp.shape(leaves[0])[0])


def dataset_operator(
  operator_fn: Callable[[PyTree, PyTree], LinearOperator],
  params: PyTree,
  batches: Sequence[PyTree],
  *,
  batch_size_fn: Callable[[PyTree], int] | None = None,
) -> LinearOperator:
  """The curvature of the whole data set, from per-batch operators.

  For batches of sizes `n_b` whose operators `A_b` are per-batch means,
  the result is `A v = sum_b n_b A_b v / sum_b n_b`: the operator of the
  concatenated data set, not an average of batch means (which is biased when
  batches differ in size). Each product visits every batch in turn and keeps
  one batch's intermediate values alive at a time, as PyHessian does, so
  researchers can measure the full-batch sharpness of a model trained on
  mini-batches.

  Args:
    operator_fn: `(params, batch) -> LinearOperator` for one batch, e.g.
      `lambda p, b: curvopt.hessian(lambda q: loss(q, b), p)`.
    params: the point where the curvature is taken.
    batches: a list or tuple of batch pytrees (sizes may differ).
    batch_size_fn: `batch -> int`; defaults to the leading dimension of the
      batch's first leaf.

  Returns:
    A `LinearOperator` with the tags of the per-batch operators and
    `num_examples` equal to the total number of examples.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> xs = [jnp.ones((1, 2)), 2 * jnp.ones((3, 2))]
    >>> loss = lambda w, x: 0.5 * jnp.mean((x @ w) ** 2)
    >>> op = curvopt.dataset_operator(
    ...     lambda p, x: curvopt.hessian(lambda q: loss(q, x), p), jnp.zeros(2), xs)
    >>> op.num_examples, op.mv(jnp.array([1.0, 0.0]))
    (4, Array([3.25, 3.25], dtype=float32))
  """
  _checks.callable_arg("operator_fn", operator_fn)
  _checks.float_pytree("params", params)
  if not isinstance(batches, list | tuple) or not batches:
    raise TypeError(
      f"batches must be a non-empty list or tuple of batch pytrees, got {type(batches).__name__}."
    )
  size_fn = batch_size_fn or _leading_dim
  sizes = [int(size_fn(batch)) for batch in batches]
  if any(n <= 0 for n in sizes):
    raise ValueError(f"every batch must hold at least one example; got sizes {sizes}.")
  total = sum(sizes)
  first = operator_fn(params, batches[0])
  if not isinstance(first, LinearOperator):
    raise TypeError(f"operator_fn must return a LinearOperator, got {type(first).__name__}.")
  structure = _tree.structure_of(params)
  # bfloat16 products are summed in float32: the weights n_b / N are not bfloat16 numbers.
  dtype = _tree.working_dtype(structure)

  def matvec(vector: PyTree) -> PyTree:
    out = _tree.zeros(structure, dtype)
    for batch, n in zip(batches, sizes, strict=True):
      product = _tree.cast(operator_fn(params, batch).mv(vector), dtype)
      out = optax.tree.add_scale(out, n / total, product)
    return out

  return LinearOperator(matvec, structure, first.tags, total)
