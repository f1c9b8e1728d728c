"""`curvopt-bench`: list workloads and optimizers, run a config, report saved results."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time

from curvopt.bench import results
from curvopt.bench.config import ConfigError, load
from curvopt.bench.optimizers import OPTIMIZERS
from curvopt.bench.workloads import WORKLOADS


def _list(_: argparse.Namespace) -> int:
  import inspect

  print("Workloads:")
  for name, factory in WORKLOADS.items():
    print(f"  {name:22s} {inspect.getdoc(factory).splitlines()[0]}")
  print("\nOptimizers:")
  for name, spec in OPTIMIZERS.items():
    extra = f" (extra args: {', '.join(spec.extra_args)})" if spec.extra_args else ""
    print(f"  {name:22s} {spec.description}{extra}")
  return 0


def _manifest(config_name: str) -> dict:
  import jax
  import optax

  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {
    "config": config_name,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
    "machine": platform.machine(),
    "git_commit": commit,
  }


class _Progress:
  """A progress bar with ETA over all steps of all runs (rich if installed)."""

  def __init__(self, total: int, quiet: bool):
    self.total, self.done, self.quiet = total, 0, quiet
    self._bar = None
    if not quiet:
      try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
          TextColumn("{task.description}"),
          BarColumn(),
          TextColumn("{task.completed}/{task.total} steps"),
          TimeRemainingColumn(),
          transient=True,
        )
        self._task = self._bar.add_task("", total=total)
        self._bar.start()
      except ImportError:
        self._bar = None

  def describe(self, text: str) -> None:
    if self._bar is not None:
      self._bar.update(self._task, description=text)
    elif not self.quiet:
      print(f"[{self.done}/{self.total} steps] {text}", file=sys.stderr, flush=True)

  def advance(self, steps: int) -> None:
    self.done += steps
    if self._bar is not None:
      self._bar.update(self._task, advance=steps)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.stop()


def _run(args: argparse.Namespace) -> int:
  from curvopt.bench import runner

  config = load(args.config)
  out = pathlib.Path(args.out or pathlib.Path("runs") / config.name)
  out.mkdir(parents=True, exist_ok=True)
  results.write_atomic(out / "config.json", json.dumps(config.raw, indent=2) + "\n")
  results.write_atomic(out / "manifest.json", json.dumps(_manifest(config.name), indent=2) + "\n")
  progress = _Progress(sum(r.steps for r in config.runs), args.quiet)
  start = time.perf_counter()
  try:
    for i, spec in enumerate(config.runs, 1):
      progress.describe(f"run {i}/{len(config.runs)}: {spec.run_id}")
      runner.run(spec, out, progress.advance)
  finally:
    progress.close()
  if not args.quiet:
    print(
      f"{len(config.runs)} runs in {time.perf_counter() - start:.1f} s; results in {out}/",
      file=sys.stderr,
    )
  return _write_report(out, args.quiet)


def _write_report(out: pathlib.Path, quiet: bool) -> int:
  from curvopt.bench import plots

  summaries = results.run_summaries(out)
  if not summaries:
    print(f"error: no finished runs in {out}/runs", file=sys.stderr)
    return 1
  table = results.markdown_table(summaries)
  results.write_atomic(out / "results.md", table)
  results.write_atomic(out / "summary.csv", results.summary_csv(summaries))
  plots.write_plots(out, summaries)
  if not quiet:
    print(table)
  return 0


def _report(args: argparse.Namespace) -> int:
  out = pathlib.Path(args.results_dir)
  if not (out / "runs").is_dir():
    print(f"error: {out} is not a results folder (no runs/ inside)", file=sys.stderr)
    return 2
  return _write_report(out, args.quiet)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="curvopt-bench", description="Fair, tuned, time-to-target optimizer comparisons."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="list workloads and optimizers").set_defaults(func=_list)
  run = commands.add_parser(
    "run", help="run a TOML config (finished runs are skipped, interrupted ones resume)"
  )
  run.add_argument("config")
  run.add_argument("--out", help="results folder (default: runs/<config name>)")
  run.add_argument("--quiet", action="store_true")
  run.set_defaults(func=_run)
  report = commands.add_parser(
    "report", help="tables and plots from a results folder, without training"
  )
  report.add_argument("results_dir")
  report.add_argument("--quiet", action="store_true")
  report.set_defaults(func=_report)
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
