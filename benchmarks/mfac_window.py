"""M-FAC's step: the dynamic algorithm (`refresh_every=m`) against recomputing every step.

The transform alone (`scale_by_mfac`) on a stream of fresh random gradients
(a common direction plus unit noise, as minibatch gradients), for
window lengths `m` and parameter counts `d`: median milliseconds per step
over interleaved blocks of 20 jitted steps, and the relative error of the
last direction against a float64 solve with the same window (`d <= 5000`).
`refresh_every=1` is the static algorithm's cost (one `O(m^3)` factorization
a step), the library's behaviour before the dynamic one.

Run:  python benchmarks/mfac_window.py --out benchmarks/results/mfac_window.md
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import curvopt

BLOCK = 20
CASES = [(3, 1024), (2_000, 256), (2_000, 1024), (100_000, 256)]
DAMPING = 1e-3


def _runner(d: int, m: int, refresh_every: int | None, base: jax.Array):
  tx = curvopt.transforms.scale_by_mfac(m, DAMPING, refresh_every=refresh_every)

  @jax.jit
  def block(state):
    def body(state, _):
      g = base + jax.random.normal(jax.random.key(state.count), base.shape)
      u, state = tx.update(g, state)
      return state, u

    state, directions = jax.lax.scan(body, state, length=BLOCK)
    return state, directions[-1]

  carry = {"state": tx.init(jnp.zeros(d))}
  for _ in range(m // BLOCK + 1):  # fill the window first
    carry["state"], _ = block(carry["state"])

  def run():
    carry["state"], last = block(carry["state"])
    return last

  jax.block_until_ready(run())
  return run, carry


def _error(carry, last, d: int, m: int) -> float:
  window = np.asarray(carry["state"].grads, np.float64)
  g = window[(int(carry["state"].count) - 1) % m]
  exact = np.linalg.solve(DAMPING * np.eye(d) + window.T @ window / m, g)
  return float(np.linalg.norm(np.asarray(last, np.float64) - exact) / np.linalg.norm(exact))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=7)
  parser.add_argument("--out")
  args = parser.parse_args()
  lines = [
    f"Median over {args.blocks} interleaved blocks of {BLOCK} steps; damping {DAMPING}; "
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.machine()}.",
    "",
    "| d | m | static ms | dynamic ms | static / dynamic | static error | dynamic error |",
    "|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for d, m in CASES:
    base = jax.random.normal(jax.random.key(d + m), (d,))
    runners = {r: _runner(d, m, r, base) for r in (1, None)}
    samples = {r: [] for r in runners}
    for _ in range(args.blocks):
      for r, (run, _) in runners.items():
        start = time.perf_counter()
        jax.block_until_ready(run())
        samples[r].append(1e3 * (time.perf_counter() - start) / BLOCK)
    ms = {r: statistics.median(v) for r, v in samples.items()}
    errors = {
      r: f"{_error(carry, run(), d, m):.1e}" if d <= 5000 else "-"
      for r, (run, carry) in runners.items()
    }
    lines.append(
      f"| {d} | {m} | {ms[1]:.3f} | {ms[None]:.3f} | {ms[1] / ms[None]:.1f} "
      f"| {errors[1]} | {errors[None]} |"
    )
    print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
