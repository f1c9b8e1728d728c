"""PSGD-LRA on the Beale function from (-4, -3.5): final loss after 1,000 steps, per seed.

Issue 32 item 18 reported PSGD-LRA stuck near loss 0.6-0.7 since PSGD's damping
became relative to the probe's RMS. This runs the same probe for several seeds
(the PSGD probes' and coin flips' PRNG) and rates, in float32 and float64, so a
change in damping can be told apart from the seed's luck. To compare another
commit, run it with that commit's package first on the path:

  git worktree add /tmp/parent 136b38f~1
  PYTHONPATH=/tmp/parent python benchmarks/psgd_lra_beale.py

Run:  python benchmarks/psgd_lra_beale.py --out benchmarks/results/psgd_lra_beale.md
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import optax

import curvopt

RATES = (0.01, 0.03, 0.1)
SEEDS = range(6)


def beale(p):
  x, y = p[0], p[1]
  return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def final_loss(learning_rate: float, seed: int, dtype, steps: int = 1000) -> float:
  opt = curvopt.psgd_lra(learning_rate, seed=seed)
  params = jnp.array([-4.0, -3.5], dtype)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(beale)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return float(beale(params))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out")
  args = parser.parse_args()
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"],
    capture_output=True,
    text=True,
    cwd=pathlib.Path(curvopt.__file__).parent,
  ).stdout.strip()
  lines = [
    f"Final Beale loss after 1,000 steps of `curvopt.psgd_lra(lr, seed=s)` from (-4, -3.5); "
    f"package at {commit or 'unknown commit'} ({curvopt.__file__}).",
    "",
    "| dtype | seed | " + " | ".join(f"lr {r}" for r in RATES) + " |",
    "|---|---:|" + "---:|" * len(RATES),
  ]
  for dtype in ("float32", "float64"):
    with jax.enable_x64(dtype == "float64"):
      for seed in SEEDS:
        losses = [final_loss(r, seed, jnp.dtype(dtype)) for r in RATES]
        lines.append(f"| {dtype} | {seed} | " + " | ".join(f"{x:.2g}" for x in losses) + " |")
        print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
