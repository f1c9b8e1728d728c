"""Saving and restoring optimizer states exactly, with orbax-checkpoint.

Beside the core (nothing in the layers imports it), like the benchmark
runner: `pip install orbax-checkpoint` (flax brings it).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt import _tree

PyTree = Any


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as error:  # pragma: no cover - flax, in the test extra, brings it
    raise ImportError(
      "curvopt.checkpoint needs orbax-checkpoint: pip install orbax-checkpoint"
    ) from error
  return ocp


def _storable(x: Any) -> Any:
  """Keys as raw data; empty arrays (which orbax refuses) as a scalar placeholder."""
  if _tree.is_key(x):
    return jax.random.key_data(x)
  return jnp.zeros((), jnp.result_type(x)) if _size(x) == 0 else x


def save(path: str | pathlib.Path, tree: PyTree) -> None:
  """Writes `tree` (an optimizer state, parameters, or both) to the directory `path`.

  PRNG keys are stored as their raw data; everything else as it is, bit for
  bit, with its sharding (orbax writes each shard from its device). The
  directory must not exist yet. Blocks until the write has finished.

  Example:
    >>> import pathlib, tempfile, jax, jax.numpy as jnp, curvopt
    >>> opt, params = curvopt.adahessian(0.1), jnp.ones(3)
    >>> state = opt.init(params)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "step_0"
    >>> curvopt.checkpoint.save(path, state)
    >>> restored = curvopt.checkpoint.restore(path, jax.eval_shape(opt.init, params))
    >>> jax.tree.structure(restored) == jax.tree.structure(state)
    True

  References:
    orbax-checkpoint's `StandardCheckpointer`.
  """
  ocp = _orbax()
  data = jax.tree.map(_storable, tree)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(pathlib.Path(path).absolute(), data)
  checkpointer.wait_until_finished()


def restore(path: str | pathlib.Path, like: PyTree) -> PyTree:
  """Reads a checkpoint written by `save` into the structure, dtypes and shardings of `like`.

  `like` is a pytree of arrays or of `jax.ShapeDtypeStruct`s, typically
  `jax.eval_shape(opt.init, params)` (add `sharding=` to each struct to
  restore sharded). PRNG keys come back as keys of the same implementation.

  Example:
    >>> import pathlib, tempfile, jax, jax.numpy as jnp, curvopt
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "keys"
    >>> curvopt.checkpoint.save(path, {"key": jax.random.key(7), "count": jnp.int32(3)})
    >>> out = curvopt.checkpoint.restore(path, {"key": jax.random.key(0), "count": jnp.int32(0)})
    >>> bool(jnp.all(jax.random.key_data(out["key"]) == jax.random.key_data(jax.random.key(7))))
    True

  References:
    orbax-checkpoint's `StandardCheckpointer`.
  """
  ocp = _orbax()

  def abstract(x):
    if _tree.is_key(x):
      return jax.eval_shape(jax.random.key_data, x)
    if _size(x) == 0:
      return jax.ShapeDtypeStruct((), jnp.result_type(x))
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding)

  target = jax.tree.map(abstract, like)
  data = ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute(), target)
  return jax.tree.map(_unstorable, data, like)


def _size(x: Any) -> int:
  return int(np.prod(jnp.shape(x), dtype=np.int64))


def _unstorable(x: jax.Array, like: Any) -> jax.Array:
  if _tree.is_key(like):
    return _wrap(x, like)
  return jnp.zeros(jnp.shape(like), jnp.result_type(like)) if _size(like) == 0 else x


def _wrap(data: jax.Array, like: Any) -> jax.Array:
  # An abstract key (from `jax.eval_shape`) carries its implementation in its dtype.
  impl = jax.random.key_impl(like) if isinstance(like, jax.Array) else like.dtype._impl
  return jax.random.wrap_key_data(data, impl=impl)
