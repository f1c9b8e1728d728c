"""What a loss-evaluating transform needs from `update`'s extra arguments, checked early.

Shared by every transform that evaluates the loss itself (Hutchinson
estimators, PSGD's Newton fit, SAM and GAM, lazy Newton, line search):
a missing or malformed `value_fn` is named at trace time, not found deep in XLA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from curvopt import _checks
from curvopt.transforms._masking import refuse_masked_view

PyTree = Any


def require_value_fn(
  optimizer: str, value_fn: Any, params: PyTree = None, *, has_aux: bool = False
) -> Callable[[PyTree], jax.Array]:
  """Raises a clear error at trace time when the loss closure is missing or not scalar.

  With `params`, `value_fn(params)` is checked abstractly (no computation) to
  return one floating-point scalar (the first of `(loss, aux)` with `has_aux`).
  """
  if value_fn is None:
    raise TypeError(
      f"{optimizer} needs the loss as an extra argument: call "
      f"update(grads, state, params, value_fn=lambda p: loss(p, batch)), where value_fn "
      "returns the scalar loss of the current batch (with flax.nnx, build it with "
      "curvopt.nnx.value_fn(model, loss_fn)). flax.linen's TrainState.apply_gradients "
      "cannot forward value_fn: use curvopt.linen.apply_gradients(state, grads=grads, "
      "value_fn=...)."
    )
  _checks.callable_arg("value_fn", value_fn)
  if params is not None:
    refuse_masked_view(optimizer, params, value_fn)
    loss = (lambda p: value_fn(p)[0]) if has_aux else value_fn
    _checks.scalar_function(f"{optimizer}'s value_fn", loss, params)
  return value_fn
