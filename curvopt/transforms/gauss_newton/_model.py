"""The objective a Gauss-Newton method sees: a loss on model outputs plus an L2 penalty."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvopt import _checks, _tree
from curvopt.transforms._masking import refuse_masked_view

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None


def require_model_and_loss(
  optimizer: str, model_fn: Any, loss_fn: Any, params: PyTree = None
) -> tuple[Callable, Callable]:
  """Raises a clear error at trace time when the model or the loss is missing."""
  if model_fn is None or loss_fn is None:
    missing = " and ".join(
      n for n, f in (("model_fn", model_fn), ("loss_fn", loss_fn)) if f is None
    )
    raise TypeError(
      f"{optimizer} needs the model and the loss apart, as the extra arguments model_fn and "
      "loss_fn: call update(grads, state, params, model_fn=lambda p: apply(p, inputs), "
      f"loss_fn=lambda outputs: loss(outputs, targets)); {missing} missing."
    )
  _checks.callable_arg("model_fn", model_fn)
  if params is not None:
    refuse_masked_view(optimizer, params, model_fn)
  return model_fn, _checks.callable_arg("loss_fn", loss_fn)


class GaussNewtonModel(NamedTuple):
  """`f(p) = loss_fn(model_fn(p)) + (l2/2) ||mask * p||^2` and its Gauss-Newton model.

  The penalty's gradient `l2 mask p` and curvature `l2 mask` enter exactly
  (a coupled L2 term, not decoupled weight decay).
  """

  model_fn: Callable[[PyTree], jax.Array]
  loss_fn: Callable[[jax.Array], jax.Array]
  l2: Any = 0.0
  mask: Mask = None

  def penalty_mask(self, params: PyTree) -> PyTree:
    """1.0 where the penalty applies, 0.0 elsewhere, shaped like `params`."""
    mask = self.mask(params) if callable(self.mask) else self.mask
    if mask is None:
      return jax.tree.map(jnp.ones_like, params)
    if jax.tree.structure(mask) != jax.tree.structure(params):
      raise ValueError(
        "l2_mask must be a pytree of booleans with the structure of params (or a function "
        f"returning one).\n  expected: {jax.tree.structure(params)}\n"
        f"  got:      {jax.tree.structure(mask)}"
      )
    return jax.tree.map(
      lambda m, p: jnp.broadcast_to(jnp.asarray(m, p.dtype), p.shape), mask, params
    )

  def penalty_gradient(self, params: PyTree) -> PyTree:
    return jax.tree.map(lambda m, p: self.l2 * m * p, self.penalty_mask(params), params)

  def _penalized(self, loss: jax.Array, params: PyTree) -> jax.Array:
    masked = jax.tree.map(jnp.multiply, self.penalty_mask(params), params)
    return loss + 0.5 * self.l2 * _tree.dot(masked, masked).astype(loss.dtype)

  def value(self, params: PyTree) -> jax.Array:
    return self._penalized(self.loss_fn(self.model_fn(params)), params)

  def value_and_predicted_decrease(
    self, params: PyTree, step: PyTree, damping: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """`f(params)` and `-(g^T s + (s^T G s + damping ||s||^2)/2)`, the damped model's decrease.

    One JVP through the model and one Hessian-vector product of the loss on
    the outputs (somax v1); `f(params)` comes from the same forward pass.
    """
    outputs, j_step = jax.jvp(self.model_fn, (params,), (step,))
    (loss, output_grad), (_, h_j_step) = jax.jvp(
      jax.value_and_grad(self.loss_fn), (outputs,), (j_step,)
    )
    masked_step = jax.tree.map(jnp.multiply, self.penalty_mask(params), step)
    slope = jnp.vdot(output_grad, j_step) + self.l2 * _tree.dot(masked_step, params)
    curvature = jnp.vdot(j_step, h_j_step) + self.l2 * _tree.dot(masked_step, masked_step)
    predicted = -(slope + 0.5 * (curvature + damping * _tree.dot(step, step)))
    return self._penalized(loss, params), predicted
