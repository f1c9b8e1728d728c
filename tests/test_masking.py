"""curvopt.masked and curvopt.multi_transform: what the inner transform receives."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt.transforms._masking import holds_masked_leaves, refuse_masked_view

PARAMS = {"w": jnp.asarray([1.0, 2.0]), "b": jnp.asarray(3.0)}
LOSS_FIRST = ("value_fn", "model_fn", "group_value_fn")


def _recording(seen: list):
  """An inner transform that records its params and extra arguments, and returns -updates."""

  def update(updates, state, params=None, **extra):
    seen.append((params, extra))
    return optax.tree.scale(-1.0, updates), state

  return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def _sum_all(p, scale=1.0):
  return scale * (jnp.sum(p["w"]) + 10.0 * p["b"])


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_every_loss_closure_sees_the_full_parameters_and_keeps_its_arguments(wrapper):
  seen = []
  if wrapper == "masked":
    tx = curvopt.masked(_recording(seen), {"w": True, "b": False})
  else:
    tx = curvopt.multi_transform(
      {"in": _recording(seen), "out": optax.sgd(1.0)}, {"w": "in", "b": "out"}
    )
  grads = {"w": jnp.ones(2), "b": jnp.asarray(5.0)}
  extra = {key: _sum_all for key in LOSS_FIRST}
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS, loss_fn=_sum_all, **extra)
  np.testing.assert_array_equal(updates["w"], -grads["w"])
  ((inner_params, inner_extra),) = seen
  assert isinstance(inner_params["b"], optax.MaskedNode)
  assert "_curvopt_full_params" not in inner_extra
  for key in LOSS_FIRST:
    fn = inner_extra[key]
    assert fn.takes_masked_view
    # The masked-out b comes back at its value (30), the inner leaf as given (w + 1).
    view = {"w": inner_params["w"] + 1.0, "b": optax.MaskedNode()}
    assert float(fn(view)) == 5.0 + 30.0
    assert float(fn(view, scale=2.0)) == 70.0
    assert float(fn(view, 3.0)) == 105.0
  # loss_fn takes outputs, not parameters: passed as it is.
  assert inner_extra["loss_fn"] is _sum_all


def test_no_params_or_no_callable_closure_is_passed_through_untouched():
  seen = []
  tx = curvopt.masked(_recording(seen), {"w": True, "b": False})
  state = tx.init(PARAMS)
  tx.update({"w": jnp.ones(2), "b": jnp.ones(())}, state, None, value_fn=_sum_all)
  params, extra = seen[-1]
  assert params is None and extra["value_fn"] is _sum_all
  tx.update({"w": jnp.ones(2), "b": jnp.ones(())}, state, PARAMS, value_fn=None, model_fn=3)
  _, extra = seen[-1]
  assert extra["value_fn"] is None and extra["model_fn"] == 3


def test_mask_compatible_extra_args_is_passed_to_optax():
  seen = []
  per_leaf = {"w": jnp.full(2, 7.0), "b": jnp.asarray(8.0)}
  for default in (
    curvopt.masked(_recording(seen), {"w": True, "b": False}),
    curvopt.multi_transform(
      {"in": _recording(seen), "out": optax.sgd(1.0)}, {"w": "in", "b": "out"}
    ),
  ):
    default.update(
      {"w": jnp.ones(2), "b": jnp.ones(())}, default.init(PARAMS), PARAMS, weights=per_leaf
    )
    assert seen[-1][1]["weights"] is per_leaf  # by default, extra arguments pass unmasked
  seen.clear()
  tx = curvopt.masked(_recording(seen), {"w": True, "b": False}, mask_compatible_extra_args=True)
  tx.update({"w": jnp.ones(2), "b": jnp.ones(())}, tx.init(PARAMS), PARAMS, weights=per_leaf)
  _, extra = seen[-1]
  assert isinstance(extra["weights"]["b"], optax.MaskedNode)  # masked like the params
  seen.clear()
  tx = curvopt.multi_transform(
    {"in": _recording(seen), "out": optax.sgd(1.0)},
    {"w": "in", "b": "out"},
    mask_compatible_extra_args=True,
  )
  tx.update({"w": jnp.ones(2), "b": jnp.ones(())}, tx.init(PARAMS), PARAMS, weights=per_leaf)
  _, extra = seen[-1]
  assert isinstance(extra["weights"]["b"], optax.MaskedNode)


def test_masked_view_detection_and_the_refusal_message():
  view = {"w": jnp.ones(2), "b": optax.MaskedNode()}
  assert holds_masked_leaves(view) and not holds_masked_leaves(PARAMS)
  assert not holds_masked_leaves({})
  refuse_masked_view("sophia_h", PARAMS, _sum_all)  # full parameters: accepted
  wrapped = lambda p: _sum_all(p)
  wrapped.takes_masked_view = True
  refuse_masked_view("sophia_h", view, wrapped)  # completed by curvopt.masked: accepted
  with pytest.raises(TypeError) as refused:
    refuse_masked_view("sophia_h", view, _sum_all)
  assert str(refused.value) == (
    "sophia_h evaluates the loss, which needs every parameter, but it runs inside "
    "optax.masked or optax.multi_transform and sees only its own leaves: use "
    "curvopt.masked or curvopt.multi_transform (same arguments), which give value_fn "
    "and model_fn the full parameters."
  )
