"""A step that would put a non-finite number into the parameters or the state is skipped."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _jaxpr, _tree
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

  `sum(x * 0)` is 0 when every `x` is finite and NaN as soon as one is NaN
  or infinite, whatever the magnitudes. A small tree is read as one float32
  vector (float64 leaves as `x * 0`, which no cast can overflow) reduced in
  one kernel: a reduction per leaf is a kernel per leaf, which on XLA:CPU
  added 45-65% to a transformer step's XLA compile time (Shampoo on gpt_lm
  small) and cost a small model's step more than its optimizer
  (benchmarks/guard_cost.py).

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.transforms.all_finite({"a": jnp.ones(2), "n": jnp.int32(3), "b": jnp.inf})
    Array(False, dtype=bool)
  """
  leaves = _float_leaves(tree)
  if not _tree.one_vector(leaves):
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves]
    return functools.reduce(jnp.logical_and, checks, jnp.bool_(True))
  flat = [jnp.ravel(_exactly_castable(x)).astype(jnp.float32) for x in leaves]
  return jnp.isfinite(jnp.sum(jnp.concatenate(flat) * 0))


def _exactly_castable(x: jax.Array) -> jax.Array:
  """`x` if float32 holds its finite values, else a real `x * 0` (finite stays finite)."""
  if jnp.iscomplexobj(x):
    zero = x * 0
    return zero.real + zero.imag
  return x if jnp.finfo(x.dtype).bits <= 32 else x * 0


def _float_leaves(tree: PyTree) -> list[jax.Array]:
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  return [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]  # PRNG keys are not


def _select(condition: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """`new` where the scalar `condition` holds, else `old`, leaf by leaf.

  A leaf the step passed through unchanged is returned as is, so that `jit`
  forwards it without a new output buffer (a typed PRNG key rebuilt as a new
  output costs a small step more, in Python, than its whole optimizer).
  """

  def pick(a, b):
    if a is b:
      return a
    a, b = jnp.asarray(a), jnp.asarray(b)  # typed PRNG keys included
    if a.dtype != b.dtype or a.shape != b.shape:
      return jnp.where(condition, a, b)
    return jax.lax.select_n(condition, b, a)  # a scalar predicate: one operation per leaf

  return jax.tree.map(pick, new, old)


# An init made of these only (zeros, identities, a key from a seed) is rebuilt
# on every step and fused into the final select; any other (random draws,
# factorizations) runs in a conditional. Measured (mnist1d_cnn, PSGD-Kron): a
# conditional restart copies the state every step, 9.3 ms a step against 6.9 ms.
_CHEAP_INIT = frozenset(
  {"broadcast_in_dim", "iota", "eq", "ne", "convert_element_type", "add", "sub", "mul", "neg"}
  | {"concatenate", "reshape", "squeeze", "expand_dims", "slice", "transpose", "select_n", "copy"}
  | {"random_seed", "random_wrap", "random_unwrap"}
)


def _restarted(intact: jax.Array, state: PyTree, init: Callable[[], PyTree]) -> PyTree:
  """`state` if `intact`, else `init()`; PRNG keys (never non-finite) are kept as they are."""
  leaves, treedef = jax.tree.flatten(state)
  keys = [_tree.is_key(x) for x in leaves]
  current = [x for x, key in zip(leaves, keys, strict=True) if not key]

  def fresh() -> list[jax.Array]:
    return [x for x, key in zip(jax.tree.leaves(init()), keys, strict=True) if not key]

  if _jaxpr.uses_only(jax.make_jaxpr(init)().jaxpr, _CHEAP_INIT):
    values = _select(intact, current, fresh())
  else:
    values = refresh_when(~intact, fresh, lambda: current)
  values = iter(values)
  return treedef.unflatten(
    [x if key else next(values) for x, key in zip(leaves, keys, strict=True)]
  )


def _require_float_leaves(params: PyTree) -> None:
  """Integer parameters are named; leaves without a dtype (optax's placeholders) pass."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"params{jax.tree_util.keystr(path)} must have a floating-point dtype "
        f"(float32, bfloat16, float64, ...), got {dtype}."
      )


def _holds_nothing(tree: PyTree) -> bool:
  """No array and no optax `map_params` placeholder (which stands for parameters)."""
  marks = jax.tree.leaves(tree, is_leaf=lambda x: type(x).__name__ == "_ParamsPlaceholder")
  return not marks


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that no non-finite number reaches the parameters or the state.

  A step whose updates or new state contain a NaN or an infinity (from a
  non-finite gradient, Hessian product, loss or statistic), or whose updates
  would make the parameters non-finite (`params + updates` overflowing a
  float16 parameter), returns zero updates and keeps the previous state;
  `skipped` counts it. A state that
  arrives non-finite (corrupted outside `update`, or restored from a bad
  checkpoint) skips the step too and is restarted from `inner.init(params)`;
  `resets` counts it. Every named curvopt optimizer is wrapped in this,
  which also checks at trace time that the parameters are floating point
  and that the updates have the parameters' structure and shapes.
  For another policy, build the chain from `curvopt.transforms` and wrap it
  yourself, e.g. in `optax.apply_if_finite(chain, max_consecutive_errors)`,
  which checks only the incoming gradient and eventually applies it.

  Examples:
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
    skipped, resets = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    if _holds_nothing(params):  # legal in optax: nothing to precondition, empty updates
      return SkipNonFiniteState(optax.EmptyState(), skipped, resets)
    return SkipNonFiniteState(_tree.own_buffers(inner.init(params)), skipped, resets)

  def update(updates, state, params=None, **extra_args):
    if isinstance(state.inner_state, optax.EmptyState) and _holds_nothing(updates):
      return updates, state
    if params is not None:
      _checks.matches_structure("updates", updates, params)
    new_updates, new_state = inner.update(updates, state.inner_state, params, **extra_args)
    # Where the parameters are known, the result is checked, not the updates alone:
    # finite updates can still overflow a low-precision parameter (float16: 65504).
    result = new_updates if params is None else optax.apply_updates(params, new_updates)
    intact = all_finite(state.inner_state)
    applied = intact & all_finite((result, new_state))
    kept = state.inner_state
    if params is not None:  # a corrupted state restarts
      kept = _restarted(intact, kept, lambda: inner.init(params))
    zeros = jax.tree.map(jnp.zeros_like, new_updates)
    return _select(applied, new_updates, zeros), SkipNonFiniteState(
      _select(applied, new_state, kept),
      state.skipped + (~applied).astype(jnp.int32),
      state.resets + (~intact).astype(jnp.int32),
    )

  return optax.GradientTransformationExtraArgs(init, update)
