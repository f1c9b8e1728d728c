"""Statistics in float32 around any optax transform, whatever the parameters' dtype."""

from __future__ import annotations

from typing import Any

import jax
import optax

from curvopt import _tree

PyTree = Any


def with_float32_statistics(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run on float32 copies of the updates and parameters (float64 ones stay float64).

  optax's Adam keeps its second moment in the parameters' dtype; for bfloat16
  parameters that rounds every statistic to 8 bits. Wrapped, `inner` sees and
  stores the working precision, and its updates come back in each input's dtype.

  Examples:
    >>> import jax.numpy as jnp, optax, curvopt
    >>> tx = curvopt.transforms.with_float32_statistics(optax.scale_by_adam())
    >>> state = tx.init(jnp.ones(2, jnp.bfloat16))
    >>> state.nu.dtype, tx.update(jnp.ones(2, jnp.bfloat16), state)[0].dtype
    (dtype('float32'), dtype(bfloat16))

  References:
    Micikevicius et al., "Mixed precision training", ICLR 2018.
  """
  inner = optax.with_extra_args_support(inner)

  def working(tree: PyTree) -> PyTree:
    if tree is None:
      return None
    dtype = _tree.working_dtype(tree)
    return jax.tree.map(lambda x: x.astype(dtype), tree)

  def init(params: PyTree):
    return inner.init(working(params))

  def update(updates: PyTree, state, params: PyTree = None, **extra_args):
    out, state = inner.update(working(updates), state, working(params), **extra_args)
    return jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates), state

  return optax.GradientTransformationExtraArgs(init, update)
