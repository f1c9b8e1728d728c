"""Data-parallel (and fully sharded) runs through `jax.sharding`: a mesh, and where arrays go.

`--mesh data=N` shards every batch's leading axis over N devices and
replicates the parameters and the optimizer state; `--mesh data=N,fsdp=M`
shards the batch over all N x M devices and each parameter (and each state
leaf of a parameter's shape) along its first axis that divides by M. `jit`
inserts the collectives: the step is the one-device program, so results
equal one device's up to the order of reductions.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
MeshSpec = tuple[tuple[str, int], ...]


def parse_mesh(text: str) -> MeshSpec:
  """`"data=8"` or `"data=2,fsdp=4"` -> `(("data", 8), ...)`; a clear error otherwise."""
  axes: dict[str, int] = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    name = name.strip()
    if name not in AXES or name in axes:
      raise ValueError(f"--mesh takes axes data=N and optionally fsdp=M, each once, got {text!r}.")
    try:
      axes[name] = int(size)
    except ValueError:
      raise ValueError(f"--mesh {name} must be a positive integer, got {size!r}.") from None
    if axes[name] < 1:
      raise ValueError(f"--mesh {name} must be a positive integer, got {axes[name]}.")
  if "data" not in axes:
    raise ValueError(f"--mesh needs a data axis (data=N), got {text!r}.")
  return tuple((name, axes[name]) for name in AXES if name in axes)


def make_mesh(spec: MeshSpec) -> Mesh:
  """The mesh over the first `prod(sizes)` devices."""
  sizes = [size for _, size in spec]
  needed = math.prod(sizes)
  if needed > jax.device_count():
    raise ValueError(
      f"--mesh {format_mesh(spec)} needs {needed} devices; {jax.device_count()} are visible "
      "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting)."
    )
  devices = np.asarray(jax.devices()[:needed]).reshape(sizes)
  return Mesh(devices, tuple(name for name, _ in spec))


def format_mesh(spec: MeshSpec) -> str:
  return ",".join(f"{name}={size}" for name, size in spec)


def _leaf_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
  if fsdp > 1:
    for axis, dim in enumerate(shape):
      if dim % fsdp == 0:
        return PartitionSpec(*([None] * axis), "fsdp")
  return PartitionSpec()


def place_params(mesh: Mesh, params: Any) -> Any:
  """Parameters replicated, or under `fsdp` sharded along their first divisible axis."""
  fsdp = dict(mesh.shape).get("fsdp", 1)
  return jax.tree.map(
    lambda x: jax.device_put(x, NamedSharding(mesh, _leaf_spec(np.shape(x), fsdp))), params
  )


def place_state(mesh: Mesh, state: Any, params: Any) -> Any:
  """State leaves shaped like a parameter follow its sharding; the others are replicated."""
  fsdp = dict(mesh.shape).get("fsdp", 1)
  param_shapes = {tuple(np.shape(p)) for p in jax.tree.leaves(params)}

  def place(x):
    if not hasattr(x, "shape"):
      return x
    spec = _leaf_spec(tuple(x.shape), fsdp) if tuple(x.shape) in param_shapes else PartitionSpec()
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(place, state)


def place_batch(mesh: Mesh, batch: Any) -> Any:
  """The batch's leading axis split over every device of the mesh."""
  devices = mesh.devices.size
  sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))

  def place(x):
    if np.ndim(x) == 0 or np.shape(x)[0] % devices:
      raise ValueError(
        f"a batch of leading size {np.shape(x)[0] if np.ndim(x) else 'none'} cannot be split "
        f"over the {devices} devices of the mesh: choose a batch_size divisible by {devices}."
      )
    return jax.device_put(x, sharding)

  return jax.tree.map(place, batch)
