"""Shampoo's update with bfloat16 state, statistics packed or not, side by side (optimizer only).

On the runner's `gpt_lm` small parameters with fixed gradients: median ms per update over 6
round-robin rounds of 20 jitted updates each (a refresh every 10).

Run:  python benchmarks/packed_statistics_step_time.py
"""

import statistics
import time

import jax
import jax.numpy as jnp

import curvopt
from curvopt.bench.workloads import WORKLOADS

w = WORKLOADS["gpt_lm"](size="small")
params = w.init_params(jax.random.key(0))
grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)


def make(packed):
  opt = curvopt.shampoo(
    5e-3, state_dtype=jnp.bfloat16, packed_statistics=packed, precondition_frequency=10
  )
  step = jax.jit(lambda s: opt.update(grads, s, params)[1])
  s = opt.init(params)
  s = step(s)
  jax.block_until_ready(s)
  return step, s


runs = {p: make(p) for p in (False, True)}
times = {False: [], True: []}
for _ in range(6):
  for p in (False, True):
    step, s = runs[p]
    t = time.perf_counter()
    for _ in range(20):
      s = step(s)
    jax.block_until_ready(s)
    times[p].append((time.perf_counter() - t) / 20 * 1e3)
    runs[p] = (step, s)
for p in (False, True):
  print(
    "packed" if p else "unpacked",
    "median ms/step over 6 rounds of 20 (refresh every 10):",
    round(statistics.median(times[p]), 2),
    [round(x, 2) for x in times[p]],
  )
print("ratio", round(statistics.median(times[True]) / statistics.median(times[False]), 3))
