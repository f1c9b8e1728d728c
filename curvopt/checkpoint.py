"""Saving and restoring optimizer states exactly, with orbax-checkpoint.

Beside the core (nothing in the layers imports it), like the benchmark
runner: `pip install orbax-checkpoint` (flax brings it).
"""

from __future__ import annotations

import json
import pathlib
import re
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt import _tree

__all__ = ["save", "restore"]

PyTree = Any

# Written beside orbax's files: the tree's node types, leaf paths, shapes and dtypes.
_DESCRIPTION = "curvopt_tree.json"
_SAVING = threading.Lock()


def _describe(tree: PyTree) -> dict:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {
    "node_types": re.findall(r"namedtuple\[(\w+)\]", str(treedef)),
    "leaves": [
      {
        "path": jax.tree_util.keystr(p),
        "shape": list(jnp.shape(x)),
        "dtype": str(x.dtype) if hasattr(x, "dtype") else str(jnp.result_type(x)),
        "key": bool(_tree.is_key(x)),
      }
      for p, x in leaves
    ],
  }


def _check_compatible(saved: dict, target: dict) -> None:
  """Refuses a target of another optimizer, or with another shape or dtype at any leaf."""
  saved_paths = [leaf["path"] for leaf in saved["leaves"]]
  target_paths = [leaf["path"] for leaf in target["leaves"]]
  if saved["node_types"] != target["node_types"] or saved_paths != target_paths:
    only_saved = [p for p in saved_paths if p not in target_paths]
    only_target = [p for p in target_paths if p not in saved_paths]
    detail = (
      f"the checkpoint has {only_saved[:3]} where the target has {only_target[:3]}"
      if only_saved or only_target
      else f"the checkpoint's states are {saved['node_types']}, the target's {target['node_types']}"
    )
    raise ValueError(f"checkpoint and target are different trees (another optimizer?): {detail}.")
  for a, b in zip(saved["leaves"], target["leaves"], strict=True):
    for field in ("shape", "dtype"):
      if a[field] != b[field]:
        raise ValueError(
          f"checkpoint leaf {a['path'] or '(root)'} has {field} {a[field]}, the target "
          f"{b[field]}: restore into a target of the same {field}."
        )


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as error:  # pragma: no cover - flax, in the test extra, brings it
    raise ImportError(
      'curvopt.checkpoint needs orbax-checkpoint: pip install "curvopt[checkpoint]"'
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

  Examples:
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
  path = pathlib.Path(path).absolute()
  data = jax.tree.map(_storable, tree)
  # Concurrent saves from several threads hang in orbax's shared machinery: one at a time.
  with _SAVING:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, data)
    checkpointer.wait_until_finished()
    (path / _DESCRIPTION).write_text(json.dumps(_describe(tree)))


def restore(path: str | pathlib.Path, like: PyTree) -> PyTree:
  """Reads a checkpoint written by `save` into the structure, dtypes and shardings of `like`.

  `like` is a pytree of arrays or of `jax.ShapeDtypeStruct`s, typically
  `jax.eval_shape(opt.init, params)` (add `sharding=` to each struct to
  restore sharded). PRNG keys come back as keys of the same implementation.

  Examples:
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
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path}.")
  description = path / _DESCRIPTION
  if description.is_file():  # checkpoints from before it was recorded are restored as they are
    _check_compatible(_read_json(description), _describe(like))
  for name in _ORBAX_JSON:  # orbax reads them with a bare JSONDecodeError on damage
    if (path / name).is_file():
      _read_json(path / name)

  def abstract(x):
    if _tree.is_key(x):
      return jax.eval_shape(jax.random.key_data, x)
    if _size(x) == 0:
      return jax.ShapeDtypeStruct((), jnp.result_type(x))
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding)

  target = jax.tree.map(abstract, like)
  try:
    data = ocp.StandardCheckpointer().restore(path, target)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DamagedCheckpointError(
      f"the checkpoint at {path} is damaged: orbax could not read one of its files "
      f"({type(error).__name__}: {error})."
    ) from error
  return jax.tree.map(_unstorable, data, like)


class DamagedCheckpointError(ValueError):
  """A checkpoint's files are truncated or corrupted (the message names the file)."""


# orbax's JSON files in a StandardCheckpointer directory.
_ORBAX_JSON = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding")


def _read_json(file: pathlib.Path) -> Any:
  """`file`'s JSON, or an error naming the file and saying the checkpoint is damaged."""
  try:
    return json.loads(file.read_bytes().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DamagedCheckpointError(
      f"the checkpoint at {file.parent} is damaged: {file.name} is not readable JSON "
      f"({type(error).__name__}: {error}). Restore an earlier checkpoint."
    ) from None


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
