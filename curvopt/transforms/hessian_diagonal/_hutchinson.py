"""Hutchinson's estimate of the Hessian diagonal as an optax transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.oracles import random_vector
from curvopt.oracles._probes import DISTRIBUTIONS, Distribution
from curvopt.transforms._extra_args import require_value_fn

PyTree = Any


class HutchinsonDiagonalState(NamedTuple):
  """State of `hutchinson_diagonal_estimator`.

  Attributes:
    key: the PRNG key all probes derive from (fixed).
    count: calls so far; probe `t` is `random_vector(key, params, counter=t)`.
  """

  key: jax.Array
  count: jax.Array


def hutchinson_diagonal_estimator(
  *, seed: int = 0, distribution: Distribution = "rademacher", name: str = "hutchinson"
) -> optax.GradientTransformationExtraArgs:
  """A transform whose output is the one-probe estimate `z * (H z)` of `diag(H)`.

  `H` is the Hessian of the extra argument `value_fn` at `params`. The input
  updates are ignored; the probe's key and a call counter live in the state,
  and probe `t` is the counter-based draw `random_vector(key, params,
  counter=t)`: one hash of an index, cut into the leaves (the same on every
  replica, and without the threefry loops that cost a small model more than
  its Hessian-vector product on XLA:CPU). Outputs are float32 (float64 for float64 leaves).
  Unbiased: `E[z * Hz] = diag(H)` for Rademacher and Gaussian probes.

  Consumers (`scale_by_adahessian`, `scale_by_sophia_h`) take it as their
  `hessian_diagonal_fn`, as optax's Sophia takes its estimator.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> est = curvopt.transforms.hutchinson_diagonal_estimator()
    >>> params = jnp.ones(3)
    >>> value_fn = lambda w: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * w**2)
    >>> diag, _ = est.update(params, est.init(params), params, value_fn=value_fn)
    >>> diag
    Array([2., 4., 6.], dtype=float32)

  References:
    Hutchinson 1990; Bekas, Kokiopoulou, Saad 2007.
  """
  _checks.one_of("distribution", distribution, DISTRIBUTIONS)
  make_key = _checks.seed("seed", seed)

  def init(params: PyTree) -> HutchinsonDiagonalState:
    del params
    return HutchinsonDiagonalState(make_key(), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates, extra_args
    if params is None:
      raise ValueError(f"{name} needs params in update(updates, state, params, ...).")
    value_fn = require_value_fn(name, value_fn, params)
    dtype = _tree.working_dtype(_tree.structure_of(params))
    probe = random_vector(state.key, params, distribution, counter=state.count)
    _, hz = jax.jvp(jax.grad(value_fn), (params,), (probe,))
    diagonal = jax.tree.map(lambda z, h: (z * h).astype(dtype), probe, hz)
    return diagonal, HutchinsonDiagonalState(state.key, optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def flax_averaging_axes(leaf: jax.Array) -> tuple[int, ...]:
  """AdaHessian's spatial averaging axes for flax's kernel layouts.

  Convolution kernels in flax are `(*spatial, in, out)`: a rank-3 kernel
  (1-D convolution) is averaged over axis 0, rank 4 (2-D) over axes (0, 1),
  rank 5 over (0, 1, 2). Biases, scales and dense kernels `(in, out)` are not
  averaged (the image-classification reference code).

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.transforms.flax_averaging_axes(jnp.zeros((3, 3, 16, 32)))
    (0, 1)
  """
  return tuple(range(leaf.ndim - 2)) if leaf.ndim >= 3 else ()


def spatial_average(
  diagonal: PyTree, axes: str | Callable[[jax.Array], tuple[int, ...]] | PyTree | None
) -> PyTree:
  """Replaces each entry by its mean over `axes` (per leaf), broadcast back.

  Args:
    diagonal: a pytree of arrays.
    axes: "flax" (`flax_averaging_axes`), a function `leaf -> axes`, a pytree
      of axis tuples matching `diagonal`, or None for no averaging.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.transforms.spatial_average(jnp.array([[1.0, 2.0], [3.0, 6.0]]), lambda x: (0,))
    Array([[2., 4.],
           [2., 4.]], dtype=float32)
  """
  if axes is None:
    return diagonal
  if isinstance(axes, str):
    if axes != "flax":
      raise ValueError(
        f'averaging_axes must be "flax", None, a function or a pytree; got {axes!r}.'
      )
    axes = flax_averaging_axes
  if callable(axes):
    axes = jax.tree.map(axes, diagonal)
  leaves, treedef = jax.tree.flatten(diagonal)
  axes_leaves = treedef.flatten_up_to(axes)
  out = [
    jnp.broadcast_to(jnp.mean(x, axis=tuple(a), keepdims=True), x.shape) if a else x
    for x, a in zip(leaves, axes_leaves, strict=True)
  ]
  return treedef.unflatten(out)
