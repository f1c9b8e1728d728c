"""How estimator loops are compiled: a `lax` loop, or unrolled.

A `lax.while_loop` keeps compile time flat in the number of iterations and
lets an estimator stop early. On XLA:CPU, though, a convolution inside
`while`/`scan`/`cond` loses its fast path (jax-ml/jax#12868): ten Hessian-vector
products of a small 1-D CNN ran 25x slower in a `fori_loop` than unrolled.
So `loop="auto"` (the default everywhere) unrolls exactly when the backend is
CPU *and* the operator's product contains a convolution, found by tracing
one product to a jaxpr; everywhere else it keeps the `lax` loop. Unrolled
loops run their full iteration count (they cannot stop early) and compile in
time proportional to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from curvopt import _checks
from curvopt.oracles import LinearOperator

LoopMode = Literal["auto", "lax", "unroll"]
LOOP_MODES = ("auto", "lax", "unroll")


def should_unroll(loop: LoopMode, operator: LinearOperator) -> bool:
  """Resolves a `loop` argument for `operator` (see the module docstring)."""
  _checks.one_of("loop", loop, LOOP_MODES)
  if loop == "auto":
    return jax.default_backend() == "cpu" and operator.contains_convolution
  return loop == "unroll"


def iterate(
  num_steps: int,
  body: Callable[[Any, Any], Any],
  state: Any,
  *,
  unroll: bool,
  done: Callable[[Any], jax.Array] | None = None,
) -> tuple[Any, jax.Array]:
  """Runs `state = body(i, state)` for `i < num_steps`, or until `done(state)`.

  Returns the final state and the number of steps taken (an int32 array).
  Early stopping applies to `lax` loops only.
  """
  if unroll:
    # A Python int step lets bodies slice statically (e.g. only the basis
    # vectors filled so far).
    for i in range(num_steps):
      state = body(i, state)
    return state, jnp.int32(num_steps)
  if done is None:
    return jax.lax.fori_loop(0, num_steps, body, state), jnp.int32(num_steps)

  def keep_going(carry: tuple[jax.Array, Any]) -> jax.Array:
    i, s = carry
    return (i < num_steps) & jnp.logical_not(done(s))

  def step(carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
    i, s = carry
    return i + 1, body(i, s)

  steps, state = jax.lax.while_loop(keep_going, step, (jnp.int32(0), state))
  return state, steps
