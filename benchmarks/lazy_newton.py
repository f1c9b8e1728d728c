"""Lazy-Hessian cubic Newton: total cost to gradient norm 1e-8 for m in {1, sqrt(d), d}.

Full batch, float64, from zero: L2-regularized logistic regression on sklearn
breast cancer (d = 31) and L2-regularized softmax regression on sklearn digits
(d = 650). For every method: steps, Hessian computations (dense Hessians of
`d` Hessian-vector products each), loss evaluations (each with at most one
gradient; the step's own gradient included), and wall time after compilation.
Baselines: exact Newton (`H^{-1} g`, a fresh Hessian every step, unit steps),
`optax.lbfgs` (zoom line search), gradient descent with step `1/L`
(`L` the largest Hessian eigenvalue at the start, an upper bound here).

Run:  python benchmarks/lazy_newton.py --out benchmarks/results/lazy_newton.md
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import curvopt  # noqa: E402
from curvopt.bench import data  # noqa: E402

TOLERANCE = 1e-8
L2 = 1e-3


def _logistic():
  d = data.breast_cancer()
  x, y = jnp.asarray(d.x_train, jnp.float64), jnp.asarray(d.y_train, jnp.float64)

  def value_fn(p):
    logits = x @ p["w"] + p["b"]
    return jnp.mean(jax.nn.softplus(logits) - y * logits) + 0.5 * L2 * jnp.sum(p["w"] ** 2)

  return "breast_cancer_logreg", value_fn, {"w": jnp.zeros(30), "b": jnp.zeros(())}


def _softmax():
  d = data.digits()
  x, y = jnp.asarray(d.x_train, jnp.float64), jnp.asarray(d.y_train)

  def value_fn(p):
    logits = x @ p["w"] + p["b"]
    log_p = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))
    return loss + 0.5 * L2 * jnp.sum(p["w"] ** 2)

  return "digits_softmax_regression", value_fn, {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}


def _counted(value_fn, counter):
  def counted(p):
    jax.debug.callback(lambda: counter.__setitem__(0, counter[0] + 1))
    return value_fn(p)

  return counted


def _optax_method(opt, value_fn, counter, from_state):
  counted = _counted(value_fn, counter)

  @jax.jit
  def step(params, state):
    if from_state:  # L-BFGS reuses the value and gradient of its line search
      value, grad = optax.value_and_grad_from_state(counted)(params, state=state)
    else:
      value, grad = jax.value_and_grad(counted)(params)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=counted)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grad)

  return step


def _lazy_method(opt, value_fn, counter):
  counted = _counted(value_fn, counter)

  @jax.jit
  def step(params, state):
    grad = jax.grad(counted)(params)
    updates, state = opt.update(grad, state, params, value_fn=counted)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grad)

  return step


def _newton_method(value_fn, counter):
  counted = _counted(value_fn, counter)

  @jax.jit
  def step(params, state):
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda f: counted(unravel(f)))(flat)
    hess = jax.hessian(lambda f: value_fn(unravel(f)))(flat)
    return unravel(flat - jnp.linalg.solve(hess, grad)), state + 1, jnp.linalg.norm(grad)

  return step


def _run(step, params, state, max_steps):
  step = step.lower(params, state).compile()
  start = time.perf_counter()
  for n in range(max_steps):
    params, state, grad_norm = step(params, state)
    if float(grad_norm) <= TOLERANCE:
      return n, time.perf_counter() - start, state
  return None, time.perf_counter() - start, state


def _methods(value_fn, params, d):
  flat, unravel = ravel_pytree(params)
  lipschitz = float(np.linalg.eigvalsh(jax.hessian(lambda f: value_fn(unravel(f)))(flat))[-1])
  root = max(1, round(math.sqrt(d)))
  for label, every in (("1", 1), (f"sqrt(d) = {root}", root), (f"d = {d}", d)):
    yield f"lazy_newton m = {label}", "lazy", curvopt.lazy_newton(hessian_every=every)
  yield "exact Newton", "newton", None
  yield "optax.lbfgs", "lbfgs", optax.lbfgs()
  yield f"gradient descent (1/L, L = {lipschitz:.3g})", "gd", optax.sgd(1.0 / lipschitz)


def _measure(problem, max_steps: int) -> list[str]:
  name, value_fn, params = problem()
  d = ravel_pytree(params)[0].size
  rows = [
    f"### {name} (d = {d})",
    "",
    "| method | steps to 1e-8 | Hessians | loss evaluations | wall time (s) |",
    "|---|---:|---:|---:|---:|",
  ]
  for label, kind, opt in _methods(value_fn, params, d):
    counter = [0]
    if kind == "newton":
      steps, seconds, state = _run(_newton_method(value_fn, counter), params, 0, max_steps)
      hessians = "—" if steps is None else steps + 1
    else:
      if kind == "lazy":
        step = _lazy_method(opt, value_fn, counter)
      else:
        step = _optax_method(opt, value_fn, counter, from_state=kind == "lbfgs")
      steps, seconds, state = _run(step, params, opt.init(params), max_steps)
      hessians = int(state[0].hessians) if kind == "lazy" else 0
    evaluations = counter[0]
    reached = f"{steps}" if steps is not None else f"> {max_steps}"
    rows.append(f"| {label} | {reached} | {hessians} | {evaluations} | {seconds:.3f} |")
    print(rows[-1], flush=True)
  return [*rows, ""]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--max-steps", type=int, default=20000)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  lines = [
    "# Lazy-Hessian cubic Newton: cost to gradient norm 1e-8 (full batch, float64, 2 CPU cores)",
    "",
    "Command: `python benchmarks/lazy_newton.py`. Loss evaluations count every",
    "`value_fn` call (the step's gradient, line-search and sufficient-decrease trials),",
    "excluding the compile run. The adaptive `M` starts at 1.",
    "",
  ]
  for problem in (_logistic, _softmax):
    lines += _measure(problem, args.max_steps)
  text = "\n".join(lines)
  print(text)
  if args.out:
    args.out.write_text(text)


if __name__ == "__main__":
  main()
