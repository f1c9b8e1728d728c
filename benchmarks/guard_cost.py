"""What `skip_nonfinite` (around every named optimizer) costs per step.

Each optimizer with and without the guard, against `optax.adam`, in the
same run (median of interleaved blocks of 20 steps), on `digits_mlp` (an
0.1 ms Adam step, where fixed per-step costs show) and `mnist1d_cnn`.
The unguarded variant is the same chain with the guard replaced by the
identity.

Run:  python benchmarks/guard_cost.py --out benchmarks/results/guard_cost.md
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax
from step_time import BLOCK, block_runner, interleaved_medians, train_step, without_guard

import curvopt
from curvopt.bench.workloads import WORKLOADS

MAKERS = {
  "adahessian": (lambda: curvopt.adahessian(1e-3), ("value_fn",)),
  "sophia_h": (lambda: curvopt.sophia_h(1e-3), ("value_fn",)),
  "shampoo": (lambda: curvopt.shampoo(1e-3), ()),
  "psgd_kron": (lambda: curvopt.psgd_kron(1e-3, update_probability=0.1), ()),
}


def _runner(workload, opt, extra, params, batches):
  step = train_step(workload, opt, extra)
  state = opt.init(params)
  return block_runner(step.lower(params, state, batches[0]).compile(), params, state, batches)


def _measure(name: str, blocks: int) -> list[str]:
  workload = WORKLOADS[name]()
  params = workload.init_params(jax.random.key(0))
  batches = [jax.tree.map(jnp.asarray, workload.batch(0, i)) for i in range(BLOCK)]
  runners = {"adam": _runner(workload, optax.adam(1e-3), (), params, batches)}
  for opt_name, (make, extra) in MAKERS.items():
    runners[(opt_name, True)] = _runner(workload, make(), extra, params, batches)
    runners[(opt_name, False)] = _runner(workload, without_guard(make), extra, params, batches)
  ms = interleaved_medians(runners, blocks)
  lines = [
    f"### {name} (adam {ms['adam']:.3f} ms per step)",
    "",
    "| optimizer | x adam, guarded | x adam, unguarded | guard cost (ms per step) |",
    "|---|---:|---:|---:|",
  ]
  for opt_name in MAKERS:
    on, off = ms[(opt_name, True)], ms[(opt_name, False)]
    lines.append(
      f"| {opt_name} | {on / ms['adam']:.2f} | {off / ms['adam']:.2f} | {on - off:+.3f} |"
    )
  return [*lines, ""]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--blocks", type=int, default=15)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  lines = [
    "# Cost of skip_nonfinite per step (2 CPU cores)",
    "",
    "Command: `python benchmarks/guard_cost.py`.",
    "",
  ]
  for name in ("digits_mlp", "mnist1d_cnn"):
    lines += _measure(name, args.blocks)
  text = "\n".join(lines)
  print(text)
  if args.out:
    args.out.write_text(text)


if __name__ == "__main__":
  main()
