"""A state's bytes from shapes alone, and the refusal of a state out of all proportion."""

import jax
import jax.numpy as jnp
import optax
import pytest

import curvopt
from curvopt.transforms import _state_size
from curvopt.transforms._state_size import refuse_unaffordable_state, state_size

F32 = jnp.float32


def _shaped_state(**leaves):
  """A transform whose state has `leaves` (shapes, float32) under tracing and is None otherwise.

  `state_size` reads the state through `jax.eval_shape`, so a refusal test can describe a
  state of many gigabytes that is never allocated.
  """

  def init(params):
    if any(isinstance(p, jax.core.Tracer) for p in jax.tree.leaves(params)):
      return {name: jnp.zeros(shape, F32) for name, shape in leaves.items()}
    return None

  return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def test_state_size_counts_every_leaf_by_path_keys_at_eight_bytes_and_python_scalars():
  tx = optax.GradientTransformation(
    lambda p: {"key": jax.random.key(0), "keys": jax.random.split(jax.random.key(1), 3), "m": p},
    lambda u, s, p=None: (u, s),
  )
  params = {"w": jnp.zeros((2, 3), jnp.bfloat16), "s": 1.5}
  size = state_size(tx, params)
  assert size.leaves == {"['key']": 8, "['keys']": 24, "['m']['s']": 8, "['m']['w']": 12}
  assert size.total_bytes == 52
  # A Python float has no dtype (no bytes of its own) but is one parameter.
  assert size.parameter_bytes == 12 and size.num_parameters == 7
  assert size.bytes_per_parameter == 52 / 7


def test_bytes_per_parameter_of_an_empty_model_is_the_state_bytes():
  counter = optax.GradientTransformation(lambda p: jnp.zeros((), F32), lambda u, s, p=None: (u, s))
  size = state_size(counter, {})
  assert size.num_parameters == 0 and size.total_bytes == 4
  assert size.bytes_per_parameter == 4.0


@pytest.mark.parametrize(
  ("n", "text"),
  [
    (0, "0 bytes"),
    (999, "999 bytes"),
    (1000, "1.00 kB"),
    (999_999, "1000.00 kB"),
    (10**6, "1.00 MB"),
    (2.5e9, "2.50 GB"),
    (10**9, "1.00 GB"),
  ],
)
def test_human_sizes_use_decimal_units(n, text):
  assert _state_size._human(n) == text


def test_a_state_over_a_gibibyte_and_64_times_the_parameters_is_refused_with_its_pieces():
  tx = refuse_unaffordable_state(
    _shaped_state(small=(3,), big=(2**28 + 1,)), "toy", "Lower `big_size`."
  )
  params = {"w": jax.ShapeDtypeStruct((4,), F32)}
  message = (
    "toy: the optimizer state would take 1.07 GB for 16 bytes of parameters "
    "(268435460 bytes per parameter; the largest piece, state['big'], is 1.07 GB). "
    "Lower `big_size`. (curvopt.state_size sizes a state before init.)"
  )
  with pytest.raises(ValueError) as refused:
    tx.init(params)
  assert str(refused.value) == message


@pytest.mark.parametrize(
  ("state_entries", "param_entries", "refused"),
  [
    (2**28, 1, False),  # exactly 1 GiB: not over it
    (2**28 + 1, 1, True),
    (2**28 + 1, 0, True),  # no parameters at all: any state over 1 GiB
    (2**31, 2**25, False),  # 8 GiB, exactly 64 times the parameters
    (2**31 + 1, 2**25, True),
  ],
)
def test_the_refusal_needs_both_over_a_gibibyte_and_over_64_times(
  state_entries, param_entries, refused
):
  tx = refuse_unaffordable_state(_shaped_state(s=(state_entries,)), "toy", "")
  params = {"w": jax.ShapeDtypeStruct((param_entries,), F32)}
  if refused:
    with pytest.raises(ValueError, match="toy: the optimizer state would take"):
      tx.init(params)
  else:
    assert tx.init(params) is None  # reached the inner init


def test_the_refusing_wrapper_keeps_extra_args_and_the_inner_update():
  tx = refuse_unaffordable_state(optax.adam(0.5), "adam", "")
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  updates, _ = tx.update({"w": jnp.ones(3)}, state, params, value=1.0)
  expected, _ = optax.adam(0.5).update({"w": jnp.ones(3)}, optax.adam(0.5).init(params), params)
  assert jnp.array_equal(updates["w"], expected["w"])
  assert curvopt.state_size(tx, params).total_bytes == 3 * 8 * 2 + 4
