"""Momentum as an EMA with float32 state, for the end of a preconditioned chain."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree

PyTree = Any


class EmaMomentumState(NamedTuple):
  """State of `ema_momentum`: the EMA, float32 (float64 for float64 leaves), and a step count."""

  momentum: PyTree
  count: jax.Array


def ema_momentum(
  decay: float = 0.9, nesterov: bool = False, debias: bool = False
) -> optax.GradientTransformation:
  r"""Momentum `m <- decay m + (1 - decay) u`; outputs `m`, or Nesterov's `decay m + (1 - decay) u`.

  With `debias`, the output is divided by `1 - decay^t` (Adam's bias
  correction; the EGN paper-era code's momentum on directions).

  Unlike `optax.trace`, the state is float32 for bfloat16 inputs and the
  output keeps the inputs' dtype; and it is an average (`1 - decay` on the
  new term), so step sizes stay on the scale of its input.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.ema_momentum(0.5)
    >>> u, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> u
    Array([0.5, 0.5], dtype=float32)

  References:
    Polyak 1964; Nesterov 1983; the EMA form is `moving_average_for_momentum`
    in Anil et al.'s Shampoo.
  """
  _checks.flag("nesterov", nesterov)
  _checks.flag("debias", debias)

  def init(params: PyTree) -> EmaMomentumState:
    dtype = _tree.working_dtype(_tree.structure_of(params))
    return EmaMomentumState(_tree.zeros(params, dtype), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    momentum = jax.tree.map(
      lambda u, m: decay * m + (1 - decay) * u.astype(m.dtype), updates, state.momentum
    )
    out = (
      jax.tree.map(lambda u, m: decay * m + (1 - decay) * u.astype(m.dtype), updates, momentum)
      if nesterov
      else momentum
    )
    if debias:
      out = optax.tree.bias_correction(out, decay, count)
    return _tree.cast_like(out, updates), EmaMomentumState(momentum, count)

  return optax.GradientTransformation(init, update)
