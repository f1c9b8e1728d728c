"""`optax.masked` and `optax.multi_transform` for optimizers that evaluate the loss.

Inside `optax.masked`, the inner transform sees the parameters with the
masked-out leaves replaced by `optax.MaskedNode()`, but a loss closure such as
`value_fn` (or EGN's `model_fn`) needs every parameter. These wrappers hand
the inner transform closures that put the masked-out leaves back, held fixed,
so its curvature is the block of the full problem on the leaves it owns: the
same optimizer as on the sub-tree with the other parameters frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

PyTree = Any

# Extra arguments whose first argument is the parameter tree.
_PARAMS_FIRST = ("value_fn", "model_fn", "group_value_fn")


class _FullParams:
  """The unmasked parameters, as a leaf so that `mask_compatible_extra_args` leaves it alone."""

  def __init__(self, params: PyTree):
    self.params = params


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def holds_masked_leaves(params: PyTree) -> bool:
  """Whether `params` is the view of an inner transform under `optax.masked`."""
  return any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked))


def refuse_masked_view(optimizer: str, params: PyTree, fn: Callable) -> None:
  """Raises when a loss-evaluating optimizer runs under plain `optax.masked`."""
  if not getattr(fn, "takes_masked_view", False) and holds_masked_leaves(params):
    raise TypeError(
      f"{optimizer} evaluates the loss, which needs every parameter, but it runs inside "
      "optax.masked or optax.multi_transform and sees only its own leaves: use "
      "curvopt.masked or curvopt.multi_transform (same arguments), which give value_fn "
      "and model_fn the full parameters."
    )


def _on_full_params(fn: Callable, full_params: PyTree) -> Callable:
  def on_sub_tree(sub_params, *args, **kwargs):
    merged = jax.tree.map(
      lambda s, p: p if _is_masked(s) else s, sub_params, full_params, is_leaf=_is_masked
    )
    return fn(merged, *args, **kwargs)

  on_sub_tree.takes_masked_view = True
  return on_sub_tree


def _completing(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs under `optax.masked`: rewrites the loss closures to take the masked view."""
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, *, _curvopt_full_params=None, **extra_args):
    # Given only with params (see `_passing_full_params`).
    if _curvopt_full_params is not None:
      for key in _PARAMS_FIRST:
        if callable(extra_args.get(key)):
          extra_args[key] = _on_full_params(extra_args[key], _curvopt_full_params.params)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update)


def _passing_full_params(
  tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  def update(updates, state, params=None, **extra_args):
    if params is not None:
      extra_args["_curvopt_full_params"] = _FullParams(params)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def masked(
  inner: optax.GradientTransformation,
  mask: PyTree | Callable[[PyTree], PyTree],
  *,
  mask_compatible_extra_args: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """`optax.masked` whose inner optimizer may evaluate the loss on the full parameters.

  Same arguments and state as `optax.masked`. The inner transform's
  `value_fn`, `group_value_fn` and `model_fn` receive the full parameter tree:
  its own leaves as it sees them and the masked-out leaves at their current
  values. A Hessian-vector product is therefore the block of the full
  Hessian on the masked-in leaves, as if the optimizer ran on that sub-tree
  with the rest frozen.

  Examples:
    >>> import jax.numpy as jnp, optax, curvopt
    >>> params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    >>> loss = lambda p: jnp.sum((p["w"] - 2.0) ** 2) + p["w"].sum() * p["b"]
    >>> tx = curvopt.masked(curvopt.adahessian(0.1), {"w": True, "b": False})
    >>> grads = jax.grad(loss)(params)
    >>> updates, _ = tx.update(grads, tx.init(params), params, value_fn=loss)
    >>> float(updates["b"]) == float(grads["b"])  # masked-out leaves pass through
    True
  """
  return _passing_full_params(
    optax.masked(_completing(inner), mask, mask_compatible_extra_args=mask_compatible_extra_args)
  )


def multi_transform(
  transforms: Mapping[Any, optax.GradientTransformation],
  param_labels: PyTree | Callable[[PyTree], PyTree],
  *,
  mask_compatible_extra_args: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """`optax.multi_transform` whose optimizers may evaluate the loss on the full parameters.

  Same arguments and state as `optax.multi_transform`; each group's
  `value_fn`, `group_value_fn` and `model_fn` see the full parameter tree,
  as in `curvopt.masked`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    >>> loss = lambda p: jnp.sum((p["w"] - 2.0) ** 2) + p["b"] ** 2
    >>> groups = {"curved": curvopt.sophia_h(0.1), "plain": optax.adam(0.1)}
    >>> tx = curvopt.multi_transform(groups, {"w": "curved", "b": "plain"})
    >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)
    >>> sorted(updates)
    ['b', 'w']
  """
  wrapped = {label: _completing(tx) for label, tx in transforms.items()}
  return _passing_full_params(
    optax.multi_transform(
      wrapped, param_labels, mask_compatible_extra_args=mask_compatible_extra_args
    )
  )
