"""flax.nnx integration: the loss closure a curvature optimizer needs, from a module.

`nnx.Optimizer.update(model, grads, value_fn=...)` hands `value_fn` the
parameter state only. A model with state beyond its parameters (BatchNorm
statistics, Dropout's random-number state) must be rebuilt from that state
and a copy of the rest, taken as plain arrays before the gradient pass so
that (1) merging it inside the optimizer's own transformations does not
mutate variables of an outer trace, and (2) `value_fn` draws the same dropout
mask as the gradient pass did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

__all__ = ["value_fn"]


def value_fn(
  model: nnx.Module, loss_fn: Callable[[nnx.Module], jax.Array], wrt: Any = nnx.Param
) -> Callable[[nnx.State], jax.Array]:
  """The `value_fn` extra argument for `nnx.Optimizer(model, tx, wrt=wrt)`.

  Build it from the model *before* the gradient pass: it captures the
  non-parameter state (batch statistics, random-number counters) as it is
  then, so the loss it evaluates is the one the gradients were taken of,
  dropout mask included. `loss_fn(model)` returns the scalar loss of the
  current batch; inside `value_fn` it runs on a throwaway copy of the
  model, so the optimizer's extra evaluations never move BatchNorm's running
  averages or advance the random-number state.

  Args:
    model: the module being trained.
    loss_fn: the scalar loss of a module on the current batch.
    wrt: the optimizer's `wrt` filter (the state `value_fn` is given).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> import curvopt.nnx
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0, dropout=1)
    >>> model = nnx.Sequential(
    ...   nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.Dropout(0.5, rngs=rngs))
    >>> optimizer = nnx.Optimizer(model, curvopt.adahessian(0.1), wrt=nnx.Param)
    >>> x = jnp.ones((8, 3))
    >>> loss_fn = lambda m: jnp.mean(m(x) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer):
    ...   value_fn = curvopt.nnx.value_fn(model, loss_fn)  # before the gradient pass
    ...   loss, grads = nnx.value_and_grad(loss_fn)(model)
    ...   optimizer.update(model, grads, value_fn=value_fn)
    ...   return loss
    >>> bool(jnp.isfinite(train_step(model, optimizer)))
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}.")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a callable loss_fn(model), got {loss_fn!r}.")
  graphdef, _, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)

  def loss_at(params: nnx.State) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, params, rest))

  return loss_at
