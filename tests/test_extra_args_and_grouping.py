"""The value_fn requirement of loss-evaluating transforms, and PSGD's grouped vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.transforms._extra_args import require_value_fn
from curvopt.transforms.psgd._grouping import group_indices, map_grouped


def test_a_missing_value_fn_names_the_optimizer_and_every_way_to_pass_it():
  with pytest.raises(TypeError) as raised:
    require_value_fn("sophia_h", None)
  assert str(raised.value) == (
    "sophia_h needs the loss as an extra argument: call "
    "update(grads, state, params, value_fn=lambda p: loss(p, batch)), where value_fn "
    "returns the scalar loss of the current batch (with flax.nnx, build it with "
    "curvopt.nnx.value_fn(model, loss_fn)). flax.linen's TrainState.apply_gradients "
    "cannot forward value_fn: use curvopt.linen.apply_gradients(state, grads=grads, "
    "value_fn=...)."
  )
  with pytest.raises(TypeError, match="value_fn must be callable, got float"):
    require_value_fn("sophia_h", 1.0)


def test_value_fn_is_checked_abstractly_only_with_params_and_with_aux():
  params = jnp.ones(3)
  calls = []

  def loss(p):
    calls.append(type(p))
    return jnp.sum(p)

  assert require_value_fn("sam", loss) is loss and calls == []  # no params: not called
  assert require_value_fn("sam", loss, params) is loss
  assert len(calls) == 1 and issubclass(calls[0], jax.core.Tracer)  # abstract evaluation only
  with_aux = lambda p: (jnp.sum(p), {"acc": p})
  assert require_value_fn("sam", with_aux, params, has_aux=True) is with_aux
  with pytest.raises(ValueError, match=r"sam's value_fn must return a scalar array, got a tuple"):
    require_value_fn("sam", with_aux, params)
  with pytest.raises(ValueError, match=r"sam's value_fn must return a scalar \(the mean loss\)"):
    require_value_fn("sam", lambda p: p, params)
  with pytest.raises(TypeError, match="sam evaluates the loss, which needs every parameter"):
    require_value_fn("sam", loss, {"w": params, "b": optax.MaskedNode()})


def test_group_indices_in_order_of_first_appearance():
  assert group_indices([(2, 3), (4,), (2, 3), (4,), (1,)]) == [[0, 2], [1, 3], [4]]
  assert group_indices([]) == []


def test_map_grouped_equals_the_plain_loop_with_one_trace_per_group():
  traces = []

  def fn_for(i):
    scale = float(i + 1)  # only the group's first index chooses the function

    def fn(x, y):
      traces.append(x.shape)
      return {"sum": x * scale + y, "norm": jnp.sum(x**2)}

    return fn

  xs = [jnp.arange(6.0).reshape(2, 3) + i for i in range(4)] + [jnp.arange(2.0)]
  ys = [x * 0.5 for x in xs]
  groups = group_indices([x.shape for x in xs])
  out = map_grouped(fn_for, groups, xs, ys)
  assert groups == [[0, 1, 2, 3], [4]]
  for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
    scale = 1.0 if i < 4 else 5.0
    np.testing.assert_array_equal(out[i]["sum"], x * scale + y)
    np.testing.assert_array_equal(out[i]["norm"], jnp.sum(x**2))
  # One trace for the group of four (batched: a leading axis is invisible inside vmap),
  # one for the single entry.
  assert traces == [(2, 3), (2,)]


def test_a_completed_value_fn_is_accepted_on_the_masked_view():
  view = {"w": jnp.ones(3), "b": optax.MaskedNode()}

  def completed(p):  # as curvopt.masked hands it over: it puts the masked leaves back
    return jnp.sum(p["w"])

  completed.takes_masked_view = True
  assert require_value_fn("sam", completed, view) is completed


def test_map_grouped_handles_a_single_entry_before_a_pair():
  xs = [jnp.arange(3.0), jnp.ones((2, 2)), 2 * jnp.ones((2, 2))]
  groups = group_indices([x.shape for x in xs])
  assert groups == [[0], [1, 2]]
  out = map_grouped(lambda i: lambda x: x + 1.0, groups, xs)
  for x, y in zip(xs, out, strict=True):
    np.testing.assert_array_equal(y, x + 1.0)
