"""Benchmark configs: TOML files, validated in full before any training starts.

A config expands into runs. Each run is identified by its whole resolved
spec (workload and options, optimizer and every hyperparameter with defaults
filled in, schedule, budget, evaluation settings, target, seed), so that a
changed config is a new run and never meets old results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import numbers
import pathlib
import re
import tomllib
from typing import Any

from curvopt.bench.optimizers import OPTIMIZERS, SCHEDULES
from curvopt.bench.workloads import WORKLOADS


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and the valid choices."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a workload, one trial of an optimizer's search space, one seed."""

  workload: str
  workload_options: tuple[tuple[str, Any], ...]
  optimizer: str
  trial: int
  learning_rate: float
  hyperparameters: tuple[tuple[str, Any], ...]
  tuned: tuple[str, ...]
  schedule: str
  warmup_fraction: float
  seed: int
  steps: int
  max_seconds: float | None
  eval_every: int
  checkpoint_every: int
  sharpness_every: int
  target: float
  # `(("data", N), ("fsdp", M))` from `curvopt-bench run --mesh`; empty: one device.
  mesh: tuple[tuple[str, int], ...] = ()

  def identity(self, *, with_seed: bool = True) -> dict:
    """Everything that can change a run's numbers (not its checkpoint cadence)."""
    out = dataclasses.asdict(self)
    for key in ("trial", "tuned", "checkpoint_every", *(() if with_seed else ("seed",))):
      out.pop(key)
    if self.mesh:  # step times differ across meshes: another run
      out["mesh"] = ",".join(f"{name}={size}" for name, size in self.mesh)
    else:  # one-device specs keep the digests they had before meshes existed
      out.pop("mesh")
    out["workload_options"] = dict(self.workload_options)
    out["hyperparameters"] = dict(self.hyperparameters)
    return out

  @property
  def trial_id(self) -> str:
    """A digest of the spec without the seed: the seeds of one trial share it."""
    return _digest(self.identity(with_seed=False))

  @property
  def spec_id(self) -> str:
    return _digest(self.identity())

  @property
  def run_id(self) -> str:
    return (
      f"{self.workload}__{self.optimizer}__lr{self.learning_rate:.4g}"
      f"__{self.trial_id}__seed{self.seed}"
    )


def _digest(tree: dict) -> str:
  # json.dumps writes floats by repr: distinct values give distinct digests.
  text = json.dumps(tree, sort_keys=True, allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  runs: tuple[RunSpec, ...]
  raw: dict
  baseline: str | None = None


_BENCHMARK_KEYS = (
  "name",
  "seeds",
  "steps",
  "max_seconds",
  "eval_every",
  "checkpoint_every",
  "sharpness_every",
  "schedule",
  "warmup_fraction",
  "trials",
  "baseline",
)
_DEFAULTS = {
  "seeds": [0, 1, 2],
  "max_seconds": None,
  "eval_every": 25,
  "sharpness_every": 0,
  "schedule": "warmup_cosine",
  "warmup_fraction": 0.05,
  "trials": 4,
  "baseline": None,
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Significant digits kept of a sampled hyperparameter: readable and exactly reproducible.
_SAMPLE_DIGITS = 4


def _choices(options) -> str:
  return ", ".join(sorted(options))


def _expect(key: str, value: Any, types: tuple[type, ...], what: str) -> Any:
  if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
    raise ConfigError(f"{key} must be {what}, got {value!r} ({type(value).__name__}).")
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"{key} must be {what}, got {value!r}: not a finite number.")
  return value


def _positive_int(key: str, value: Any) -> int:
  _expect(key, value, (int,), "a positive integer")
  if value <= 0:
    raise ConfigError(f"{key} must be a positive integer, got {value}.")
  return value


def _positive_number(key: str, value: Any, what: str = "a positive number") -> float:
  _expect(key, value, (numbers.Real,), what)
  if not value > 0:
    raise ConfigError(f"{key} must be {what}, got {value}.")
  return float(value)


def _check_keys(section: str, table: dict, allowed) -> None:
  for key in table:
    if key not in allowed:
      raise ConfigError(f"unknown key {section}.{key}; valid keys: {_choices(allowed)}.")


def _schedule(key: str, table: dict, default: str) -> str:
  schedule = table.get("schedule", default)
  if schedule not in SCHEDULES:
    raise ConfigError(f"{key} must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
  return schedule


def _warmup_fraction(key: str, value: Any) -> float:
  _expect(key, value, (numbers.Real,), "a fraction in [0, 1)")
  if not 0 <= value < 1:
    raise ConfigError(f"{key} must be a fraction in [0, 1), got {value}.")
  return float(value)


def _benchmark(table: dict) -> dict:
  _check_keys("benchmark", table, _BENCHMARK_KEYS)
  if "steps" not in table:
    raise ConfigError("benchmark.steps is required: the step budget of every run.")
  out = {**_DEFAULTS, **table}
  name = _expect("benchmark.name", out.get("name", "benchmark"), (str,), "a string")
  if not _NAME.fullmatch(name):
    raise ConfigError(
      f"benchmark.name must be letters, digits, '.', '_' or '-' (it names a folder), got {name!r}."
    )
  _positive_int("benchmark.steps", out["steps"])
  _positive_int("benchmark.eval_every", out["eval_every"])
  out.setdefault("checkpoint_every", out["eval_every"])
  _positive_int("benchmark.checkpoint_every", out["checkpoint_every"])
  _expect("benchmark.sharpness_every", out["sharpness_every"], (int,), "an integer >= 0 (0: off)")
  if out["sharpness_every"] < 0:
    raise ConfigError("benchmark.sharpness_every must be >= 0 (0: off).")
  if out["max_seconds"] is not None:
    _positive_number("benchmark.max_seconds", out["max_seconds"], "a positive number of seconds")
  out["schedule"] = _schedule("benchmark.schedule", out, _DEFAULTS["schedule"])
  out["warmup_fraction"] = _warmup_fraction("benchmark.warmup_fraction", out["warmup_fraction"])
  _positive_int("benchmark.trials", out["trials"])
  seeds = _expect("benchmark.seeds", out["seeds"], (list,), "a non-empty list of integers")
  if not seeds:
    raise ConfigError("benchmark.seeds must be a non-empty list of integers.")
  for i, seed in enumerate(seeds):
    _expect(f"benchmark.seeds[{i}]", seed, (int,), "an integer")
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"benchmark.seeds has repeated seeds: {seeds}.")
  if out["baseline"] is not None:
    _expect("benchmark.baseline", out["baseline"], (str,), "an optimizer name")
  return out


_BUDGET_KEYS = ("steps", "max_seconds", "eval_every")


def build_workload(name: str, options: tuple[tuple[str, Any], ...]):
  """The workload, built once per process for each set of options (and x64 mode)."""
  import jax

  return _build_workload(name, options, bool(jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=32)
def _build_workload(name: str, options: tuple[tuple[str, Any], ...], x64: bool):
  del x64  # part of the cache key: the workload's arrays take the mode's dtypes
  try:
    return WORKLOADS[name](**dict(options))
  except Exception as error:  # any failure to build is the config's, named by its key
    raise ConfigError(f"workloads.{name}: {error}") from error


def _workload_options(name: str, table: dict) -> dict:
  factory = WORKLOADS[name]
  parameters = inspect.signature(factory).parameters
  allowed = {"target", *_BUDGET_KEYS, *parameters}
  _check_keys(f"workloads.{name}", table, allowed)
  for key in ("steps", "eval_every"):
    if key in table:
      _positive_int(f"workloads.{name}.{key}", table[key])
  if "max_seconds" in table:
    _positive_number(
      f"workloads.{name}.max_seconds", table["max_seconds"], "a positive number of seconds"
    )
  options = {k: v for k, v in table.items() if k not in ("target", *_BUDGET_KEYS)}
  for key, value in options.items():
    default = parameters[key].default
    if isinstance(default, str):
      types = (str,)
    elif isinstance(default, float):
      types = (numbers.Real,)
    else:
      types = (int, type(None))
    _expect(f"workloads.{name}.{key}", value, types, f"like its default {default!r}")
  workload = build_workload(name, tuple(sorted(options.items())))
  target = table.get("target", workload.target)
  _expect(f"workloads.{name}.target", target, (numbers.Real,), "a number (training-loss target)")
  if target < workload.loss_lower_bound:
    raise ConfigError(
      f"workloads.{name}.target = {target}: the training loss of {name} ({workload.loss_type}) "
      f"is never below {workload.loss_lower_bound:g}, so no run could reach it."
    )
  return {
    "options": options,
    "target": float(target),
    **{key: table[key] for key in _BUDGET_KEYS if key in table},
  }


def _hyperparameter(key: str, default: Any, value: Any) -> Any:
  if isinstance(default, bool):
    types, what = (bool,), "true or false"
  elif isinstance(default, int):
    types, what = (int,), "an integer"
  elif isinstance(default, str):
    types, what = (str,), f"a string like its default {default!r}"
  elif default is None:
    types, what = (numbers.Real, str, type(None)), "a number or a string (default None)"
  else:
    types, what = (numbers.Real,), f"a number (default {default!r})"
  return _expect(key, value, types, what)


def _search_dimension(key: str, default: Any, space: Any) -> Any:
  """A list of choices, or `{low, high, log}`; returns a function of u in [0, 1)."""
  if isinstance(space, list):
    if not space:
      raise ConfigError(f"{key} is an empty list of choices.")
    for i, value in enumerate(space):
      _hyperparameter(f"{key}[{i}]", default, value)
    return lambda u: space[min(int(u * len(space)), len(space) - 1)]
  if not isinstance(space, dict):
    raise ConfigError(
      f"{key} must be a list of values or a table {{low, high, log}}, got {space!r}."
    )
  _check_keys(key, space, ("low", "high", "log"))
  if "low" not in space or "high" not in space:
    raise ConfigError(f"{key} needs both low and high.")
  low = _expect(f"{key}.low", space["low"], (numbers.Real,), "a number")
  high = _expect(f"{key}.high", space["high"], (numbers.Real,), "a number")
  log = _expect(f"{key}.log", space.get("log", False), (bool,), "true or false")
  if not low < high:
    raise ConfigError(f"{key}: low must be below high, got low={low}, high={high}.")
  if log and not low > 0:
    raise ConfigError(f"{key}: a log range needs low > 0, got {low}.")
  integer = isinstance(default, int) and not isinstance(default, bool)

  def sample(u: float) -> Any:
    value = math.exp(math.log(low) + u * math.log(high / low)) if log else low + u * (high - low)
    if integer:
      return round(value)
    return float(f"{value:.{_SAMPLE_DIGITS}g}")

  return sample


def halton(num_points: int, dimension: int) -> list[list[float]]:
  """The first `num_points` points of the unscrambled Halton sequence, after its origin.

  Unscrambled, so the same config gives the same trials with any scipy version.
  """
  from scipy.stats import qmc

  engine = qmc.Halton(d=dimension, scramble=False)
  engine.fast_forward(1)  # the origin would put every dimension at its lower bound
  return engine.random(num_points).tolist()


def _trials(name: str, table: dict, default_trials: int) -> list[tuple[dict, tuple[str, ...]]]:
  """The trials of one optimizer: (hyperparameters incl. learning_rate, tuned names)."""
  spec = OPTIMIZERS[name]
  defaults = spec.hyperparameters
  key = f"optimizers.{name}"
  fixed = {
    k: _hyperparameter(f"{key}.{k}", defaults[k], v) for k, v in table.items() if k in defaults
  }
  search = table.get("search")
  if search is not None and not isinstance(search, dict):
    raise ConfigError(f"{key}.search must be a table, got {search!r}.")
  if "learning_rates" in table:
    if search is not None:
      raise ConfigError(
        f"{key}: give either learning_rates (a grid) or a search space with learning_rate, "
        "not both."
      )
    grid = _expect(f"{key}.learning_rates", table["learning_rates"], (list,), "a list of numbers")
    if not grid:
      raise ConfigError(f"{key}.learning_rates is empty; give at least one learning rate.")
    for i, lr in enumerate(grid):
      _positive_number(f"{key}.learning_rates[{i}]", lr, "a finite positive number")
    if len(set(grid)) != len(grid):
      raise ConfigError(f"{key}.learning_rates has repeated values: {grid}.")
    return [({**fixed, "learning_rate": float(lr)}, ("learning_rate",)) for lr in grid]
  if search is None:
    raise ConfigError(
      f"{key}.learning_rates is required (a non-empty list of numbers), or a [{key}.search] "
      "table with learning_rate."
    )
  allowed = {"trials", "learning_rate", *defaults}
  _check_keys(f"{key}.search", search, allowed)
  if "learning_rate" not in search:
    raise ConfigError(f"{key}.search.learning_rate is required: a list or {{low, high, log}}.")
  for k in search:
    if k in fixed:
      raise ConfigError(f"{key}.{k} is both fixed and searched; keep one.")
  trials = _positive_int(f"{key}.search.trials", search.get("trials", default_trials))
  names = sorted(k for k in search if k != "trials")
  samplers = [
    _search_dimension(f"{key}.search.{k}", defaults.get(k, 1.0), search[k]) for k in names
  ]
  out = []
  for point in halton(trials, len(names)):
    sampled = {k: f(u) for k, f, u in zip(names, samplers, point, strict=True)}
    # A space smaller than the budget (lists only) is searched exhaustively, once.
    if all(sampled != previous for previous, _ in out):
      out.append((sampled, tuple(names)))
  out = [({**fixed, **sampled}, tuned) for sampled, tuned in out]
  for hyper, _ in out:
    _positive_number(f"{key}.search.learning_rate", hyper["learning_rate"], "a positive number")
  return out


def parse(raw: dict, name: str = "benchmark") -> Config:
  """Validates a config dictionary and expands it into runs (nothing is built yet)."""
  _check_keys("(top level)", raw, {"benchmark", "workloads", "optimizers"})
  for section in ("benchmark", "workloads", "optimizers"):
    if not isinstance(raw.get(section), dict) or not raw[section]:
      raise ConfigError(f"[{section}] is required and must not be empty.")
  bench = _benchmark({"name": name, **raw["benchmark"]})
  for workload in raw["workloads"]:
    if workload not in WORKLOADS:
      raise ConfigError(f"unknown workload {workload!r}; valid workloads: {_choices(WORKLOADS)}.")
  for optimizer in raw["optimizers"]:
    if optimizer not in OPTIMIZERS:
      raise ConfigError(
        f"unknown optimizer {optimizer!r}; valid optimizers: {_choices(OPTIMIZERS)}."
      )
  if bench["baseline"] is not None and bench["baseline"] not in raw["optimizers"]:
    raise ConfigError(
      f"benchmark.baseline {bench['baseline']!r} is not one of the config's optimizers: "
      f"{_choices(raw['optimizers'])}."
    )
  for key, table in [*raw["workloads"].items(), *raw["optimizers"].items()]:
    if not isinstance(table, dict):
      raise ConfigError(f"[{key}] must be a table, got {table!r}.")
  workloads = {w: _workload_options(w, t) for w, t in raw["workloads"].items()}
  runs = []
  for o, table in raw["optimizers"].items():
    spec = OPTIMIZERS[o]
    key = f"optimizers.{o}"
    allowed = {"learning_rates", "search", "schedule", "warmup_fraction", "workloads"}
    _check_keys(key, table, allowed | set(spec.hyperparameters))
    # An optimizer's own default (schedule-free: warmup_constant) before the benchmark's.
    schedule = _schedule(f"{key}.schedule", table, spec.default_schedule or bench["schedule"])
    if not spec.takes_schedule:
      if "schedule" in table and schedule != "constant":
        raise ConfigError(
          f"{key}.schedule: {o} takes a constant learning rate only (its step comes from a "
          f"line search or a Newton model); got {schedule!r}."
        )
      schedule = "constant"
    warmup = _warmup_fraction(
      f"{key}.warmup_fraction", table.get("warmup_fraction", bench["warmup_fraction"])
    )
    only = table.get("workloads", list(workloads))
    _expect(f"{key}.workloads", only, (list,), "a list of workload names")
    for w in only:
      if w not in workloads:
        raise ConfigError(
          f"{key}.workloads names {w!r}, which is not in [workloads]: {_choices(workloads)}."
        )
    for trial, (hyper, tuned) in enumerate(_trials(o, table, bench["trials"])):
      learning_rate = hyper.pop("learning_rate")
      resolved = {**spec.hyperparameters, **hyper}
      for w in only:
        budget = {k: workloads[w].get(k, bench[k]) for k in _BUDGET_KEYS}
        for seed in bench["seeds"]:
          runs.append(
            RunSpec(
              workload=w,
              workload_options=tuple(sorted(workloads[w]["options"].items())),
              optimizer=o,
              trial=trial,
              learning_rate=learning_rate,
              hyperparameters=tuple(sorted(resolved.items())),
              tuned=tuned,
              schedule=schedule,
              warmup_fraction=0.0 if schedule == "constant" else warmup,
              seed=seed,
              steps=budget["steps"],
              max_seconds=budget["max_seconds"],
              eval_every=budget["eval_every"],
              checkpoint_every=raw["benchmark"].get("checkpoint_every", budget["eval_every"]),
              sharpness_every=bench["sharpness_every"],
              target=workloads[w]["target"],
            )
          )
  ids = [r.run_id for r in runs]
  if len(set(ids)) != len(ids):
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    raise ConfigError(f"two runs of the config are identical: {', '.join(repeated[:3])}.")
  return Config(bench["name"], tuple(runs), raw, bench["baseline"])


def check_buildable(config: Config) -> None:
  """Builds every workload and optimizer of `config` abstractly (`jax.eval_shape` of `init`).

  Raises ConfigError naming the optimizer and the trial's values when one cannot
  be built, so a bad hyperparameter stops the config before anything trains.
  """
  import jax

  from curvopt.bench.optimizers import build_optimizer, learning_rate_schedule

  params = {}
  seen = set()
  for run in config.runs:
    if run.trial_id in seen:
      continue
    seen.add(run.trial_id)
    workload = build_workload(run.workload, run.workload_options)
    where = (run.workload, run.workload_options)
    if where not in params:  # once per workload: its shapes, and its batch against the mesh
      params[where] = jax.eval_shape(workload.init_params, jax.random.key(0))
      devices = math.prod(size for _, size in run.mesh)
      leading = {len(x) for x in jax.tree.leaves(workload.batch(0, 0))} if run.mesh else set()
      if any(n % devices for n in leading):
        raise ConfigError(
          f"workloads.{run.workload}.batch_size: batches of {sorted(leading)} examples cannot "
          f"be split over the {devices} devices of --mesh; choose a multiple of {devices}."
        )
    shapes = params[where]
    lr = learning_rate_schedule(run.learning_rate, run.schedule, run.steps, run.warmup_fraction)
    try:
      optimizer = build_optimizer(
        OPTIMIZERS[run.optimizer], workload, lr, dict(run.hyperparameters)
      )
      jax.eval_shape(optimizer.init, shapes)
    except Exception as error:  # any failure to build is the config's, named by its key
      tried = ", ".join(
        f"{k}={v!r}"
        for k, v in [("learning_rate", run.learning_rate), *run.hyperparameters]
        if k in run.tuned or k == "learning_rate"
      )
      raise ConfigError(
        f"optimizers.{run.optimizer} cannot be built (trial {run.trial}: {tried}): {error}"
      ) from error


def load(path: str | pathlib.Path) -> Config:
  """Reads and validates a TOML config."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist.")
  try:
    raw = tomllib.loads(path.read_text())
  except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
    raise ConfigError(f"{path} is not valid TOML: {error}") from error
  stem = path.stem if _NAME.fullmatch(path.stem) else "benchmark"
  return parse(raw, stem)
