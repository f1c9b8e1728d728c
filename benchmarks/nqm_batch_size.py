"""Steps to target against batch size on the noisy quadratic model, with the closed-form prediction.

Zhang et al. 2019 ("Which Algorithmic Choices Matter at Which Batch Sizes?")
predict that every optimizer scales perfectly (steps ~ 1/B) up to a critical
batch size and not beyond, and that preconditioning raises the critical
batch size. This script measures it for SGD, Adam and the curvopt methods on
`noisy_quadratic` (h_i = i^-1, gradient noise covariance H / B), each at its
best learning rate of a shared log grid (median over seeds), and draws the
paper's prediction for SGD preconditioned by `h^-p`, p = 0, 1/2, 1.

  python benchmarks/nqm_batch_size.py --out benchmarks/results/nqm
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvopt
from curvopt.bench.workloads.noisy_quadratic import NoisyQuadratic

# Built at learning rate 1 with no weight decay: each ends in a multiplication by the
# learning rate, so the rate is applied outside and a grid of rates runs as one vmap.
OPTIMIZERS = {
  "sgd": lambda: optax.sgd(1.0),
  "adam": lambda: optax.adam(1.0),
  "shampoo": lambda: curvopt.shampoo(1.0),
  "soap": lambda: curvopt.soap(1.0, weight_decay=0.0),
  "psgd_kron": lambda: curvopt.psgd_kron(1.0),
  "sophia_h": lambda: curvopt.sophia_h(1.0, weight_decay=0.0),
}
PREDICTIONS = {
  0.0: "SGD (p = 0)",
  0.5: "h^-1/2 (p = 1/2, Adam-like)",
  1.0: "h^-1 (p = 1, Newton-like)",
}


def measure(name, problem, batch_size, learning_rates, seeds, steps, target):
  """Per learning rate and seed, the first step whose noise-free loss is at most `target`."""
  h = jnp.asarray(problem.curvature, jnp.float32)
  noise = jnp.asarray(np.sqrt(problem.noise / batch_size), jnp.float32)
  opt = optax.with_extra_args_support(OPTIMIZERS[name]())

  def run(lr, seed):
    key = jax.random.key(seed)
    theta = jnp.asarray(problem.start, jnp.float32)

    def step(carry, t):
      theta, state = carry
      xi = jax.random.normal(jax.random.fold_in(key, t), theta.shape) * noise

      def value_fn(p):  # the batch loss: gradient H theta + xi, Hessian H
        return 0.5 * jnp.sum(h * p**2) + jnp.sum(xi * p)

      updates, state = opt.update(jax.grad(value_fn)(theta), state, theta, value_fn=value_fn)
      theta = theta + lr * updates
      return (theta, state), 0.5 * jnp.sum(h * theta**2)

    _, losses = jax.lax.scan(step, (theta, opt.init(theta)), jnp.arange(steps))
    reached = losses <= target
    return jnp.where(jnp.any(reached), jnp.argmax(reached) + 1, jnp.iinfo(jnp.int32).max)

  grid = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))
  return np.asarray(grid(jnp.asarray(learning_rates, jnp.float32), jnp.asarray(seeds)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dimension", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--learning-rates", type=int, default=12, help="points of the log grid")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/nqm"))
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)

  problem = NoisyQuadratic.make(args.dimension)
  target = 0.01 * problem.loss(problem.start)
  learning_rates = np.geomspace(1e-4, 3.0, args.learning_rates)
  seeds = np.arange(args.seeds)
  censored = np.iinfo(np.int32).max
  measured: dict[str, dict[int, dict]] = {}
  for name in args.optimizers:
    measured[name] = {}
    for batch_size in args.batch_sizes:
      start = time.perf_counter()
      counts = measure(name, problem, batch_size, learning_rates, seeds, args.steps, target)
      per_rate = np.median(counts.astype(np.float64), axis=1)  # censored stays large
      best = int(np.argmin(per_rate))
      reached = per_rate[best] < censored
      measured[name][batch_size] = {
        "steps": float(per_rate[best]) if reached else None,
        "learning_rate": float(learning_rates[best]) if reached else None,
        "at_grid_edge": bool(reached and best in (0, len(learning_rates) - 1)),
        "seconds": time.perf_counter() - start,
      }
      print(f"{name:10s} B={batch_size:5d} steps={measured[name][batch_size]['steps']}", flush=True)
  predicted = {
    str(p): {b: problem.predicted_steps(target, b, p)[0] for b in args.batch_sizes}
    for p in PREDICTIONS
  }
  record = {
    "dimension": args.dimension,
    "target": target,
    "max_steps": args.steps,
    "seeds": args.seeds,
    "learning_rates": learning_rates.tolist(),
    "measured": measured,
    "predicted": predicted,
    "jax": jax.__version__,
    "device": str(jax.devices()[0].device_kind),
  }
  (args.out / "nqm_batch_size.json").write_text(json.dumps(record, indent=1) + "\n")
  _write_table(args, measured, predicted)
  _plot(args, measured, predicted)


def _cell(entry) -> str:
  if entry["steps"] is None:
    return "not reached"
  mark = " (edge)" if entry["at_grid_edge"] else ""
  return f"{entry['steps']:.0f} (lr {entry['learning_rate']:.2g}){mark}"


def _write_table(args, measured, predicted) -> None:
  names = list(measured)
  lines = [
    f"# Steps to 1% of the initial loss on the noisy quadratic model ({args.dimension}-d)",
    "",
    f"`python benchmarks/nqm_batch_size.py` (max {args.steps} steps, median of {args.seeds} "
    f"seeds at the best of {args.learning_rates} log-spaced learning rates in [1e-4, 3]; "
    "'edge': the best rate is an end of the grid). Prediction: the closed-form expected "
    "loss of SGD preconditioned by h^-p at its best learning rate (Zhang et al. 2019).",
    "",
    "| batch size | " + " | ".join(names) + " | " + " | ".join(PREDICTIONS.values()) + " |",
    "|---" * (1 + len(names) + len(PREDICTIONS)) + "|",
  ]
  for b in args.batch_sizes:
    row = [_cell(measured[n][b]) for n in names]
    row += [f"{predicted[str(p)][b]:.0f}" for p in PREDICTIONS]
    lines.append(f"| {b} | " + " | ".join(row) + " |")
  (args.out / "nqm_batch_size.md").write_text("\n".join(lines) + "\n")


def _plot(args, measured, predicted) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for p, label in PREDICTIONS.items():
    ys = [predicted[str(p)][b] for b in args.batch_sizes]
    ax.plot(args.batch_sizes, ys, "--", lw=1, label=f"prediction: {label}")
  for name, row in measured.items():
    points = [(b, e["steps"]) for b, e in row.items() if e["steps"] is not None]
    if points:
      ax.plot(*zip(*points, strict=True), "o-", label=name)
  ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps to target")
  ax.set_title(f"Noisy quadratic model, {args.dimension}-d, h_i = 1/i")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out / "nqm_batch_size.png", dpi=120)


if __name__ == "__main__":
  main()
