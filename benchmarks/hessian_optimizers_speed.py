"""Step time of AdaHessian and Sophia-H against optax.adam, measured side by side.

On `digits_mlp` and `mnist1d_cnn` (batch 128), times full jitted training
steps (gradient, optimizer update, parameter update) for adam, adahessian and
sophia_h (k = 10), together with one gradient and one raw `jvp(grad)` (its
primal and tangent outputs, with a random tangent passed as an argument).
Steps are timed in blocks of 20 (so Sophia's refresh every 10 steps is
counted), the blocks interleaved round-robin, and the median block reported
per step. Targets: AdaHessian's ratio to Adam at most 1.1 x (raw jvp(grad) /
gradient) from the same run, i.e. no wasted gradient; Sophia-H at most 1.25 x Adam.
Both are also timed without `skip_nonfinite` (the guard every named optimizer
wears), to show its share.

Run:  python benchmarks/hessian_optimizers_speed.py [--blocks 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import optax
from step_time import BLOCK, interleaved_medians, train_step, without_guard  # beside this script

import curvopt
from curvopt.bench.workloads import WORKLOADS


def _runners(workload):
  params = workload.init_params(jax.random.key(0))
  batches = [jax.tree.map(jnp.asarray, workload.batch(0, i)) for i in range(BLOCK)]
  value_fn = lambda p, b: workload.value_fn(p, b)
  # The tangent is an argument, not a constant XLA could fold (a tangent of ones would be).
  tangent = curvopt.random_vector(jax.random.key(1), params)
  grad = jax.jit(jax.grad(value_fn))
  # Both outputs: jvp(grad) gives the gradient with Hz, and an AdaHessian step needs both.
  raw = jax.jit(lambda p, t, b: jax.jvp(jax.grad(lambda q: value_fn(q, b)), (p,), (t,)))
  runners = {
    "gradient": lambda: [grad(params, b) for b in batches][-1],
    "raw jvp(grad)": lambda: [raw(params, tangent, b) for b in batches][-1],
  }
  adahessian = lambda: curvopt.adahessian(1e-3)
  sophia = lambda: curvopt.sophia_h(1e-3, refresh_every=10)
  for name, opt in {
    "adam": optax.adam(1e-3),
    "adahessian": adahessian(),
    "sophia_h (k=10)": sophia(),
    "adahessian, no guard": without_guard(adahessian),
    "sophia_h (k=10), no guard": without_guard(sophia),
  }.items():
    step = train_step(workload, opt, ("value_fn",))
    carry = {"params": params, "state": opt.init(params)}

    def run(step=step, carry=carry):
      p, s = carry["params"], carry["state"]
      for b in batches:
        p, s = step(p, s, b)
      carry["params"], carry["state"] = p, s
      return p

    runners[name] = run
  return runners


def _use_synthetic_data() -> None:
  """Random data of the real shapes, for machines without scikit-learn or mnist1d."""
  import numpy as np

  from curvopt.bench import data

  def fake(n_features):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1438, n_features)).astype(np.float32)
    y = rng.integers(0, 10, size=1438).astype(np.int32)
    return lambda **_: data.Dataset(x, y, x[:256], y[:256])

  data.digits, data.mnist1d = fake(64), fake(40)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--blocks", type=int, default=15)
  parser.add_argument("--out", default=None)
  parser.add_argument("--synthetic", action="store_true", help="random inputs of the real shapes")
  args = parser.parse_args()
  if args.synthetic:
    _use_synthetic_data()
  lines = [
    f"Median over {args.blocks} interleaved blocks of {BLOCK} steps, per step; "
    f"jax {jax.__version__}, {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores usable.",
    "",
  ]
  for name in ("digits_mlp", "mnist1d_cnn"):
    runners = _runners(WORKLOADS[name]())
    for run in runners.values():
      jax.block_until_ready(run())  # compile
    ms = interleaved_medians(runners, args.blocks)
    hvp_ratio = ms["raw jvp(grad)"] / ms["gradient"]
    targets = {
      "adahessian": f"<= 1.1 x {hvp_ratio:.2f} = {1.1 * hvp_ratio:.2f}",
      "sophia_h (k=10)": "<= 1.25",
    }
    targets["adahessian, no guard"] = targets["adahessian"]
    targets["sophia_h (k=10), no guard"] = targets["sophia_h (k=10)"]
    lines += [f"### {name}", "", "| step | ms per step | x adam | target |", "|---|---:|---:|---|"]
    for step, label in [("gradient", "gradient only"), ("raw jvp(grad)", "raw jvp(grad) only")]:
      lines.append(f"| {label} | {ms[step]:.3f} | {ms[step] / ms['adam']:.2f} | |")
    for step in ("adam", *targets):
      ratio = ms[step] / ms["adam"]
      lines.append(f"| {step} | {ms[step]:.3f} | {ratio:.2f} | {targets.get(step, '')} |")
    lines.append("")
    print("\n".join(lines[-12:]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines))


if __name__ == "__main__":
  main()
