"""flax.linen integration: `TrainState.apply_gradients` with the extra arguments it drops."""

from __future__ import annotations

from typing import Any

import optax

__all__ = ["apply_gradients"]


def apply_gradients(state: Any, *, grads: Any, **extra_args: Any) -> Any:
  """`state.apply_gradients(grads=grads)` that forwards `value_fn` and the other extra arguments.

  flax's `TrainState.apply_gradients` calls `tx.update(grads, opt_state,
  params)` with no extra arguments, so an optimizer that evaluates the loss
  (AdaHessian, Sophia-H, SAM, ...) cannot receive its `value_fn` there.

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt, curvopt.linen
    >>> from flax import linen as nn
    >>> from flax.training import train_state
    >>> model = nn.Dense(1)
    >>> x = jnp.ones((4, 3))
    >>> state = train_state.TrainState.create(
    ...   apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"],
    ...   tx=curvopt.adahessian(0.1))
    >>> loss = lambda p: jnp.mean(state.apply_fn({"params": p}, x) ** 2)
    >>> state = curvopt.linen.apply_gradients(
    ...   state, grads=jax.grad(loss)(state.params), value_fn=loss)
    >>> int(state.step)
    1
  """
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra_args)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
