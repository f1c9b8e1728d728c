"""Argument validation (`curvopt._checks`): what passes, what fails, and each message."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import _checks


def _raises(error, message, fn, *args, **kwargs):
  """`fn(*args)` raises `error` whose message is exactly `message`."""
  with pytest.raises(error) as raised:
    fn(*args, **kwargs)
  assert str(raised.value) == message


def test_static_refuses_arrays_and_tracers_naming_static_args():
  _checks.static("n", 3)
  _checks.static("n", np.int64(3))  # a NumPy scalar is static
  message = (
    "n must be a Python integer: it sets shapes, layouts or loop counts, so it cannot be an "
    "array. Use curvopt.inject_hyperparams(optimizer), which keeps every such argument "
    "static, or pass optax.inject_hyperparams static_args=('n', ...); got "
    "Array(3, dtype=int32)."
  )
  _raises(TypeError, message, _checks.static, "n", jnp.asarray(3, jnp.int32), "a Python integer")
  default = "n must be a Python number: it sets"
  with pytest.raises(TypeError, match=default):
    _checks.static("n", jnp.ones(()))

  def traced(x):
    _checks.static("n", x)

  with pytest.raises(TypeError, match="n must be a Python number"):
    jax.jit(traced)(1.0)


def test_positive_int():
  assert _checks.positive_int("k", 1) == 1
  assert type(_checks.positive_int("k", np.int64(4))) is int
  _raises(ValueError, "k must be a positive integer, got 0.", _checks.positive_int, "k", 0)
  _raises(ValueError, "k must be a positive integer, got -2.", _checks.positive_int, "k", -2)
  _raises(
    TypeError,
    "k must be a positive integer, got True of type bool.",
    _checks.positive_int,
    "k",
    True,
  )
  _raises(
    TypeError,
    "k must be a positive integer, got 2.0 of type float.",
    _checks.positive_int,
    "k",
    2.0,
  )
  with pytest.raises(TypeError, match="k must be a Python integer"):
    _checks.positive_int("k", jnp.asarray(2))


def test_non_negative_float():
  assert (
    _checks.non_negative_float("e", 0) == 0.0 and type(_checks.non_negative_float("e", 0)) is float
  )
  assert _checks.non_negative_float("e", 2.5) == 2.5
  _raises(
    ValueError,
    "e must be a finite number >= 0, got -1e-09.",
    _checks.non_negative_float,
    "e",
    -1e-9,
  )
  _raises(
    ValueError,
    "e must be a finite number >= 0, got nan.",
    _checks.non_negative_float,
    "e",
    float("nan"),
  )
  _raises(
    ValueError,
    "e must be a finite number >= 0, got inf.",
    _checks.non_negative_float,
    "e",
    float("inf"),
  )
  _raises(
    TypeError, "e must be a non-negative number, got False.", _checks.non_negative_float, "e", False
  )
  _raises(
    TypeError, "e must be a non-negative number, got '1'.", _checks.non_negative_float, "e", "1"
  )


def test_flag():
  assert _checks.flag("f", True) is True and _checks.flag("f", False) is False
  _raises(TypeError, "f must be True or False, got 1.", _checks.flag, "f", 1)
  _raises(TypeError, "f must be True or False, got None.", _checks.flag, "f", None)
  with pytest.raises(TypeError, match="f must be True or False: it sets"):
    _checks.flag("f", jnp.asarray(True))


def test_floating_dtype():
  assert _checks.floating_dtype("d", jnp.bfloat16) == jnp.bfloat16
  assert _checks.floating_dtype("d", "float32") == jnp.float32
  _raises(
    TypeError,
    "d must be a floating-point dtype, got int32.",
    _checks.floating_dtype,
    "d",
    jnp.int32,
  )
  _raises(
    TypeError, "d must be a floating-point dtype, got 'fp33'.", _checks.floating_dtype, "d", "fp33"
  )


def test_one_of_and_callable_arg():
  assert _checks.one_of("m", "b", ("a", "b")) == "b"
  _raises(ValueError, "m must be one of 'a', 'b'; got 'c'.", _checks.one_of, "m", "c", ("a", "b"))
  fn = lambda: 0
  assert _checks.callable_arg("fn", fn) is fn
  _raises(TypeError, "fn is required: pass a function, got None.", _checks.callable_arg, "fn", None)
  _raises(TypeError, "fn must be callable, got int.", _checks.callable_arg, "fn", 3)


def test_prng_key_accepts_typed_and_raw_single_keys_only():
  typed, raw = jax.random.key(0), jax.random.PRNGKey(0)
  assert _checks.prng_key("key", typed) is typed and _checks.prng_key("key", raw) is raw
  _raises(
    TypeError,
    "key is required: pass a PRNG key such as jax.random.key(0).",
    _checks.prng_key,
    "key",
    None,
  )
  for bad, text in (
    (jax.random.split(typed, 2), "PRNGKeyArray with shape (2,)"),
    (jnp.zeros(2, jnp.int32), "ArrayImpl with shape (2,)"),
    (jnp.zeros(3, jnp.uint32), "ArrayImpl with shape (3,)"),
    (7, "int with shape None"),
  ):
    _raises(
      TypeError,
      "key must be a single PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); "
      f"got {text}.",
      _checks.prng_key,
      "key",
      bad,
    )


def test_seed_makes_typed_keys_from_integers_keys_and_traced_seeds():
  data = lambda key: np.asarray(jax.random.key_data(key))
  expected = data(jax.random.key(5))
  for value in (5, np.int64(5), jnp.asarray(5), jax.random.key(5), jax.random.PRNGKey(5)):
    key = _checks.seed("seed", value)()
    assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(data(key), expected)
  _checks.seed("seed", 0)
  _checks.seed("seed", 2**63 - 1)
  traced = jax.vmap(lambda s: jax.random.key_data(_checks.seed("seed", s)()))(jnp.arange(2))
  np.testing.assert_array_equal(traced[1], data(jax.random.key(1)))
  bound = "seed must be an integer in [0, 2**63) or a PRNG key, got {}."
  _raises(ValueError, bound.format(-1), _checks.seed, "seed", -1)
  _raises(ValueError, bound.format(2**63), _checks.seed, "seed", 2**63)
  _raises(
    TypeError,
    "seed must be an integer seed or a PRNG key, got 1.5 (float).",
    _checks.seed,
    "seed",
    1.5,
  )
  _raises(
    TypeError,
    "seed must be an integer seed or a PRNG key, got True (bool).",
    _checks.seed,
    "seed",
    True,
  )
  with pytest.raises(TypeError, match="seed must be a single PRNG key"):
    _checks.seed("seed", jnp.ones(2))


def test_float_pytree():
  _checks.float_pytree("p", {"a": jnp.ones(2), "b": jnp.ones((), jnp.bfloat16)})
  _raises(
    ValueError, "p must be a non-empty pytree of arrays, got {}.", _checks.float_pytree, "p", {}
  )
  _raises(TypeError, "p['a'] must be an array, got float.", _checks.float_pytree, "p", {"a": 1.0})
  _raises(
    TypeError,
    "p['a'][1] must have a floating-point dtype (float32, bfloat16, float64, ...), got int32.",
    _checks.float_pytree,
    "p",
    {"a": [jnp.ones(1), jnp.ones(1, jnp.int32)]},
  )


def test_matches_structure():
  like = {"a": jnp.ones((2, 3)), "b": jnp.ones(1)}
  _checks.matches_structure("v", {"a": jnp.zeros((2, 3)), "b": jnp.zeros(1, jnp.complex64)}, like)
  with pytest.raises(ValueError) as raised:
    _checks.matches_structure("v", {"a": jnp.zeros((2, 3))}, like)
  assert str(raised.value).startswith(
    "v must have the same pytree structure as params.\n  expected: "
  )
  assert "\n  got:      PyTreeDef({'a': *})" in str(raised.value)
  _raises(
    ValueError,
    "v['a'] must have shape (2, 3) like probe['a'], got (3, 2).",
    _checks.matches_structure,
    "v",
    {"a": jnp.zeros((3, 2)), "b": jnp.zeros(1)},
    like,
    what="probe",
  )
  _raises(
    ValueError,
    "v['b'] must have shape (1,) like params['b'], got None.",
    _checks.matches_structure,
    "v",
    {"a": jnp.zeros((2, 3)), "b": 1.0},
    like,
  )
  _raises(
    TypeError,
    "v['b'] must have a floating-point dtype, got int32.",
    _checks.matches_structure,
    "v",
    {"a": jnp.zeros((2, 3)), "b": jnp.zeros(1, jnp.int32)},
    like,
  )


def test_scalar_function():
  _checks.scalar_function("f", lambda x: jnp.sum(x), jnp.ones(2))
  _raises(
    ValueError,
    "f must return a scalar array, got a tuple. If it returns (loss, aux), pass "
    "`lambda p: fn(p)[0]` instead.",
    _checks.scalar_function,
    "f",
    lambda x: (jnp.sum(x), x),
    jnp.ones(2),
  )
  _raises(
    ValueError,
    "f must return a scalar array, got a tuple.",
    _checks.scalar_function,
    "f",
    lambda x: (),
    jnp.ones(2),
  )
  _raises(
    ValueError,
    "f must return a scalar array, got a dict.",
    _checks.scalar_function,
    "f",
    lambda x: {"l": x},
    jnp.ones(2),
  )
  _raises(
    ValueError,
    "f must return a scalar (the mean loss), got an array of shape (2,). Reduce it with "
    ".mean() or .sum().",
    _checks.scalar_function,
    "f",
    lambda x: x,
    jnp.ones(2),
  )
  _raises(
    TypeError,
    "f must return a floating-point scalar, got dtype int32.",
    _checks.scalar_function,
    "f",
    lambda x: jnp.int32(1),
    jnp.ones(2),
  )
  with pytest.raises(TypeError, match="f is required"):
    _checks.scalar_function("f", None, jnp.ones(2))


@pytest.mark.parametrize(
  ("value", "expected"),
  [
    (0.5, 0.5),
    (2, 2.0),
    (np.float32(0.25), 0.25),
    (jnp.asarray(0.75), 0.75),
    (np.array(3), 3.0),
    (complex(0.5, 0.0), 0.5),
    (jnp.asarray(0.5 + 0j), 0.5),
    (jnp.ones(2), None),  # not a scalar: not checked
    (lambda count: 0.1, None),  # a schedule
  ],
)
def test_concrete_real_reads_numbers_and_concrete_scalars(value, expected):
  assert _checks._concrete_real("lr", value) == expected


@pytest.mark.parametrize(
  ("value", "error", "message"),
  [
    (
      None,
      TypeError,
      "lr must be a number (or, where documented, a schedule), got None (NoneType).",
    ),
    ("0.1", TypeError, "lr must be a number (or, where documented, a schedule), got '0.1' (str)."),
    (True, TypeError, "lr must be a number (or, where documented, a schedule), got True (bool)."),
    ([0.1], TypeError, "lr must be a number (or, where documented, a schedule), got [0.1] (list)."),
    (
      (0.1,),
      TypeError,
      "lr must be a number (or, where documented, a schedule), got (0.1,) (tuple).",
    ),
    (
      {"a": 1},
      TypeError,
      "lr must be a number (or, where documented, a schedule), got {'a': 1} (dict).",
    ),
    ({1}, TypeError, "lr must be a number (or, where documented, a schedule), got {1} (set)."),
    (b"1", TypeError, "lr must be a number (or, where documented, a schedule), got b'1' (bytes)."),
    (complex(0.1, 1.0), TypeError, "lr must be a real number, got the complex value (0.1+1j)."),
    (
      jnp.asarray(True),
      TypeError,
      "lr must be a number, got the boolean array Array(True, dtype=bool).",
    ),
  ],
)
def test_concrete_real_refuses_what_is_no_number(value, error, message):
  _raises(error, message, _checks._concrete_real, "lr", value)


def test_concrete_real_leaves_tracers_and_non_numeric_arrays_alone():
  seen = []
  jax.jit(lambda x: seen.append(_checks._concrete_real("lr", x)))(1.0)
  assert seen == [None]
  assert _checks._concrete_real("lr", np.array("a")) is None
  with pytest.raises(TypeError, match="complex value"):
    _checks._concrete_real("lr", np.complex64(1 + 2j))


def test_in_range_and_positive_boundaries_and_messages():
  assert _checks.in_range("b", 0.0, 0.0, 1.0) == 0.0
  _raises(ValueError, "b must be in [0.0, 1.0), got 1.0.", _checks.in_range, "b", 1.0, 0.0, 1.0)
  assert _checks.in_range("b", 1.0, 0.0, 1.0, high_inclusive=True) == 1.0
  _raises(
    ValueError,
    "b must be in [0.0, 1.0], got 1.5.",
    _checks.in_range,
    "b",
    1.5,
    0.0,
    1.0,
    high_inclusive=True,
  )
  _raises(ValueError, "b must be in [0.0, 1.0), got -0.1.", _checks.in_range, "b", -0.1, 0.0, 1.0)
  _raises(
    ValueError, "b must be in [0.0, 1.0), got nan.", _checks.in_range, "b", float("nan"), 0.0, 1.0
  )
  schedule = lambda count: 2.0
  assert _checks.in_range("b", schedule, 0.0, 1.0) is schedule
  assert _checks.positive("r", 1e-300) == 1e-300
  _raises(ValueError, "r must be a finite number > 0, got 0.0.", _checks.positive, "r", 0.0)
  _raises(
    ValueError,
    "r must be a finite number > 0 (why), got inf.",
    _checks.positive,
    "r",
    float("inf"),
    " (why)",
  )
  _raises(
    ValueError, "r must be a finite number > 0, got nan.", _checks.positive, "r", float("nan")
  )
  assert _checks.positive("r", schedule) is schedule


@pytest.mark.parametrize(
  ("name", "inside", "outside"),
  [
    ("learning_rate", 1e9, -1e-9),
    ("b1", 0.999, 1.0),
    ("b2", 0.0, 1.0),
    ("eps", 0.0, -1e-12),
    ("weight_decay", 5.0, -0.5),
    ("gamma", 0.0, float("inf")),
  ],
)
def test_shared_hyperparameters_ranges(name, inside, outside):
  _checks.shared_hyperparameters(**{name: inside})
  low, high = {"b1": (0.0, 1.0), "b2": (0.0, 1.0)}.get(name, (0.0, float("inf")))
  with pytest.raises(
    ValueError, match=re.escape(f"{name} must be in [{low}, {high}), got {outside}.")
  ):
    _checks.shared_hyperparameters(**{name: outside})


def test_range_checks_name_the_argument_of_a_non_number():
  for check, args in ((_checks.positive, ()), (_checks.in_range, (0.0, 1.0))):
    with pytest.raises(TypeError, match=r"^rate must be a number \(or, where documented"):
      check("rate", "0.1", *args)


def test_scalar_function_accepts_every_floating_scalar():
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
    _checks.scalar_function("f", lambda x, dtype=dtype: jnp.sum(x).astype(dtype), jnp.ones(2))


def test_numpy_seeds_and_unknown_objects():
  data = lambda key: np.asarray(jax.random.key_data(key))
  expected = data(jax.random.key(5))
  np.testing.assert_array_equal(data(_checks.seed("seed", np.array(5))()), expected)  # 0-d
  raw = np.asarray(jax.random.key_data(jax.random.key(5)))  # a raw key as a NumPy array
  np.testing.assert_array_equal(data(_checks.seed("seed", raw)()), expected)
  assert _checks._concrete_real("lr", object()) is None  # cannot be checked: passed on
