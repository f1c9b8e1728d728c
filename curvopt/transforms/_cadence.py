"""Refreshing expensive curvature statistics every few steps, inside one compiled step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from curvopt import _jaxpr, _tree


def value_at(value: Any, count: jax.Array) -> Any:
  """A hyperparameter given as a number or as an optax schedule, at step `count`."""
  return value(count) if callable(value) else value


def refresh_if_due(
  count: jax.Array, every: int, refresh: Callable[[], Any], keep: Callable[[], Any]
):
  """`refresh()` on steps `0, every, 2 every, ...` (by `count`), else `keep()`.

  Both return the same pytree. With `every == 1` no conditional is emitted.
  Otherwise the refresh sits in a `lax.cond`, except on XLA:CPU when it
  contains a convolution: there a convolution inside a conditional loses its
  fast path (jax-ml/jax#12868; a CNN's Hessian product measured 20x slower),
  so the conditional's branch instead calls the refresh compiled as a
  separate program, through `jax.pure_callback` (host and device are the
  same memory on CPU). Results are identical.
  """
  if every == 1:
    return refresh()
  return refresh_when(count % every == 0, refresh, keep)


def refresh_when(due: jax.Array, refresh: Callable[[], Any], keep: Callable[[], Any]):
  """`refresh()` where the boolean `due` holds, else `keep()`; see `refresh_if_due`.

  Outside `jit` (`due` concrete) this is a Python branch: an eager
  `lax.cond` would compile a new program on every call.
  """
  if not isinstance(due, jax.core.Tracer):
    return refresh() if bool(due) else keep()
  if jax.default_backend() == "cpu":
    closed = jax.make_jaxpr(refresh)()
    if _jaxpr.contains_primitive(closed.jaxpr, "conv_general_dilated"):
      return jax.lax.cond(due, _separately_compiled(closed, refresh), keep)
  return jax.lax.cond(due, refresh, keep)


def _separately_compiled(closed: Any, refresh: Callable[[], Any]) -> Callable[[], Any]:
  """A nullary function computing `refresh()` in its own compiled program via a callback."""
  consts = list(closed.consts)
  const_keys = [jax.random.key_impl(c) if _tree.is_key(c) else None for c in consts]
  raw_consts = [
    jax.random.key_data(c) if k else jnp.asarray(c) for c, k in zip(consts, const_keys, strict=True)
  ]
  shapes = jax.eval_shape(refresh)
  out_leaves, out_def = jax.tree.flatten(shapes)
  out_keys = [s.dtype if _tree.is_key(s) else None for s in out_leaves]
  raw_shapes = [
    jax.eval_shape(jax.random.key_data, s) if k is not None else s
    for s, k in zip(out_leaves, out_keys, strict=True)
  ]

  def program(*args):
    args = [
      jax.random.wrap_key_data(a, impl=k) if k is not None else a
      for a, k in zip(args, const_keys, strict=True)
    ]
    outs = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(closed.jaxpr, args))()
    return [
      jax.random.key_data(o) if k is not None else o for o, k in zip(outs, out_keys, strict=True)
    ]

  # Compiled now, while the enclosing step compiles, so the first refresh does
  # not pay for it inside a timed training step.
  compiled = (
    jax.jit(program)
    .lower(*[jax.ShapeDtypeStruct(jnp.shape(c), jnp.result_type(c)) for c in raw_consts])
    .compile()
  )

  def on_host(*args):
    return [np.asarray(x) for x in compiled(*args)]

  # Output keys come from the input keys, so they share their implementation.
  impl = next((k for k in const_keys if k is not None), None)

  def branch():
    outs = jax.pure_callback(on_host, raw_shapes, *raw_consts)
    outs = [
      jax.random.wrap_key_data(o, impl=impl) if k is not None else o
      for o, k in zip(outs, out_keys, strict=True)
    ]
    return out_def.unflatten(outs)

  return branch
