"""curvopt.psgd_kron against psgd_jax's kron (0.2.9), side by side: step time and final loss.

psgd_jax is not a curvopt dependency. Install it beside, without its
dependencies, and point this script at it:

  pip install --target /tmp/psgdjax psgd-jax==0.2.9 --no-deps
  PSGD_JAX_PATH=/tmp/psgdjax python benchmarks/psgd_vs_psgd_jax.py \
    --out benchmarks/results/psgd_vs_psgd_jax.md

psgd_jax 0.2.9 imports `optax._src.clipping`, which optax 0.2.8 no longer has
(evanatyourservice/psgd_jax#4, unmerged); the script maps that module name to
`optax.transforms._clipping` before importing it. Both run whitening-type
Kron with momentum 0.9, the preconditioner fitted on 10% of steps, the same
learning rate, batches and initial parameters. Reports the median step time
(interleaved blocks, as `step_time.py`) and the training loss after a fixed
number of steps, for three seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from step_time import BLOCK, interleaved_medians, train_step

import curvopt
from curvopt.bench.workloads import WORKLOADS


def _psgd_jax_kron():
  sys.path.insert(0, os.environ.get("PSGD_JAX_PATH", "/tmp/psgdjax"))
  sys.modules.setdefault("optax._src.clipping", optax.transforms._clipping)
  from psgd_jax.kron import kron

  return kron


def _optimizers(learning_rate: float, kron) -> dict[str, optax.GradientTransformation]:
  return {
    "adam": optax.adam(learning_rate),
    "curvopt.psgd_kron": curvopt.psgd_kron(learning_rate, update_probability=0.1),
    "psgd_jax.kron": kron(learning_rate, b1=0.9, preconditioner_update_probability=0.1),
  }


def _step_times(workload, optimizers, blocks: int) -> dict[str, float]:
  params = workload.init_params(jax.random.key(0))
  batches = [jax.tree.map(jnp.asarray, workload.batch(0, i)) for i in range(BLOCK)]
  runners = {}
  for name, opt in optimizers.items():
    step = train_step(workload, opt)
    carry = {"params": params, "state": opt.init(params)}

    def run(step=step, carry=carry):
      p, s = carry["params"], carry["state"]
      for b in batches:
        p, s = step(p, s, b)
      carry["params"], carry["state"] = p, s
      return p

    jax.block_until_ready(run())
    runners[name] = run
  return interleaved_medians(runners, blocks)


def _final_loss(workload, opt, steps: int, seed: int) -> float:
  params = workload.init_params(jax.random.key(seed))
  step, state = train_step(workload, opt), opt.init(params)
  for i in range(steps):
    params, state = step(params, state, jax.tree.map(jnp.asarray, workload.batch(seed, i)))
  return float(workload.value_fn(params, jax.tree.map(jnp.asarray, workload.eval_batch())))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", default="digits_mlp,mnist1d_cnn,char_transformer")
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--steps", default="digits_mlp=300,mnist1d_cnn=500,char_transformer=150")
  parser.add_argument("--blocks", type=int, default=15)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  kron = _psgd_jax_kron()
  steps = {k: int(v) for k, v in (item.split("=") for item in args.steps.split(","))}
  lines = [
    f"Learning rate {args.learning_rate}, whitening Kron, update probability 0.1, momentum 0.9; "
    f"median over {args.blocks} interleaved blocks of {BLOCK} steps; final training loss "
    f"(mean and spread over seeds 0-2); jax {jax.__version__}, {jax.default_backend()}, "
    f"{platform.machine()}.",
    "",
    "| workload | optimizer | ms per step | x adam | steps | final train loss (seeds 0, 1, 2) |",
    "|---|---|---:|---:|---:|---|",
  ]
  for name in args.workloads.split(","):
    workload = WORKLOADS[name]()
    optimizers = _optimizers(args.learning_rate, kron)
    ms = _step_times(workload, optimizers, args.blocks)
    for opt_name, opt in optimizers.items():
      losses = [_final_loss(workload, opt, steps[name], seed) for seed in range(3)]
      lines.append(
        f"| {name} | {opt_name} | {ms[opt_name]:.3f} | {ms[opt_name] / ms['adam']:.2f} "
        f"| {steps[name]} | {', '.join(f'{x:.4g}' for x in losses)} "
        f"(mean {np.mean(losses):.4g}) |"
      )
      print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main()
