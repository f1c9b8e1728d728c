"""Per-device optimizer state and step cost under FSDP on 8 simulated devices, against one.

For SOAP, Shampoo (with and without `block_sharding`) and PSGD-Kron on the runner's
`gpt_lm` (small): the parameters are sharded FSDP-style (first axis of every leaf it
divides, else replicated) and every state leaf the same way on its first axis that
divides by the devices (Kronecker factor stacks over their blocks, else over rows), as
`jit(init, out_shardings=...)` asks. Per-device state bytes are read from the arrays'
shards; the compiled step's `memory_analysis()` and `cost_analysis()` give its
per-device argument, temporary bytes and FLOPs. The goal of issue 33: per-device state
at most 1/N of the replicated state plus the largest single factor.

Run:  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python benchmarks/sharded_state.py --out benchmarks/results/sharded_state.md
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import curvopt
from curvopt.bench.workloads import WORKLOADS


def _first_dividing_axis(shape: tuple[int, ...], n: int) -> NamedSharding | None:
  for axis, size in enumerate(shape):
    if size % n == 0 and size >= n:
      return axis
  return None


def _sharding(x, mesh: Mesh) -> NamedSharding:
  axis = _first_dividing_axis(tuple(np.shape(x)), mesh.size)
  if axis is None:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(*([None] * axis), "fsdp"))


def _device_bytes(tree) -> int:
  """Bytes the first device holds of every array in `tree`."""
  device = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def _largest_factor_bytes(state) -> int:
  """The largest single square matrix among the state's leaves (a factor, root or basis)."""
  sizes = [
    x.shape[-1] ** 2 * x.dtype.itemsize
    for x in jax.tree.leaves(state)
    if x.ndim >= 2 and x.shape[-1] == x.shape[-2]
  ]
  return max(sizes, default=0)


def measure(name: str, build, mesh: Mesh, workload) -> list[str]:
  params = workload.init_params(jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, workload.batch(0, 0))
  value_fn = workload.value_fn
  rows = []
  for layout in ("replicated", "fsdp"):
    opt = build(mesh)
    if layout == "replicated":
      place = lambda x: NamedSharding(mesh, P())
    else:
      place = lambda x: _sharding(x, mesh)
    param_shardings = jax.tree.map(place, params)
    p = jax.device_put(params, param_shardings)
    abstract = jax.eval_shape(opt.init, p)
    state_shardings = jax.tree.map(place, abstract)
    state = jax.jit(opt.init, out_shardings=state_shardings)(p)

    def step(params, state, batch, opt=opt):
      loss_fn = lambda q: value_fn(q, batch)
      grads = jax.grad(loss_fn)(params)
      updates, state = opt.update(grads, state, params, value_fn=loss_fn)
      return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, out_shardings=(param_shardings, state_shardings))
    compiled = jitted.lower(p, state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    rows.append(
      {
        "layout": layout,
        "state": _device_bytes(state),
        "largest": _largest_factor_bytes(state),
        "arguments": getattr(memory, "argument_size_in_bytes", float("nan")),
        "temp": getattr(memory, "temp_size_in_bytes", float("nan")),
        "flops": cost.get("flops", float("nan")),
      }
    )
  replicated = rows[0]
  bound = replicated["state"] / mesh.size + replicated["largest"]
  lines = []
  for row in rows:
    goal = ""
    if row["layout"] == "fsdp":
      goal = "met" if row["state"] <= bound else "not met"
    lines.append(
      f"| {name} | {row['layout']} | {row['state'] / 1024:.0f} | "
      f"{row['state'] / replicated['state']:.3f} | {bound / 1024:.0f} | {goal} | "
      f"{row['arguments'] / 1024:.0f} | {row['temp'] / 1024:.0f} | {row['flops'] / 1e6:.1f} |"
    )
  return lines


OPTIMIZERS = {
  "soap": lambda mesh: curvopt.soap(1e-3),
  "shampoo": lambda mesh: curvopt.shampoo(1e-3),
  "shampoo (block_sharding)": lambda mesh: curvopt.shampoo(
    1e-3, block_sharding=NamedSharding(mesh, P("fsdp"))
  ),
  "soap (block_sharding)": lambda mesh: curvopt.soap(
    1e-3, block_sharding=NamedSharding(mesh, P("fsdp"))
  ),
  "psgd_kron": lambda mesh: curvopt.psgd_kron(1e-3),
  "adamw (optax)": lambda mesh: optax.adamw(1e-3),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workload", default="gpt_lm")
  parser.add_argument("--size", default="small")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  workload = WORKLOADS[args.workload](size=args.size)
  lines = [
    f"Per-device optimizer state and step on {mesh.size} simulated CPU devices, "
    f"`{args.workload}` ({args.size}); `python benchmarks/sharded_state.py` with "
    "`XLA_FLAGS=--xla_force_host_platform_device_count=8`. Goal: FSDP state per device at "
    "most the replicated state / N plus the largest single factor.",
    "",
    "| optimizer | layout | state per device (KiB) | vs replicated | goal bound (KiB) | goal "
    "| step arguments (KiB) | step temporaries (KiB) | step MFLOPs per device |",
    "|---|---|---:|---:|---:|---|---:|---:|---:|",
  ]
  for name, build in OPTIMIZERS.items():
    lines += measure(name, build, mesh, workload)
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
