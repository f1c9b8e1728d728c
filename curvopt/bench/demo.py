"""Curvature of a small MLP on scikit-learn's digits, measured with curvopt.

Trains an MLP 64-64-10 (tanh, softmax cross-entropy) with full-batch
gradient descent, then prints its sharpness (on the full training set and on
mini-batches), the Hessian trace by Hutchinson and Hutch++, the top
eigenvalues by Lanczos, and the trace of each layer's Hessian block.

Run:  python -m curvopt.bench.demo [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import curvopt
from curvopt.bench import data, models


def _train(params, value_fn, steps: int, learning_rate: float):
  step = jax.jit(
    lambda p: jax.tree.map(lambda w, g: w - learning_rate * g, p, jax.grad(value_fn)(p))
  )
  for _ in range(steps):
    params = step(params)
  return params


def _only(layer: str):
  """A `restrict` mask selecting the leaves of one layer."""
  return lambda path, _: path[0].key == layer


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300, help="gradient descent steps")
  parser.add_argument("--learning-rate", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  digits = data.digits()
  x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
  loss = lambda p, xb, yb: models.softmax_cross_entropy(models.mlp(p, xb), yb)
  params = models.init_mlp(jax.random.key(args.seed), (64, 64, 10))
  d = sum(leaf.size for leaf in jax.tree.leaves(params))
  print(f"MLP 64-64-10 on sklearn digits: {d:,} parameters, {len(x)} training examples.")

  start = time.perf_counter()
  params = _train(params, lambda p: loss(p, x, y), args.steps, args.learning_rate)
  test_acc = models.accuracy(
    models.mlp(params, jnp.asarray(digits.x_test)), jnp.asarray(digits.y_test)
  )
  print(
    f"Trained {args.steps} full-batch GD steps (lr {args.learning_rate}) in "
    f"{time.perf_counter() - start:.1f} s: train loss {float(loss(params, x, y)):.4f}, "
    f"test accuracy {float(test_acc):.3f}.\n"
  )

  @jax.jit
  def measure(params, key):
    keys = jax.random.split(key, 4)
    hessian = curvopt.hessian(lambda p: loss(p, x, y), params, num_examples=len(x))
    return {
      "sharpness": curvopt.estimate_sharpness(hessian, keys[0], num_iterations=40),
      "top": curvopt.lanczos_eigenpairs(hessian, keys[1], k=5, num_iterations=60),
      "hutchinson": curvopt.hutchinson_trace(hessian, keys[2], num_probes=96, probes_per_step=16),
      "hutchpp": curvopt.hutchpp_trace(hessian, keys[3], num_matvecs=96),
      "layers": {
        name: curvopt.hutchinson_trace(
          curvopt.restrict(hessian, _only(name)), keys[2], num_probes=64
        )
        for name in params
      },
    }

  start = time.perf_counter()
  out = jax.block_until_ready(measure(params, jax.random.key(args.seed)))
  elapsed = time.perf_counter() - start
  s = out["sharpness"]
  print(
    f"sharpness (largest Hessian eigenvalue) on {s.num_examples} examples: "
    f"{float(s.sharpness):.5f}  (residual {float(s.residual):.1e}, "
    f"{int(s.num_iterations)} Lanczos steps)"
  )

  @jax.jit
  def batch_sharpness(params, key, xb, yb):
    return curvopt.sharpness(lambda p: loss(p, xb, yb), params, key=key, num_iterations=40)

  for batch in (32, 128, 512):
    values = [
      float(
        batch_sharpness(
          params, jax.random.key(i), x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        )
      )
      for i in range(len(x) // batch if batch * 2 <= len(x) else 1)
    ][:5]
    mean = sum(values) / len(values)
    print(f"  mini-batch sharpness, batch {batch:4d}: mean {mean:.5f} over {len(values)} batches")
  top = out["top"]
  print("top-5 eigenvalues (Lanczos):", ", ".join(f"{float(v):.5f}" for v in top.eigenvalues))
  print("  residuals:", ", ".join(f"{float(r):.1e}" for r in top.residuals))
  hut, hpp = out["hutchinson"], out["hutchpp"]
  print(f"Hessian trace: Hutchinson {float(hut.trace):.4f} +- {float(hut.stderr):.4f} (96 probes)")
  print(
    f"               Hutch++    {float(hpp.trace):.4f} +- {float(hpp.stderr):.4f} (96 products)"
  )
  print("per-layer trace (64 probes each):")
  for name, est in out["layers"].items():
    n = sum(leaf.size for leaf in jax.tree.leaves(params[name]))
    print(
      f"  {name}: {float(est.trace):9.4f} +- {float(est.stderr):.4f}   "
      f"mean per parameter {float(est.trace) / n:.2e}"
    )
  print(f"\n(one jitted call measured all of the above in {elapsed:.1f} s, compilation included)")


if __name__ == "__main__":
  main()
