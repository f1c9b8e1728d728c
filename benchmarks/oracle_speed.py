"""Speed of the curvature oracle against raw JAX, on two real models.

For an MLP 64-256-256-10 on sklearn digits and a 1-D CNN (three 5-wide
convolutions) on mnist1d, both at batch 256, prints the median time of one
gradient, curvopt's Hv, a raw `jax.jvp(jax.grad(f))`, the one-pass
`(value, gradient, Hv)`, a Gauss-Newton product and Lanczos with 20 steps.
Each operation is its own jitted function, compiled before timing; the
repeats are interleaved round-robin so that drift in machine load hits every
operation alike.

Run:  python benchmarks/oracle_speed.py [--repeats 50] [--out benchmarks/results/oracle_speed.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import curvopt
from curvopt.bench import data, models


def _synthetic(n_features: int) -> data.Dataset:
  """Random data of the real shapes, for machines without scikit-learn or mnist1d."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1024, n_features)).astype(np.float32)
  y = rng.integers(0, 10, size=1024).astype(np.int32)
  return data.Dataset(x, y, x, y)


def _problems(batch_size: int, synthetic: bool) -> dict[str, tuple]:
  digits = _synthetic(64) if synthetic else data.digits()
  mnist = _synthetic(40) if synthetic else data.mnist1d()
  key = jax.random.key(0)
  return {
    "MLP 64-256-256-10, digits": (
      models.init_mlp(key, (64, 256, 256, 10)),
      models.mlp,
      jnp.asarray(digits.x_train[:batch_size]),
      jnp.asarray(digits.y_train[:batch_size]),
    ),
    "CNN1d 3x(5-wide, 32 ch), mnist1d": (
      models.init_cnn1d(key),
      models.cnn1d,
      jnp.asarray(mnist.x_train[:batch_size]),
      jnp.asarray(mnist.y_train[:batch_size]),
    ),
  }


def _operations(params, apply, x, y) -> dict[str, Callable]:
  value_fn = lambda p: models.softmax_cross_entropy(apply(p, x), y)
  model_fn = lambda p: apply(p, x)
  loss_fn = lambda out: models.softmax_cross_entropy(out, y)
  v = jax.tree.map(jnp.ones_like, params)
  key = jax.random.key(1)
  ops = {
    "gradient": (jax.jit(jax.grad(value_fn)), (params,)),
    "raw jvp(grad)": (
      jax.jit(lambda p, t: jax.jvp(jax.grad(value_fn), (p,), (t,))[1]),
      (params, v),
    ),
    "curvopt.hvp": (jax.jit(lambda p, t: curvopt.hvp(value_fn, p, t)), (params, v)),
    "curvopt.value_grad_hvp": (
      jax.jit(lambda p, t: curvopt.value_grad_hvp(value_fn, p, t)),
      (params, v),
    ),
    "Gauss-Newton product": (
      jax.jit(lambda p, t: curvopt.gauss_newton(model_fn, loss_fn, p).mv(t)),
      (params, v),
    ),
  }
  for loop in ("auto", "lax", "unroll"):
    ops[f"Lanczos 20 steps (loop={loop})"] = (
      jax.jit(
        lambda p, k, loop=loop: curvopt.lanczos(
          curvopt.hessian(value_fn, p), k, num_iterations=20, loop=loop
        )
      ),
      (params, key),
    )
  return ops


def _time(ops: dict[str, tuple], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
  compile_s = {}
  for name, (fn, args) in ops.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s[name] = time.perf_counter() - start
  samples = {name: [] for name in ops}
  for _ in range(repeats):
    for name, (fn, args) in ops.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in samples.items()}, compile_s


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--out", default=None, help="also write the Markdown table here")
  parser.add_argument(
    "--synthetic", action="store_true", help="random inputs of the same shapes (no data packages)"
  )
  args = parser.parse_args()

  lines = [
    f"Median of {args.repeats} interleaved runs, batch {args.batch_size}, float32; "
    f"jax {jax.__version__}, backend {jax.default_backend()} "
    f"({jax.devices()[0].device_kind}), {platform.machine()}"
    + (", synthetic inputs of the real shapes." if args.synthetic else "."),
    "",
  ]
  for title, problem in _problems(args.batch_size, args.synthetic).items():
    ops = _operations(*problem)
    medians, compile_s = _time(ops, args.repeats)
    grad, raw = medians["gradient"], medians["raw jvp(grad)"]
    lines += [
      f"### {title} ({sum(x.size for x in jax.tree.leaves(problem[0])):,} parameters)",
      "",
      "| operation | median ms | x gradient | x raw jvp(grad) | first call (compile) s |",
      "|---|---:|---:|---:|---:|",
    ]
    for name, seconds in medians.items():
      lines.append(
        f"| {name} | {1e3 * seconds:.3f} | {seconds / grad:.2f} | {seconds / raw:.2f} | "
        f"{compile_s[name]:.2f} |"
      )
    lines.append("")
    print("\n".join(lines[-len(medians) - 5 :]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines))
  else:
    print("\n".join(lines[:2]))


if __name__ == "__main__":
  main()
