"""Data-parallel training across two processes (4 simulated CPU devices each) and in one.

Run by `tests/test_multidevice.py::test_two_processes_equal_one`:

  two_process_checks.py worker PROCESS_ID PORT OUT   (twice, with 4 devices each)
  two_process_checks.py single OUT                   (once, with 8 devices)

The workers join a `jax.distributed` job on a localhost coordinator (CPU collectives by
gloo), train each optimizer a few steps on one 8-device mesh, write the parameters
(process 0) and an orbax checkpoint of the state (both processes). The single process
trains the same on its own 8 devices, compares, restores the checkpoint and prints JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

MODE = sys.argv[1]
if MODE == "worker":
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[2])
  )

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from multidevice_checks import _problem, extra_args  # noqa: E402  (sets x64)

import curvopt  # noqa: E402

OPTIMIZERS = {
  "shampoo": lambda: curvopt.shampoo(0.05, precondition_frequency=2),
  "soap": lambda: curvopt.soap(0.05, precondition_frequency=2),
  "psgd_kron": lambda: curvopt.psgd_kron(0.05),
  "sophia_h": lambda: curvopt.sophia_h(0.02, refresh_every=2),
}
STEPS = 4
CHECKPOINTED = "soap"

mesh = Mesh(np.array(jax.devices()), ("data",))
replicated, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def _global(tree, sharding):
  """Arrays on the whole mesh, each process filling only its own devices' pieces."""
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x)[index]
    ),
    tree,
  )


def train(name):
  opt = OPTIMIZERS[name]()
  params, batch = _problem()
  params, batch = _global(params, replicated), _global(batch, by_rows)

  def step(params, state, batch):
    extra = extra_args(batch)
    grads = jax.grad(extra["value_fn"])(params)
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(opt.init, params))
  state = jax.jit(opt.init, out_shardings=state_sharding)(params)
  jitted = jax.jit(step, out_shardings=(replicated, state_sharding))
  for _ in range(STEPS):
    params, state = jitted(params, state, batch)
  return params, state


def local(tree):
  """A replicated array's value, read from this process's first device."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def worker(out: pathlib.Path) -> None:
  for name in OPTIMIZERS:
    params, state = train(name)
    if jax.process_index() == 0:
      flat = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(local(params))
      }
      np.savez(out / f"{name}.npz", **flat)
    if name == CHECKPOINTED:
      curvopt.checkpoint.save(out / "checkpoint", state)


def single(out: pathlib.Path) -> dict:
  report = {}
  for name in OPTIMIZERS:
    params, state = train(name)
    theirs = np.load(out / f"{name}.npz")
    ours = {
      jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(local(params))
    }
    report[name] = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)
    if name == CHECKPOINTED:
      like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
      )
      restored = curvopt.checkpoint.restore(out / "checkpoint", like)
      report["checkpoint"] = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(
          jax.tree.leaves(local(restored)), jax.tree.leaves(local(state)), strict=True
        )
        if np.issubdtype(np.asarray(a).dtype, np.number)
      )
  return report


if __name__ == "__main__":
  if MODE == "worker":
    worker(pathlib.Path(sys.argv[4]))
    jax.distributed.shutdown()
  else:
    print("RESULT " + json.dumps(single(pathlib.Path(sys.argv[2]))))
