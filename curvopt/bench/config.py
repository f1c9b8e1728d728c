"""Benchmark configs: TOML files, validated in full before any training starts."""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import pathlib
import tomllib
from typing import Any

from curvopt.bench.optimizers import OPTIMIZERS
from curvopt.bench.workloads import WORKLOADS


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and the valid choices."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a workload, an optimizer at one learning rate, one seed."""

  workload: str
  workload_options: tuple[tuple[str, Any], ...]
  optimizer: str
  learning_rate: float
  hyperparameters: tuple[tuple[str, Any], ...]
  seed: int
  steps: int
  max_seconds: float | None
  eval_every: int
  checkpoint_every: int
  sharpness_every: int
  target: float | None

  @property
  def run_id(self) -> str:
    return f"{self.workload}__{self.optimizer}__lr{self.learning_rate:g}__seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  runs: tuple[RunSpec, ...]
  raw: dict


_BENCHMARK_KEYS: dict[str, tuple[type, ...]] = {
  "name": (str,),
  "seeds": (list,),
  "steps": (int,),
  "max_seconds": (numbers.Real,),
  "eval_every": (int,),
  "checkpoint_every": (int,),
  "sharpness_every": (int,),
}
_DEFAULTS = {"seeds": [0], "max_seconds": None, "eval_every": 25, "sharpness_every": 0}


def _choices(options) -> str:
  return ", ".join(sorted(options))


def _expect(key: str, value: Any, types: tuple[type, ...], what: str) -> Any:
  if isinstance(value, bool) or not isinstance(value, types):
    raise ConfigError(f"{key} must be {what}, got {value!r} ({type(value).__name__}).")
  return value


def _positive_int(key: str, value: Any) -> int:
  _expect(key, value, (int,), "a positive integer")
  if value <= 0:
    raise ConfigError(f"{key} must be a positive integer, got {value}.")
  return value


def _check_keys(section: str, table: dict, allowed) -> None:
  for key in table:
    if key not in allowed:
      raise ConfigError(f"unknown key {section}.{key}; valid keys: {_choices(allowed)}.")


def _benchmark(table: dict) -> dict:
  _check_keys("benchmark", table, _BENCHMARK_KEYS)
  if "steps" not in table:
    raise ConfigError("benchmark.steps is required: the step budget of every run.")
  out = {**_DEFAULTS, **table}
  _expect("benchmark.name", out.get("name", ""), (str,), "a string")
  _positive_int("benchmark.steps", out["steps"])
  _positive_int("benchmark.eval_every", out["eval_every"])
  out.setdefault("checkpoint_every", out["eval_every"])
  _positive_int("benchmark.checkpoint_every", out["checkpoint_every"])
  _expect("benchmark.sharpness_every", out["sharpness_every"], (int,), "an integer >= 0 (0: off)")
  if out["sharpness_every"] < 0:
    raise ConfigError("benchmark.sharpness_every must be >= 0 (0: off).")
  if out["max_seconds"] is not None:
    _expect("benchmark.max_seconds", out["max_seconds"], (numbers.Real,), "a number of seconds")
    if out["max_seconds"] <= 0:
      raise ConfigError(f"benchmark.max_seconds must be positive, got {out['max_seconds']}.")
  seeds = _expect("benchmark.seeds", out["seeds"], (list,), "a non-empty list of integers")
  if not seeds:
    raise ConfigError("benchmark.seeds must be a non-empty list of integers.")
  for i, seed in enumerate(seeds):
    _expect(f"benchmark.seeds[{i}]", seed, (int,), "an integer")
  return out


_BUDGET_KEYS = ("steps", "max_seconds", "eval_every")


def _workload_options(name: str, table: dict) -> tuple[float | None, dict]:
  factory = WORKLOADS[name]
  allowed = {"target", *_BUDGET_KEYS, *inspect.signature(factory).parameters}
  _check_keys(f"workloads.{name}", table, allowed)
  for key in ("steps", "eval_every"):
    if key in table:
      _positive_int(f"workloads.{name}.{key}", table[key])
  if "max_seconds" in table:
    _expect(
      f"workloads.{name}.max_seconds", table["max_seconds"], (numbers.Real,), "a number of seconds"
    )
  options = {k: v for k, v in table.items() if k not in ("target", *_BUDGET_KEYS)}
  for key, value in options.items():
    default = inspect.signature(factory).parameters[key].default
    types = (numbers.Real,) if isinstance(default, float) else (int, type(None))
    _expect(f"workloads.{name}.{key}", value, types, f"like its default {default!r}")
  target = table.get("target")
  if target is not None:
    _expect(f"workloads.{name}.target", target, (numbers.Real,), "a number (training-loss target)")
  return target, options


def _optimizer(name: str, table: dict) -> tuple[list[float], dict]:
  spec = OPTIMIZERS[name]
  allowed = {"learning_rates", *spec.hyperparameters}
  _check_keys(f"optimizers.{name}", table, allowed)
  if "learning_rates" not in table:
    raise ConfigError(f"optimizers.{name}.learning_rates is required: a non-empty list of numbers.")
  grid = _expect(
    f"optimizers.{name}.learning_rates", table["learning_rates"], (list,), "a list of numbers"
  )
  if not grid:
    raise ConfigError(
      f"optimizers.{name}.learning_rates is empty; give at least one learning rate."
    )
  for i, lr in enumerate(grid):
    _expect(f"optimizers.{name}.learning_rates[{i}]", lr, (numbers.Real,), "a positive number")
    if not lr > 0:
      raise ConfigError(f"optimizers.{name}.learning_rates[{i}] must be positive, got {lr}.")
  hyperparameters = {k: v for k, v in table.items() if k != "learning_rates"}
  for key, value in hyperparameters.items():
    default = spec.hyperparameters[key]
    types = (
      (bool,)
      if isinstance(default, bool)
      else (int,)
      if isinstance(default, int)
      else (numbers.Real,)
    )
    if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, types):
      raise ConfigError(
        f"optimizers.{name}.{key} must be like its default {default!r}, got {value!r}."
      )
  return [float(lr) for lr in grid], hyperparameters


def parse(raw: dict, name: str = "benchmark") -> Config:
  """Validates a config dictionary and expands it into runs."""
  _check_keys("(top level)", raw, {"benchmark", "workloads", "optimizers"})
  for section in ("benchmark", "workloads", "optimizers"):
    if not isinstance(raw.get(section), dict) or not raw[section]:
      raise ConfigError(f"[{section}] is required and must not be empty.")
  bench = _benchmark(raw["benchmark"])
  for workload in raw["workloads"]:
    if workload not in WORKLOADS:
      raise ConfigError(f"unknown workload {workload!r}; valid workloads: {_choices(WORKLOADS)}.")
  for optimizer in raw["optimizers"]:
    if optimizer not in OPTIMIZERS:
      raise ConfigError(
        f"unknown optimizer {optimizer!r}; valid optimizers: {_choices(OPTIMIZERS)}."
      )
  for key, table in [*raw["workloads"].items(), *raw["optimizers"].items()]:
    if not isinstance(table, dict):
      raise ConfigError(f"[{key}] must be a table, got {table!r}.")
  workloads = {w: _workload_options(w, t) for w, t in raw["workloads"].items()}
  optimizers = {o: _optimizer(o, t) for o, t in raw["optimizers"].items()}
  runs = tuple(
    RunSpec(
      workload=w,
      workload_options=tuple(sorted(options.items())),
      optimizer=o,
      learning_rate=lr,
      hyperparameters=tuple(sorted(hyper.items())),
      seed=seed,
      steps=raw["workloads"][w].get("steps", bench["steps"]),
      max_seconds=raw["workloads"][w].get("max_seconds", bench["max_seconds"]),
      eval_every=raw["workloads"][w].get("eval_every", bench["eval_every"]),
      checkpoint_every=raw["benchmark"].get(
        "checkpoint_every", raw["workloads"][w].get("eval_every", bench["eval_every"])
      ),
      sharpness_every=bench["sharpness_every"],
      target=target,
    )
    for w, (target, options) in workloads.items()
    for o, (grid, hyper) in optimizers.items()
    for lr in grid
    for seed in bench["seeds"]
  )
  return Config(bench.get("name") or name, runs, raw)


def load(path: str | pathlib.Path) -> Config:
  """Reads and validates a TOML config."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist.")
  try:
    raw = tomllib.loads(path.read_text())
  except tomllib.TOMLDecodeError as error:
    raise ConfigError(f"{path} is not valid TOML: {error}") from error
  return parse(raw, path.stem)
