"""An optimizer state's bytes before it exists, and a refusal of a state no one meant."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

PyTree = Any

# A state is refused when it is both this large and this many times the parameters:
# Kronecker factors of square blocks cost 2-4x the parameters, Adam 2x; a vector
# preconditioned by a dense 1024 x 1024 factor per 1024 entries costs 1024x.
_REFUSED_BYTES = 2**30
_REFUSED_RATIO = 64


class StateSize(NamedTuple):
  """Bytes of an optimizer state, computed from shapes alone.

  Attributes:
    total_bytes: every array of the state.
    parameter_bytes: every array of the parameters.
    num_parameters: entries of the parameters.
    leaves: bytes per state leaf, keyed by its path in the state (`jax.tree_util.keystr`).
  """

  total_bytes: int
  parameter_bytes: int
  num_parameters: int
  leaves: dict[str, int]

  @property
  def bytes_per_parameter(self) -> float:
    """State bytes per parameter entry (float32 Adam: 8)."""
    return self.total_bytes / max(self.num_parameters, 1)


def _human(n: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} bytes"


def _nbytes(x: Any) -> int:
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return 0
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return math.prod(x.shape) * 8  # two uint32 words per threefry key
  return math.prod(x.shape) * np.dtype(dtype).itemsize


def state_size(optimizer: optax.GradientTransformation, params: PyTree) -> StateSize:
  """The bytes `optimizer.init(params)` would allocate, without allocating them.

  `params` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from
  `jax.eval_shape(model.init, key)`): the state's shapes come from
  `jax.eval_shape(optimizer.init, params)`, so a model too large for the
  machine can be sized on it. Sharding is not applied: these are global bytes
  (divide by the devices a leaf is sharded over for the per-device share).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    >>> round(curvopt.state_size(optax.adam(1e-3), params).bytes_per_parameter, 1)
    8.0
    >>> round(curvopt.state_size(curvopt.soap(1e-3), params).bytes_per_parameter, 1)
    24.0

  References:
    JAX's `jax.eval_shape` (abstract evaluation: shapes and dtypes only).
  """
  shapes = jax.eval_shape(optimizer.init, params)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  leaves = {jax.tree_util.keystr(path): _nbytes(leaf) for path, leaf in flat}
  param_leaves = jax.tree.leaves(params)
  return StateSize(
    total_bytes=sum(leaves.values()),
    parameter_bytes=sum(_nbytes(p) for p in param_leaves),
    num_parameters=sum(math.prod(np.shape(p)) for p in param_leaves),
    leaves=leaves,
  )


def refuse_unaffordable_state(
  inner: optax.GradientTransformation, name: str, lowers: str
) -> optax.GradientTransformationExtraArgs:
  """`inner`, whose `init` first refuses a state out of all proportion to the parameters.

  A state over 1 GiB and over 64 times the parameters' bytes is refused before
  anything is allocated, with its size, its largest leaf and `lowers` (the
  arguments that shrink it): such a state comes from a setting meant for
  another shape (a dense factor over a long vector, a window of gradients far
  beyond the parameter count), not from a model that is simply large.

  Examples:
    >>> import jax.numpy as jnp, optax, curvopt
    >>> tx = curvopt.transforms.refuse_unaffordable_state(
    ...   optax.adam(0.1), "adam", "Lower nothing: Adam is 8 bytes a parameter.")
    >>> state = tx.init(jnp.zeros(10**6))  # 8 MB: accepted

  References:
    JAX's `jax.eval_shape`; the refusal follows psgd_dense's `max_dimension`.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params: PyTree) -> Any:
    size = state_size(inner, params)
    if (
      size.total_bytes > _REFUSED_BYTES and size.total_bytes > _REFUSED_RATIO * size.parameter_bytes
    ):
      path, largest = max(size.leaves.items(), key=lambda item: item[1])
      raise ValueError(
        f"{name}: the optimizer state would take {_human(size.total_bytes)} for "
        f"{_human(size.parameter_bytes)} of parameters "
        f"({size.bytes_per_parameter:.0f} bytes per parameter; the largest piece, "
        f"state{path}, is {_human(largest)}). {lowers} "
        f"(curvopt.state_size sizes a state before init.)"
      )
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init, inner.update)
