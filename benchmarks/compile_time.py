"""First-step compile time of every runner optimizer against optax.adam, per workload.

The runner's own jitted step (gradient, optimizer update, parameter update)
is traced, lowered and compiled from a cold cache (`jax.clear_caches()`
before each), so the figure is what a user waits for on the first step. Each
optimizer is measured `--repeats` times, round-robin with Adam, and the
median is kept; the table gives the ratio to Adam's median (target: at most
2x), the time spent tracing and lowering beside XLA's compile, and the size
of the traced program (equations, nested ones included), which is where
unrolled Python loops over leaves or blocks show, and the number of kernels
of the compiled one (fusions and unfused heavy operations), which XLA's
compile time follows.

Each optimizer is also set against its floor: Adam's step with the derivative
programs the method cannot do without (a Hessian-vector product for the Hessian
methods and Gauss-Newton's Jacobian products, a second gradient for SAM's
family and L-BFGS's line search). The issue's target is met where the step
compiles in at most 2x Adam's time, or in at most 1.2x its floor's.

Run:  python benchmarks/compile_time.py --workloads mnist1d_cnn,gpt_lm \\
        --out benchmarks/results/compile_time.md
Where an optimizer's kernels come from (a row per variant):
      python benchmarks/compile_time.py --workloads gpt_lm --optimizers newton_cg \\
        --repeats 1 --variant "newton_cg:adaptive_damping=False"
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import platform
import re
import statistics
import time

import jax
import jax.extend.core
import jax.numpy as jnp
import optax

from curvopt.bench.optimizers import OPTIMIZERS, build_optimizer
from curvopt.bench.runner import make_step
from curvopt.bench.workloads import WORKLOADS


def count_equations(jaxpr) -> int:
  """Equations of a jaxpr, those of nested jaxprs (loops, conditionals, calls) included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += count_equations(sub)
  return total


_KERNEL = re.compile(r"= \S+ (fusion|dot|convolution|custom-call|reduce|sort|scatter|gather)\(")


def count_kernels(optimized_hlo: str) -> int:
  """Kernels of a compiled program: its fusions and unfused heavy operations, in every body.

  XLA:CPU's compile time follows this count (each kernel is generated and
  optimized by LLVM on its own) more than the jaxpr's size.
  """
  kernels, inside_fusion = 0, False
  for line in optimized_hlo.splitlines():
    if line and not line.startswith(" "):  # a computation's header (or its closing brace)
      inside_fusion = line.lstrip("%").startswith(("fused", "wrapped"))
    elif not inside_fusion and _KERNEL.search(line):
      kernels += 1
  return kernels


def parse_variant(text: str) -> tuple[str, str, dict]:
  """`"newton_cg:backtracking=False,max_cg_iters=10"` -> (label, optimizer, keywords)."""
  name, _, assignments = text.partition(":")
  if name not in OPTIMIZERS:
    raise SystemExit(f"--variant {text!r}: unknown optimizer {name!r}.")
  keywords = {}
  for assignment in filter(None, assignments.split(",")):
    key, _, value = assignment.partition("=")
    try:
      keywords[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise SystemExit(
        f"--variant {text!r}: {assignment!r} must be KEYWORD=VALUE with a Python literal "
        "value (a number, True/False, None or a quoted string)."
      ) from None
  label = f"{name}({', '.join(f'{k}={v!r}' for k, v in keywords.items())})"
  return label, name, keywords


def _inputs(workload):
  """The first step's parameters and batch, as every measured program gets them."""
  return workload.init_params(jax.random.key(0)), jax.tree.map(jnp.asarray, workload.batch(0, 0))


def measure_once(workload, name: str, keywords: dict | None = None) -> dict:
  spec = OPTIMIZERS[name]
  if keywords:
    spec = dataclasses.replace(spec, factory=functools.partial(spec.factory, **keywords))
  optimizer = build_optimizer(spec, workload, 1e-3, {})
  params, batch = _inputs(workload)
  state = optimizer.init(params)
  return _measure(jax.jit(make_step(workload, spec, optimizer)), params, state, batch)


def _measure(step, params, state, batch) -> dict:
  jax.clear_caches()
  start = time.perf_counter()
  traced = step.trace(params, state, batch)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  return {
    "trace_s": traced_at - start,
    "lower_s": lowered_at - traced_at,
    "compile_s": compiled_at - lowered_at,
    "total_s": compiled_at - start,
    "equations": count_equations(traced.jaxpr.jaxpr),
    "kernels": count_kernels(compiled.as_text()),
  }


# What each method must compile beyond Adam's step; absent: Adam's step is its floor.
FLOORS = {
  **dict.fromkeys(
    ["adahessian", "sophia_h", "psgd_kron_newton", "newton_cg", "lazy_newton", "egn", "egn_lm"],
    "hvp",
  ),
  **dict.fromkeys(["sam", "asam", "gam", "lbfgs"], "two_gradients"),
}


def floor_step(workload, kind: str):
  """Adam's runner step plus the derivative program of `kind`, its output used by the update."""
  adam = optax.adam(1e-3)

  def step(params, state, batch):
    loss = lambda p: workload.value_fn(p, batch)
    value, grad = jax.value_and_grad(loss)(params)
    if kind == "hvp":  # forward-over-reverse, in the direction of the gradient
      _, extra = jax.jvp(jax.grad(loss), (params,), (grad,))
    else:  # a second gradient at a perturbed point
      extra = jax.grad(loss)(jax.tree.map(lambda p, g: p + 1e-2 * g, params, grad))
    updates, state = adam.update(jax.tree.map(jnp.add, grad, extra), state, params)
    finite = jnp.isfinite(value) & jnp.all(
      jnp.array([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)])
    )
    return optax.apply_updates(params, updates), state, value, finite

  return step, adam


def measure_floor_once(workload, kind: str) -> dict:
  step, adam = floor_step(workload, kind)
  params, batch = _inputs(workload)
  return _measure(jax.jit(step), params, adam.init(params), batch)


def model_kernels(workload) -> dict:
  """Kernels of the workload's own programs: what any optimizer's step holds at least."""
  params, batch = _inputs(workload)
  loss = lambda p: workload.value_fn(p, batch)
  hvp = lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))
  programs = {
    "forward": (loss, (params,)),
    "value_and_grad": (jax.value_and_grad(loss), (params,)),
    "Hessian-vector product (forward-over-reverse)": (hvp, (params, params)),
  }
  return {
    name: count_kernels(jax.jit(fn).lower(*args).compile().as_text())
    for name, (fn, args) in programs.items()
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", default="digits_mlp,mnist1d_cnn,char_transformer")
  parser.add_argument("--optimizers", default=",".join(n for n in OPTIMIZERS if n != "adam"))
  parser.add_argument("--size", default="small", help="for workloads with sizes")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--variant",
    action="append",
    default=[],
    help="an optimizer with changed keywords, as a row of its own, e.g. "
    '"newton_cg:backtracking=False" (repeatable)',
  )
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  lines = [
    f"Cold-cache first-step compile time, median of {args.repeats} (round-robin with Adam); "
    f"jax {jax.__version__}, {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"{platform.machine()}, {jax.device_count()} device(s). "
    "`python benchmarks/compile_time.py` "
    f"--workloads {args.workloads} --size {args.size}.",
    "",
  ]
  for workload_name in args.workloads.split(","):
    factory = WORKLOADS[workload_name]
    sized = "size" in inspect.signature(factory).parameters
    workload = factory(**({"size": args.size} if sized else {}))
    names = ["adam", *[n for n in args.optimizers.split(",") if n and n != "adam"]]
    rows = {n: (n, {}) for n in names}
    rows.update({label: (name, kw) for label, name, kw in map(parse_variant, args.variant)})
    floors = sorted({FLOORS[name] for name, _ in rows.values() if name in FLOORS})
    samples: dict[str, list[dict]] = {label: [] for label in rows}
    samples.update({f"floor: {kind}": [] for kind in floors})
    for _ in range(args.repeats):
      for label, (name, keywords) in rows.items():
        samples[label].append(measure_once(workload, name, keywords))
      for kind in floors:
        samples[f"floor: {kind}"].append(measure_floor_once(workload, kind))
    median = {
      n: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for n, runs in samples.items()
    }
    adam = median["adam"]["total_s"]
    title = f"### {workload_name}" + (f" ({args.size})" if sized else "")
    lines += [
      title,
      "",
      "| optimizer | total s | x adam | floor | x floor | target | trace s | lower s "
      "| XLA compile s | equations | kernels | kernels x adam | kernels x floor |",
      "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in median.items():
      name = rows[label][0] if label in rows else None
      kind = FLOORS.get(name, "adam") if name else None
      floor = median["adam" if kind == "adam" else f"floor: {kind}"] if kind else m
      by_adam, by_floor = m["total_s"] / adam, m["total_s"] / floor["total_s"]
      met = "—" if not kind else "met" if by_adam <= 2 or by_floor <= 1.2 else "**not met**"
      lines.append(
        f"| {label} | {m['total_s']:.2f} | {by_adam:.2f} | {kind or '—'} | "
        f"{by_floor:.2f} | {met} | {m['trace_s']:.2f} "
        f"| {m['lower_s']:.2f} | {m['compile_s']:.2f} | {m['equations']:.0f} "
        f"| {m['kernels']:.0f} | {m['kernels'] / median['adam']['kernels']:.2f} "
        f"| {m['kernels'] / floor['kernels']:.2f} |"
      )
    model = ", ".join(f"{name} {count}" for name, count in model_kernels(workload).items())
    lines += ["", f"The model's own programs, in kernels: {model}.", ""]
    print("\n".join(lines[-(len(rows) + 7) :]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines))


if __name__ == "__main__":
  main()
