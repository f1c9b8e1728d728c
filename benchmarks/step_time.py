"""Step time, compile time and state size of runner optimizers against a reference, side by side.

Times full jitted training steps (gradient, optimizer update, parameter
update) on runner workloads, in blocks of 20 steps (so a refresh every 10
steps is counted), blocks interleaved round-robin across optimizers; reports
the median block per step, its ratio to the reference's (optax.adam unless
--reference), the first step's compile time, and the optimizer state's bytes
relative to the parameters'.

Where a method's time goes: `--variant` adds a row for an optimizer with changed
keywords (a refresh period beyond the run: no refreshes; `update_probability=0.0`:
PSGD fits at step 0 only), and the pseudo-keyword `guard=False` builds it without
the non-finite guard.

Run:  python benchmarks/step_time.py --optimizers shampoo,soap \\
        --workloads digits_mlp,mnist1d_cnn,char_transformer [--set shampoo.block_size=256]
      python benchmarks/step_time.py --reference adamw --optimizers soap \\
        --workload gpt_lm:size=small --workload digits_mlp:hidden=384-192,batch_size=200 \\
        --variant "soap:precondition_frequency=1000000000" --variant "soap:guard=False"
"""

from __future__ import annotations

import argparse
import ast
import inspect
import platform
import statistics
import time
import types

import jax
import jax.numpy as jnp
import optax
from compile_time import parse_variant  # the same --variant syntax and row labels

import curvopt.alias
from curvopt.bench.optimizers import OPTIMIZERS, build_optimizer
from curvopt.bench.runner import tree_bytes
from curvopt.bench.workloads import WORKLOADS

BLOCK = 20


def train_step(workload, optimizer, extra_args=()):
  """A jitted step `(params, state, batch) -> (params, state)` passing the extra arguments asked."""

  def step(params, state, batch):
    inputs, targets = batch
    value_fn = lambda p: workload.value_fn(p, batch)
    value, grads = jax.value_and_grad(value_fn)(params)
    available = {
      "value": value,
      "grad": grads,
      "value_fn": value_fn,
      "model_fn": lambda p: workload.model_fn(p, inputs),
      "loss_fn": lambda outputs: workload.loss_fn(outputs, targets),
    }
    extra = {name: available[name] for name in extra_args}
    updates, state = optimizer.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def without_guard(make):
  """`make()` with `skip_nonfinite` replaced by the identity in every alias module.

  The aliases import it by name, so each module's binding is swapped while
  `make` builds the optimizer, and restored after.
  """
  modules = [m for m in vars(curvopt.alias).values() if hasattr(m, "skip_nonfinite")]
  modules = [m for m in modules if isinstance(m, types.ModuleType)]
  saved = [m.skip_nonfinite for m in modules]
  for m in modules:
    m.skip_nonfinite = lambda inner: inner
  try:
    return make()
  finally:
    for m, guard in zip(modules, saved, strict=True):
      m.skip_nonfinite = guard


def block_runner(compiled, params, state, batches):
  """A warmed-up `() -> params` running one block of steps, carrying the state between calls."""
  carry = {"params": params, "state": state}

  def run():
    p, s = carry["params"], carry["state"]
    for b in batches:
      p, s = compiled(p, s, b)
    carry["params"], carry["state"] = p, s
    return p

  jax.block_until_ready(run())
  return run


def interleaved_medians(runners: dict, blocks: int) -> dict[str, float]:
  """Median milliseconds per step of each runner (one call = BLOCK steps), interleaved."""
  samples = {k: [] for k in runners}
  for _ in range(blocks):
    for key, run in runners.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      samples[key].append((time.perf_counter() - start) / BLOCK)
  return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def _measure(
  workload_text: str,
  rows: dict[str, tuple[str, dict]],
  reference: str,
  blocks: int,
) -> list[str]:
  name, _, options = workload_text.partition(":")
  workload = WORKLOADS[name](**_workload_options(WORKLOADS[name], options))
  params = workload.init_params(jax.random.key(0))
  batches = [jax.tree.map(jnp.asarray, workload.batch(0, i)) for i in range(BLOCK)]
  runners, compile_s, state_ratio = {}, {}, {}
  for label, (optimizer, keywords) in {reference: (reference, {}), **rows}.items():
    spec = OPTIMIZERS[optimizer]
    keywords = dict(keywords)
    guard = keywords.pop("guard", True)
    build = lambda spec=spec, keywords=keywords: build_optimizer(spec, workload, 1e-3, keywords)
    opt = build() if guard else without_guard(build)
    step = train_step(workload, opt, spec.extra_args)
    state = opt.init(params)
    start = time.perf_counter()
    compiled = step.lower(params, state, batches[0]).compile()
    compile_s[label] = time.perf_counter() - start
    state_ratio[label] = tree_bytes(state) / tree_bytes(params)
    runners[label] = block_runner(compiled, params, state, batches)
  ms = interleaved_medians(runners, blocks)
  lines = [
    f"### {workload_text}: {workload.description}",
    "",
    f"| optimizer | ms per step | x {reference} | compile s | state bytes / params |",
    "|---|---:|---:|---:|---:|",
  ]
  for label in runners:
    lines.append(
      f"| {label} | {ms[label]:.3f} | {ms[label] / ms[reference]:.2f} | {compile_s[label]:.2f} "
      f"| {state_ratio[label]:.1f} |"
    )
  return [*lines, ""]


def _workload_options(factory, text: str) -> dict:
  """`"size=small,hidden=384-192"` -> options: text where the factory's default is text,
  else a Python literal."""
  defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items()}
  out = {}
  for assignment in filter(None, text.split(",")):
    key, _, value = (part.strip() for part in assignment.partition("="))
    out[key] = value if isinstance(defaults.get(key), str) else ast.literal_eval(value)
  return out


def _variant(text: str) -> tuple[str, tuple[str, dict]]:
  """`"soap:precondition_frequency=1000000000"` -> (row label, (optimizer, keywords))."""
  label, name, keywords = parse_variant(text)
  return label, (name, keywords)


def _overrides(settings: list[str]) -> dict[str, dict]:
  out: dict[str, dict] = {}
  for item in settings:
    key, value = item.split("=", 1)
    name, field = key.split(".", 1)
    out.setdefault(name, {})[field] = ast.literal_eval(value)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--optimizers", default="shampoo,soap")
  parser.add_argument("--workloads", default="digits_mlp,mnist1d_cnn,char_transformer")
  parser.add_argument(
    "--workload", action="append", default=[], help="NAME:option=value,... (replaces --workloads)"
  )
  parser.add_argument("--reference", default="adam", help="the optimizer the ratios divide by")
  parser.add_argument("--set", action="append", default=[], help="optimizer.arg=value")
  parser.add_argument("--variant", action="append", default=[], help="optimizer:kw=value,...")
  parser.add_argument("--blocks", type=int, default=15)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  overrides = _overrides(args.set)
  rows = {name: (name, overrides.get(name, {})) for name in args.optimizers.split(",") if name}
  rows.update(dict(map(_variant, args.variant)))
  lines = [
    f"Median over {args.blocks} interleaved blocks of {BLOCK} steps, per step; "
    f"jax {jax.__version__}, {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"{platform.machine()}. Settings: {overrides or 'defaults'}.",
    "",
  ]
  for workload in args.workload or args.workloads.split(","):
    lines += _measure(workload, rows, args.reference, args.blocks)
    print("\n".join(lines[-(len(rows) + 6) :]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines))


if __name__ == "__main__":
  main()
