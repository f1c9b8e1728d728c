"""Argument validation shared by every layer.

Each check runs at trace time on static information (shapes, dtypes, Python
values), so it costs nothing inside a compiled step and turns what would be a
traceback from deep inside XLA into a message that names the argument.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def static(name: str, value: Any, what: str = "a Python number") -> None:
  """Raises, naming `static_args`, when a structural hyperparameter arrives as an array."""
  if isinstance(value, jax.Array | jax.core.Tracer):
    raise TypeError(
      f"{name} must be {what}: it sets shapes, layouts or loop counts, so it cannot be an "
      f"array. Use curvopt.inject_hyperparams(optimizer), which keeps every such argument "
      f"static, or pass optax.inject_hyperparams static_args=({name!r}, ...); got {value!r}."
    )


def positive_int(name: str, value: Any) -> int:
  """Returns `value` if it is a positive Python integer, else raises."""
  static(name, value, "a Python integer")
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}."
    )
  if value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value}.")
  return int(value)


def non_negative_float(name: str, value: Any) -> float:
  """Returns `value` as a float if it is a finite number >= 0, else raises."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a non-negative number, got {value!r}.")
  if not value >= 0 or value == float("inf"):
    raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
  return float(value)


def flag(name: str, value: Any) -> bool:
  """Checks a Python-level switch: `True` or `False`, nothing that merely looks truthy."""
  static(name, value, "True or False")
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be True or False, got {value!r}.")
  return value


def floating_dtype(name: str, value: Any) -> jnp.dtype:
  """Returns `value` as a floating-point dtype (`jnp.bfloat16`, "float32", ...), else raises."""
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{name} must be a floating-point dtype, got {value!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point dtype, got {dtype}.")
  return dtype


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
  """Returns `value` if it is one of `choices`, else raises naming them."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
  return value


def callable_arg(name: str, fn: Any) -> Callable:
  """Returns `fn` if it is callable, else raises (a missing function is common)."""
  if fn is None:
    raise TypeError(f"{name} is required: pass a function, got None.")
  if not callable(fn):
    raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
  return fn


def prng_key(name: str, key: Any) -> jax.Array:
  """Returns `key` if it is a JAX PRNG key (typed or raw uint32[2]), else raises."""
  if key is None:
    raise TypeError(f"{name} is required: pass a PRNG key such as jax.random.key(0).")
  if isinstance(key, jax.Array) or hasattr(key, "dtype"):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
      return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
      return key
  raise TypeError(
    f"{name} must be a single PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); "
    f"got {type(key).__name__} with shape {getattr(key, 'shape', None)}."
  )


def seed(name: str, value: Any) -> Callable[[], jax.Array]:
  """Checks an integer seed in [0, 2**63) or a PRNG key; returns `() -> typed key`.

  Checked when the optimizer is built, so `seed="abc"` or `seed=1.5` fails
  there rather than at the first update. The key is made when called (inside
  `init`), so building an optimizer creates no array.
  """
  if isinstance(value, jax.Array) or hasattr(value, "dtype"):
    if jnp.issubdtype(value.dtype, jnp.integer) and value.shape == ():  # traced seeds (vmap)
      return lambda: jax.random.key(value)
    key = prng_key(name, value)
    return lambda: (
      key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else (jax.random.wrap_key_data(key))
    )
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"{name} must be an integer seed or a PRNG key, got {value!r} ({type(value).__name__})."
    )
  if not 0 <= value < 2**63:
    raise ValueError(f"{name} must be an integer in [0, 2**63) or a PRNG key, got {value}.")
  return lambda: jax.random.key(int(value))


def float_pytree(name: str, tree: Any) -> None:
  """Raises unless `tree` is a non-empty pytree of floating-point arrays."""
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves_with_paths:
    raise ValueError(f"{name} must be a non-empty pytree of arrays, got {tree!r}.")
  for path, leaf in leaves_with_paths:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      raise TypeError(
        f"{name}{jax.tree_util.keystr(path)} must be an array, got {type(leaf).__name__}."
      )
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"{name}{jax.tree_util.keystr(path)} must have a floating-point dtype "
        f"(float32, bfloat16, float64, ...), got {dtype}."
      )


def matches_structure(name: str, tree: Any, structure: Any, *, what: str = "params") -> None:
  """Raises unless `tree` has the pytree structure and leaf shapes of `structure`."""
  expected_def = jax.tree.structure(structure)
  actual_def = jax.tree.structure(tree)
  if expected_def != actual_def:
    raise ValueError(
      f"{name} must have the same pytree structure as {what}.\n"
      f"  expected: {expected_def}\n  got:      {actual_def}"
    )
  expected = jax.tree_util.tree_flatten_with_path(structure)[0]
  for (path, spec), leaf in zip(expected, jax.tree.leaves(tree), strict=True):
    shape = getattr(leaf, "shape", None)
    if shape is None or tuple(shape) != tuple(spec.shape):
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} must have shape {tuple(spec.shape)} like "
        f"{what}{jax.tree_util.keystr(path)}, got {shape}."
      )
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
        f"{name}{jax.tree_util.keystr(path)} must have a floating-point dtype, got {leaf.dtype}."
      )


def scalar_function(name: str, fn: Callable, *args: Any) -> None:
  """Raises unless `fn(*args)` returns one real floating-point scalar (checked abstractly)."""
  callable_arg(name, fn)
  out = jax.eval_shape(fn, *args)
  if not isinstance(out, jax.ShapeDtypeStruct):
    hint = ""
    if isinstance(out, tuple) and out:
      hint = " If it returns (loss, aux), pass `lambda p: fn(p)[0]` instead."
    raise ValueError(f"{name} must return a scalar array, got a {type(out).__name__}.{hint}")
  if out.shape != ():
    raise ValueError(
      f"{name} must return a scalar (the mean loss), got an array of shape {out.shape}. "
      "Reduce it with .mean() or .sum()."
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"{name} must return a floating-point scalar, got dtype {out.dtype}.")


def _concrete_real(name: str, value: Any) -> float | None:
  """`value` as a float when it is a concrete real number, None when it cannot be checked.

  Python and NumPy numbers and concrete 0-d arrays (`jnp.asarray(0.1)`,
  `np.array(0.1)`) are checked like numbers; tracers (under
  `optax.inject_hyperparams`), schedules and arrays of other shapes are not.
  None, strings, booleans, containers and complex values with an imaginary
  part are errors that name the argument: optax reads `learning_rate=None` as
  "no scaling", which here would step up the gradient.
  """
  if value is None or isinstance(value, str | bytes | bool | list | tuple | dict | set):
    raise TypeError(
      f"{name} must be a number (or, where documented, a schedule), got {value!r} "
      f"({type(value).__name__})."
    )
  if isinstance(value, jax.core.Tracer) or callable(value):
    return None
  if isinstance(value, jax.Array | np.ndarray | np.generic):
    if value.shape != () or not (
      jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(value.dtype, jnp.bool_)
    ):
      return None
    if jnp.issubdtype(value.dtype, jnp.bool_):
      raise TypeError(f"{name} must be a number, got the boolean array {value!r}.")
    value = complex(value) if jnp.issubdtype(value.dtype, jnp.complexfloating) else float(value)
  if isinstance(value, complex):
    if value.imag != 0:
      raise TypeError(f"{name} must be a real number, got the complex value {value!r}.")
    return value.real
  return float(value) if isinstance(value, numbers.Real) else None


def in_range(
  name: str, value: Any, low: float, high: float, *, high_inclusive: bool = False
) -> Any:
  """Checks a hyperparameter given as a Python number (traced values pass through).

  Under `optax.inject_hyperparams` hyperparameters arrive as arrays, which
  cannot be checked at trace time; plain numbers can, and should fail here
  rather than as a silent NaN later. NaN is out of every range.
  """
  real = _concrete_real(name, value)
  if real is None:
    return value
  below_high = real <= high if high_inclusive else real < high
  if not (low <= real and below_high):  # written so that NaN fails
    bracket = "]" if high_inclusive else ")"
    raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}.")
  return value


def positive(name: str, value: Any, why: str = "") -> Any:
  """Checks that a hyperparameter given as a Python number is > 0 (traced values pass through)."""
  real = _concrete_real(name, value)
  if real is None:
    return value
  if not real > 0 or real == float("inf"):
    raise ValueError(f"{name} must be a finite number > 0{why}, got {value}.")
  return value


# Why a denominator's epsilon must be > 0, for the messages of the optimizers that divide.
EPS_IS_A_FLOOR = (
  " (it keeps the denominator away from zero: with eps=0 a parameter the loss does not"
  " use gets 0/0 and every step is skipped)"
)

# The ranges of the hyperparameters the named optimizers share.
_SHARED_RANGES = {
  "learning_rate": (0.0, float("inf")),
  "b1": (0.0, 1.0),
  "b2": (0.0, 1.0),
  "eps": (0.0, float("inf")),
  "weight_decay": (0.0, float("inf")),
  "gamma": (0.0, float("inf")),
}


def shared_hyperparameters(**values: Any) -> None:
  """Checks by name the hyperparameters named optimizers share (`learning_rate`, `b1`, ...)."""
  for name, value in values.items():
    low, high = _SHARED_RANGES[name]
    in_range(name, value, low, high)
