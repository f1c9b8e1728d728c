"""Training runs: one jitted step, timed apart from compilation and evaluation, resumable."""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvopt
from curvopt import _tree
from curvopt.bench import results, sharding
from curvopt.bench.config import RunSpec, build_workload
from curvopt.bench.optimizers import (
  OPTIMIZERS,
  OptimizerSpec,
  build_optimizer,
  learning_rate_schedule,
)
from curvopt.bench.workloads import Workload
from curvopt.transforms import SkipNonFiniteState

# Sharpness is measured on at most this many training examples (fixed ones).
_SHARPNESS_EXAMPLES = 512


def _extra_args(spec: OptimizerSpec, workload: Workload, batch, value, grad) -> dict:
  inputs, targets = batch
  available = {
    "value": value,
    "grad": grad,
    "value_fn": lambda p: workload.value_fn(p, batch),
    "model_fn": lambda p: workload.model_fn(p, inputs),
    "loss_fn": lambda outputs: workload.loss_fn(outputs, targets),
  }
  return {name: available[name] for name in spec.extra_args}


def make_step(workload: Workload, spec: OptimizerSpec, optimizer: optax.GradientTransformation):
  """`(params, state, batch) -> (params, state, loss, finite)`, one optimizer step."""

  def step(params, state, batch):
    value_fn = lambda p: workload.value_fn(p, batch)
    if spec.value_and_grad_from_state:
      value, grad = optax.value_and_grad_from_state(value_fn)(params, state=state)
    else:
      value, grad = jax.value_and_grad(value_fn)(params)
    updates, state = optimizer.update(
      grad, state, params, **_extra_args(spec, workload, batch, value, grad)
    )
    finite = jnp.isfinite(value) & jnp.all(
      jnp.array([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)])
    )
    return optax.apply_updates(params, updates), state, value, finite

  return step


def tree_bytes(tree: Any) -> int:
  """Bytes held by the arrays of a pytree (an optimizer state, parameters)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _save_checkpoint(path: pathlib.Path, tree: Any, meta: dict) -> None:
  """Writes the leaves (PRNG keys as their raw data) atomically."""
  leaves = [
    np.asarray(jax.random.key_data(x) if _tree.is_key(x) else x) for x in jax.tree.leaves(tree)
  ]
  with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
    np.savez(f, *leaves, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    f.flush()
    os.fsync(f.fileno())
  os.replace(f.name, path)


def _load_checkpoint(path: pathlib.Path, like: Any) -> tuple[Any, dict]:
  """Reads a checkpoint into the structure (and key types) of `like`."""
  template, treedef = jax.tree.flatten(like)
  with np.load(path) as archive:
    leaves = [archive[f"arr_{i}"] for i in range(len(template))]
    meta = json.loads(bytes(archive["meta"]).decode())
  restored = [
    jax.random.wrap_key_data(jnp.asarray(x), impl=jax.random.key_impl(t))
    if _tree.is_key(t)
    else jnp.asarray(x)
    for x, t in zip(leaves, template, strict=True)
  ]
  return jax.tree.unflatten(treedef, restored), meta


# A run whose guard skipped more than this fraction of its steps is marked failed.
FAILED_SKIP_FRACTION = 0.5


def guard_counts(state: Any) -> tuple[int, int]:
  """`(skipped, resets)` summed over every `skip_nonfinite` guard in an optimizer state."""
  guards = [
    x
    for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SkipNonFiniteState))
    if isinstance(x, SkipNonFiniteState)
  ]
  return sum(int(g.skipped) for g in guards), sum(int(g.resets) for g in guards)


# Seeds of one trial run one after another with the same shapes: compile once.
_compiled: dict[str, tuple[Any, float, int | None]] = {}


def _compile(spec: RunSpec, workload: Workload, params, state, first_batch):
  key = f"{spec.trial_id}/x64={jax.config.jax_enable_x64}"
  if key not in _compiled:
    opt_spec = OPTIMIZERS[spec.optimizer]
    optimizer = _optimizer(spec, workload)
    layouts = {}
    if spec.mesh:  # the step hands back the layouts it was given: no resharding between steps
      layout = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
      layouts["out_shardings"] = (layout(params), layout(state), None, None)
    step_fn = jax.jit(make_step(workload, opt_spec, optimizer), **layouts)
    start = time.perf_counter()
    compiled = step_fn.lower(params, state, first_batch).compile()
    _compiled.clear()
    _compiled[key] = (compiled, time.perf_counter() - start, _step_memory(compiled))
  return _compiled[key]


def _optimizer(spec: RunSpec, workload: Workload) -> optax.GradientTransformation:
  lr = learning_rate_schedule(spec.learning_rate, spec.schedule, spec.steps, spec.warmup_fraction)
  return build_optimizer(OPTIMIZERS[spec.optimizer], workload, lr, dict(spec.hyperparameters))


def _spec_record(spec: RunSpec) -> dict:
  return {"event": "spec", "spec_id": spec.spec_id, "spec": spec.identity()}


def run(
  spec: RunSpec, out_dir: pathlib.Path, on_steps: Callable[[int], None] = lambda n: None
) -> dict:
  """Runs (or resumes, or skips when finished) one run; returns its summary.

  The log's first record is the run's whole spec; a log or checkpoint written
  for another spec is never resumed or reported (the run starts afresh).
  """
  runs_dir = out_dir / "runs"
  runs_dir.mkdir(parents=True, exist_ok=True)
  log_path = runs_dir / f"{spec.run_id}.jsonl"
  ckpt_path = runs_dir / f"{spec.run_id}.ckpt.npz"
  records = results.read_records(log_path)
  if not records or records[0] != _spec_record(spec):
    records = []
    ckpt_path.unlink(missing_ok=True)
  if records and records[-1].get("event") == "done":
    on_steps(spec.steps)
    return records[-1]

  workload = build_workload(spec.workload, spec.workload_options)
  mesh = sharding.make_mesh(spec.mesh) if spec.mesh else None
  params = workload.init_params(jax.random.key(spec.seed))
  state = _optimizer(spec, workload).init(params)
  progress = {"step": 0, "train_time": 0.0, "nonfinite": 0, "step_times": []}
  if ckpt_path.exists():
    restored, meta = _load_checkpoint(ckpt_path, (params, state))
    if meta.get("spec_id") == spec.spec_id:  # another spec's checkpoint: start afresh
      (params, state), progress = restored, meta["progress"]
      records = [r for r in records if r.get("step", 0) <= progress["step"]]
    else:
      records = []
  else:
    records = []
  if mesh is not None:
    params, state = sharding.place_params(mesh, params), sharding.place_state(mesh, state, params)
  records = records or [_spec_record(spec)]
  results.write_atomic(log_path, "".join(f"{json.dumps(r)}\n" for r in records))
  on_steps(progress["step"])

  def batch_at(step: int):
    batch = workload.batch(spec.seed, step)
    return (
      sharding.place_batch(mesh, batch) if mesh is not None else jax.tree.map(jnp.asarray, batch)
    )

  first = batch_at(progress["step"])
  compiled, compile_s, memory = _compile(spec, workload, params, state, first)
  evaluate = _evaluator(workload, spec.sharpness_every)
  eval_params = OPTIMIZERS[spec.optimizer].eval_params or (lambda state, params: params)

  def record_at(step: int) -> dict:
    skipped, resets = guard_counts(state)
    record = {
      "step": step,
      "time": progress["train_time"],
      **evaluate(eval_params(state, params), step),
      "guard_skipped": skipped,
      "guard_resets": resets,
    }
    results.append_record(log_path, record)
    records.append(record)
    return record

  step = progress["step"]
  diverged = False
  if step == 0 and len(records) == 1:
    record_at(0)
  while step < spec.steps:
    if spec.max_seconds is not None and progress["train_time"] >= spec.max_seconds:
      break
    batch = batch_at(step)
    tick = time.perf_counter()
    params, state, loss, finite = compiled(params, state, batch)
    finite = bool(finite)  # waits for the step to finish
    elapsed = time.perf_counter() - tick
    progress["train_time"] += elapsed
    progress["step_times"].append(elapsed)
    progress["nonfinite"] += int(not finite)
    step += 1
    on_steps(1)
    diverged = not math.isfinite(float(loss))
    if diverged or step % spec.eval_every == 0 or step == spec.steps:
      record_at(step)
      progress["step"] = step
      if diverged:
        break
      if step % spec.checkpoint_every == 0 and step < spec.steps:
        _save_checkpoint(
          ckpt_path, (params, state), {"spec_id": spec.spec_id, "progress": progress}
        )

  if records[-1].get("step") != step:  # stopped by max_seconds between evaluations
    record_at(step)
  on_steps(spec.steps - step)  # a run that stopped early still completes its share of progress
  summary = _summary(
    spec, workload, records[1:], spec.target, progress, compile_s, memory, state, step, diverged
  )
  results.append_record(log_path, summary)
  ckpt_path.unlink(missing_ok=True)
  return summary


def _step_memory(compiled) -> int | None:
  try:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)
  except Exception:  # not every backend reports it
    return None


def _peak_device_bytes() -> int | None:
  """The device's peak memory in this process so far (accelerators report it; XLA:CPU not).

  A high-water mark: after several runs in one process it is the largest of
  them; the compiled step's own memory is `step_memory_bytes`.
  """
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


@functools.lru_cache(maxsize=4)
def _evaluator(workload: Workload, sharpness_every: int) -> Callable[[Any, int], dict]:
  """Training loss, test metric and (every `sharpness_every` steps) sharpness, jitted once."""
  train_batch = jax.tree.map(jnp.asarray, workload.eval_batch())
  train_loss = jax.jit(lambda p: workload.value_fn(p, train_batch))
  test_metric = jax.jit(workload.test_metric_fn)
  sharp_batch = jax.tree.map(lambda x: x[:_SHARPNESS_EXAMPLES], train_batch)
  sharpness = jax.jit(
    lambda p: curvopt.estimate_sharpness(
      curvopt.hessian(
        lambda q: workload.value_fn(q, sharp_batch), p, num_examples=len(sharp_batch[0])
      ),
      jax.random.key(0),
      num_iterations=20,
    )
  )

  def evaluate(params, step: int) -> dict:
    record = {
      "train_loss": float(train_loss(params)),
      workload.test_metric: float(test_metric(params)),
    }
    if sharpness_every and step % sharpness_every == 0:
      estimate = sharpness(params)
      record["sharpness"] = float(estimate.sharpness)
      record["sharpness_examples"] = int(estimate.num_examples)
    return record

  return evaluate


def _summary(
  spec, workload, records, target, progress, compile_s, memory, state, step, diverged
) -> dict:
  hit = next((r for r in records if r["train_loss"] <= target), None)
  last = records[-1] if records else {}
  times = progress["step_times"]
  # The first timed step after a (re)compile can still warm caches: skip it.
  median_step_s = statistics.median(times[1:] or times) if times else math.nan
  skipped, resets = guard_counts(state)
  failure = None
  if diverged:
    failure = f"training loss not finite at step {step}"
  elif step == 0:
    failure = "no step ran"
  elif skipped > FAILED_SKIP_FRACTION * step:
    failure = f"guard skipped {skipped} of {step} steps"
  elif not results.finite_number(last.get("train_loss")):
    failure = "final training loss not finite"
  summary = {
    "event": "done",
    "run_id": spec.run_id,
    "spec_id": spec.spec_id,
    "trial_id": spec.trial_id,
    "workload": spec.workload,
    "optimizer": spec.optimizer,
    "trial": spec.trial,
    "learning_rate": spec.learning_rate,
    "tuned": {k: v for k, v in spec.hyperparameters if k in spec.tuned},
    "schedule": spec.schedule,
    "seed": spec.seed,
    "steps": spec.steps,
    "steps_run": step,
    "final_train_loss": last.get("train_loss", math.nan),
    "test_metric": workload.test_metric,
    "final_test_metric": last.get(workload.test_metric, math.nan),
    "target": target,
    "steps_to_target": hit["step"] if hit and not failure else None,
    "time_to_target_s": hit["time"] if hit and not failure else None,
    "train_time_s": progress["train_time"],
    "median_step_ms": 1e3 * median_step_s,
    "compile_s": compile_s,
    "optimizer_state_bytes": tree_bytes(state),
    "step_memory_bytes": memory,
    "peak_device_bytes": _peak_device_bytes(),
    "nonfinite_steps": progress["nonfinite"],
    "guard_skipped": skipped,
    "guard_resets": resets,
    "diverged": diverged,
    "failed": failure is not None,
    "failure": failure,
    "spec": spec.identity(),
  }
  # Steps to target x the windowed step time (see results.robust_step_seconds).
  return results.with_robust_times(summary, records)
