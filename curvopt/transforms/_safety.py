"""A step that would put a non-finite number into the parameters or the state is skipped."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.transforms._cadence import refresh_when

PyTree = Any


class SkipNonFiniteState(NamedTuple):
  """State of `skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transform's state.
    skipped: steps whose updates or new state were not finite (not applied).
    resets: steps that found the incoming state not finite and restarted it.
  """

  inner_state: Any
  skipped: jax.Array
  resets: jax.Array


def all_finite(tree: PyTree) -> jax.Array:
  """Whether every floating-point leaf of `tree` is finite (other leaves count as finite).

  One reduction over all leaves: `sum(x * 0)` is 0 where every `x` is
  finite and NaN as soon as one entry is NaN or infinite (fewer kernels than
  `all(isfinite(x))` per leaf, which cost a small model's step more).

  Example:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.transforms.all_finite({"a": jnp.ones(2), "n": jnp.int32(3), "b": jnp.inf})
    Array(False, dtype=bool)
  """
  parts = [
    jnp.ravel(x * 0).astype(jnp.float32)
    for x in jax.tree.leaves(tree)
    if not _tree.is_key(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.isfinite(jnp.sum(jnp.concatenate(parts))) if parts else jnp.array(True)


def _select(condition: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  def pick(a, b):
    if _tree.is_key(a):
      data = jnp.where(condition, jax.random.key_data(a), jax.random.key_data(b))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
    return jnp.where(condition, a, b)

  return jax.tree.map(pick, new, old)


def _require_float_leaves(params: PyTree) -> None:
  """Integer parameters are named; leaves without a dtype (optax's placeholders) pass."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"params{jax.tree_util.keystr(path)} must have a floating-point dtype "
        f"(float32, bfloat16, float64, ...), got {dtype}."
      )


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that no non-finite number reaches the parameters or the state.

  A step whose updates or new state contain a NaN or an infinity (from a
  non-finite gradient, Hessian product, loss or statistic) returns zero
  updates and keeps the previous state; `skipped` counts it. A state that
  arrives non-finite (corrupted outside `update`, or restored from a bad
  checkpoint) is restarted from `inner.init(params)` before the step;
  `resets` counts it. Every named curvopt optimizer is wrapped in this,
  which also checks at trace time that the parameters are floating point
  and that the updates have the parameters' structure and shapes.
  For another policy, build the chain from `curvopt.transforms` and wrap it
  yourself, e.g. in `optax.apply_if_finite(chain, max_consecutive_errors)`,
  which checks only the incoming gradient and eventually applies it.

  Example:
    >>> import jax.numpy as jnp, optax, curvopt
    >>> tx = curvopt.transforms.skip_nonfinite(optax.adam(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([1.0, jnp.nan]), state, jnp.zeros(2))
    >>> u, int(state.skipped)
    (Array([0., 0.], dtype=float32), 1)

  References:
    Micikevicius et al., "Mixed Precision Training", ICLR 2018 (skipping
    non-finite steps); optax's `apply_if_finite`.
  """

  inner = optax.with_extra_args_support(inner)

  def init(params: PyTree) -> SkipNonFiniteState:
    _require_float_leaves(params)
    zero = jnp.zeros((), jnp.int32)
    return SkipNonFiniteState(inner.init(params), zero, zero)

  def update(updates, state, params=None, **extra_args):
    if params is not None:
      _checks.matches_structure("updates", updates, params)
    intact = all_finite(state.inner_state)
    inner_state = state.inner_state
    if params is not None:  # a conditional: the restart is not computed on healthy steps
      inner_state = refresh_when(~intact, lambda: inner.init(params), lambda: state.inner_state)
    new_updates, new_state = inner.update(updates, inner_state, params, **extra_args)
    finite = all_finite(new_updates) & all_finite(new_state)
    zeros = jax.tree.map(jnp.zeros_like, new_updates)
    return _select(finite, new_updates, zeros), SkipNonFiniteState(
      _select(finite, new_state, inner_state),
      state.skipped + (~finite).astype(jnp.int32),
      state.resets + (~intact).astype(jnp.int32),
    )

  return optax.GradientTransformationExtraArgs(init, update)
