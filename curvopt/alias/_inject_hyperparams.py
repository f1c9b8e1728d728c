"""`optax.inject_hyperparams` with each optimizer's structural arguments kept static."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import optax

from curvopt.alias._egn import egn

# Annotations of the arguments that are numbers (or schedules) an optimizer reads at run
# time: these become injected hyperparameters; every other argument is structural.
_NUMERIC = {"float", "optax.ScalarOrSchedule", "None"}

# Floats that decide shapes or code paths all the same: PSGD's diagonal-or-dense choice
# per axis compares dimensions against `max_skew`; EGN's `momentum=0` leaves the momentum
# transform (and its state) out of the chain.
_STRUCTURAL_FLOATS = {"max_skew"}
_STRUCTURAL_FLOATS_OF = {egn: {"momentum"}}


def _is_numeric(parameter: inspect.Parameter) -> bool:
  annotation = parameter.annotation
  if annotation is inspect.Parameter.empty:  # by the default's type, as optax does
    default = parameter.default
    return default is inspect.Parameter.empty or (
      isinstance(default, float | int) and not isinstance(default, bool)
    )
  if not isinstance(annotation, str):  # annotations are strings in curvopt's modules
    annotation = getattr(annotation, "__name__", repr(annotation))
  return {part.strip() for part in annotation.split("|")} <= _NUMERIC


def structural_args(factory: Callable[..., Any]) -> tuple[str, ...]:
  """The arguments of `factory` that `optax.inject_hyperparams` must keep static.

  Integers (refresh periods, block sizes, ranks, seeds), switches, strings,
  functions, tuples, meshes and optimizers set shapes, loop counts or code
  paths, so they cannot become arrays; floats and schedules can. Read from the
  factory's signature, so it holds for every named optimizer and for
  functions written like them.

  Examples:
    >>> import curvopt
    >>> curvopt.structural_args(curvopt.sophia_h)
    ('refresh_every', 'seed', 'state_dtype')

  References:
    optax's `inject_hyperparams` (its `static_args`).
  """
  parameters = inspect.signature(factory).parameters.values()
  floats = _STRUCTURAL_FLOATS | _STRUCTURAL_FLOATS_OF.get(factory, set())
  return tuple(
    p.name
    for p in parameters
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and (p.name in floats or not _is_numeric(p))
  )


def inject_hyperparams(
  factory: Callable[..., optax.GradientTransformation],
  static_args: Iterable[str] = (),
  hyperparam_dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """`optax.inject_hyperparams(factory)` with `structural_args(factory)` static.

  `optax.inject_hyperparams(curvopt.soap)` turns every number into an array,
  the block size and the refresh period included, and fails on the first of
  them; this passes all of them as `static_args` (plus any given), so a
  learning rate can be scheduled or changed in the state like `optax.adam`'s.
  Injected hyperparameters are stored in the parameters' dtype (optax's rule):
  in float32 a value such as `b2=0.95` is rounded.

  Examples:
    >>> import jax.numpy as jnp, optax, curvopt
    >>> opt = curvopt.inject_hyperparams(curvopt.soap)(learning_rate=3e-3)
    >>> state = opt.init({"w": jnp.ones((3, 4))})
    >>> state.hyperparams["learning_rate"] = jnp.asarray(1e-3)
    >>> sorted(state.hyperparams)[:3]
    ['b1', 'b2', 'eps']

  References:
    optax's `inject_hyperparams`.
  """
  static = tuple(dict.fromkeys((*structural_args(factory), *static_args)))
  return optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=hyperparam_dtype)
