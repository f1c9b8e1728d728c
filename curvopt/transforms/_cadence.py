"""Refreshing expensive curvature statistics every few steps, inside one compiled step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from curvopt import _xla_cpu


def value_at(value: Any, count: jax.Array) -> Any:
  """A hyperparameter given as a number or as an optax schedule, at step `count`."""
  return value(count) if callable(value) else value


def refresh_if_due(
  count: jax.Array, every: int, refresh: Callable[[], Any], keep: Callable[[], Any]
):
  """`refresh()` on steps `0, every, 2 every, ...` (by `count`), else `keep()`.

  Both return the same pytree. With `every == 1` no conditional is emitted.
  Otherwise the refresh sits in a `lax.cond`; see `refresh_when`.
  """
  if every == 1:
    return refresh()
  return refresh_when(count % every == 0, refresh, keep)


def refresh_when(due: jax.Array, refresh: Callable[[], Any], keep: Callable[[], Any]):
  """`refresh()` where the boolean `due` holds, else `keep()`, in a `lax.cond`.

  On XLA:CPU the refresh's convolutions are laid out channels-last
  (`curvopt._xla_cpu.for_control_flow`); results are identical. Outside `jit`
  (`due` concrete) this is a Python branch: an eager `lax.cond` would compile
  a new program on every call.
  """
  if not isinstance(due, jax.core.Tracer):
    return refresh() if bool(due) else keep()
  return jax.lax.cond(due, _xla_cpu.for_control_flow(refresh), keep)
