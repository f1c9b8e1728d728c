"""`curvopt-bench`: list workloads and optimizers, run a config, report saved results."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
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

  import jax

  def parameters(factory, **options) -> str:
    shapes = jax.eval_shape(factory(**options).init_params, jax.random.key(0))
    count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    return f"{count / 1e6:.2f}M" if count >= 10**5 else f"{count:,}"

  print("Workloads (parameters; per size where there are sizes):")
  for name, factory in WORKLOADS.items():
    print(f"  {name:22s} {inspect.getdoc(factory).splitlines()[0]}")
    if "size" in inspect.signature(factory).parameters:
      counts = []
      for size in ("tiny", "small", "medium", "full"):
        try:
          counts.append(f"{size} {parameters(factory, size=size)}")
        except ValueError:  # a size this workload does not have
          continue
      counts = ", ".join(counts)
    else:
      counts = parameters(factory)
    print(f"  {'':22s}   parameters: {counts}")
  print("\nOptimizers:")
  for name, spec in OPTIMIZERS.items():
    extra = f" (extra args: {', '.join(spec.extra_args)})" if spec.extra_args else ""
    print(f"  {name:22s} {spec.description}{extra}")
  return 0


def compilation_cache_dir() -> pathlib.Path | None:
  """The persistent compilation cache folder: `$CURVOPT_COMPILATION_CACHE`, else
  `$XDG_CACHE_HOME/curvopt/jax` (`~/.cache/curvopt/jax`); None when the variable is
  `off` (or `--no-compilation-cache` was given)."""
  chosen = os.environ.get("CURVOPT_COMPILATION_CACHE")
  if chosen is not None:
    return (
      None if chosen.strip().lower() in ("", "0", "off", "false", "no") else pathlib.Path(chosen)
    )
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "curvopt" / "jax"


def _use_compilation_cache(folder: pathlib.Path | None) -> None:
  """Turns on JAX's persistent compilation cache: a second run compiles nothing it did before."""
  if folder is None:
    return
  import jax

  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _manifest(config_name: str) -> dict:
  import jax
  import optax

  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
    ).stdout.strip()
    dirty = bool(
      subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
        timeout=5,
      ).stdout.strip()
    )
  except (OSError, subprocess.SubprocessError):
    commit, dirty = None, None
  return {
    "config": config_name,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
    "machine": platform.machine(),
    "git_commit": commit,
    "git_uncommitted_changes": dirty,
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


class _FolderBusy(Exception):
  """Another process is writing the results folder."""


@contextlib.contextmanager
def _locked(out: pathlib.Path):
  """An exclusive lock on the results folder for this process (released at exit or kill)."""
  import fcntl

  handle = open(out / ".lock", "a+")  # noqa: SIM115 (held for the whole run)
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise _FolderBusy(
        f"{out} is in use by another curvopt-bench run ({holder}); wait for it to finish "
        "or pass another --out."
      ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    yield
  finally:
    handle.close()


def _results_folder(path: pathlib.Path) -> pathlib.Path:
  """Creates the folder, or says in one line why it cannot be used."""
  if path.exists() and not path.is_dir():
    raise _FolderBusy(f"--out {path} is a file, not a folder.")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write-test.tmp"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    raise _FolderBusy(f"cannot write to --out {path}: {error.strerror or error}.") from None
  return path


def _run(args: argparse.Namespace) -> int:
  from curvopt.bench import runner
  from curvopt.bench.config import check_buildable

  config = load(args.config)
  if args.mesh:
    from curvopt.bench import sharding

    try:
      mesh = sharding.parse_mesh(args.mesh)
      sharding.make_mesh(mesh)
    except ValueError as error:
      raise ConfigError(str(error)) from None
    config = dataclasses.replace(
      config, runs=tuple(dataclasses.replace(r, mesh=mesh) for r in config.runs)
    )
  check_buildable(config)  # every workload and optimizer, before any folder or training
  cache = None if args.no_compilation_cache else compilation_cache_dir()
  _use_compilation_cache(cache)
  out = _results_folder(pathlib.Path(args.out or pathlib.Path("runs") / config.name))
  with _locked(out):
    results.remove_temporary_files(out)
    results.write_atomic(out / "config.json", json.dumps(config.raw, indent=2) + "\n")
    manifest = {
      **_manifest(config.name),
      # Compile times read from a warm cache are load times: the manifest says which.
      "compilation_cache": str(cache) if cache else None,
      "runs": {r.run_id: r.spec_id for r in config.runs},
    }
    results.write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
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
    return _write_report(out, config, args.quiet)


def _write_report(out: pathlib.Path, config, quiet: bool) -> int:
  from curvopt.bench import plots

  wanted = {r.run_id for r in config.runs}
  summaries = results.run_summaries(out, wanted)
  others = len(list((out / "runs").glob("*.jsonl"))) - len(summaries)
  if not summaries:
    print(f"error: no finished runs of this config in {out}/runs", file=sys.stderr)
    return 1
  if others and not quiet:
    print(
      f"note: {others} logs in {out}/runs belong to other configs or unfinished runs; "
      "they are not reported.",
      file=sys.stderr,
    )
  missing = len(wanted) - len(summaries)
  table = results.markdown_table(summaries, config.baseline)
  if missing:
    table = f"**{missing} of the config's {len(wanted)} runs have not finished.**\n\n" + table
  if not plots.available():
    table = f"{table.rstrip()}\n\n*{plots.MISSING}.*\n"
    print(f"note: {plots.MISSING}.", file=sys.stderr)
  results.write_atomic(out / "results.md", table)
  results.write_atomic(out / "summary.csv", results.summary_csv(summaries))
  if plots.available():
    plots.write_plots(out, summaries)
  if not quiet:
    print(table)
  return 0


def _report(args: argparse.Namespace) -> int:
  from curvopt.bench.config import parse

  out = pathlib.Path(args.results_dir)
  if not (out / "runs").is_dir() or not (out / "config.json").is_file():
    print(
      f"error: {out} is not a results folder (no runs/ and config.json inside)", file=sys.stderr
    )
    return 2
  config = parse(json.loads((out / "config.json").read_text()))
  with _locked(out):
    return _write_report(out, config, args.quiet)


def _compare(args: argparse.Namespace) -> int:
  from curvopt.bench import plots

  folders = [pathlib.Path(d) for d in args.results_dirs]
  summaries, machines = [], {}
  for folder in folders:
    path = folder / "summary.csv"
    if not path.is_file():
      print(f"error: {folder} has no summary.csv (run `curvopt-bench run` first)", file=sys.stderr)
      return 2
    try:
      rows = results.read_summary_csv(path)
    except (ValueError, KeyError) as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
    for row in rows:
      row["folder"] = folder.name or str(folder)
    summaries += rows
    manifest = folder / "manifest.json"
    if manifest.is_file():
      info = json.loads(manifest.read_text())
      machines[folder.name] = f"{info.get('backend')} {', '.join(sorted(set(info['devices'])))}"
  protocols: dict[str, tuple[dict, str]] = {}
  for row in summaries:
    first = protocols.setdefault(row["workload"], (results.protocol(row), row["folder"]))
    if results.protocol(row) != first[0]:
      differing = sorted(k for k, v in results.protocol(row).items() if first[0].get(k) != v)
      print(
        f"error: {row['workload']} was run under different protocols in {first[1]} and "
        f"{row['folder']} ({', '.join(differing)} differ); their times cannot be compared.",
        file=sys.stderr,
      )
      return 2
  # The same optimizer from two folders (two machines, two versions) keeps both, labelled.
  homes: dict[str, set[str]] = {}
  for row in summaries:
    homes.setdefault(row["optimizer"], set()).add(row["folder"])
  baseline = args.baseline
  if baseline is not None and baseline not in homes:
    print(
      f"error: --baseline {baseline!r} ran in none of the folders; their optimizers: "
      f"{', '.join(sorted(homes))}.",
      file=sys.stderr,
    )
    return 2
  order = [f.name or str(f) for f in folders]
  for row in summaries:
    if len(homes[row["optimizer"]]) > 1:
      row["optimizer"] = f"{row['optimizer']} [{row['folder']}]"
  header = "Compared folders: " + "; ".join(
    f"{f.name} ({machines.get(f.name, 'machine unknown')})" for f in folders
  )
  if len(set(machines.values())) > 1:
    header += ". **Times come from different machines.**"
  if baseline is not None and len(homes[baseline]) > 1:
    # One baseline for every row: the copy from the first folder named that ran it.
    home = next(name for name in order if name in homes[baseline])
    header += (
      f" The baseline is {baseline} from {home} (the first folder named that ran it; it also "
      f"ran in {', '.join(n for n in order if n in homes[baseline] and n != home)})."
    )
    baseline = f"{baseline} [{home}]"
  table = header + "\n\n" + results.markdown_table(summaries, baseline)
  out = pathlib.Path(args.out) if args.out else None
  if out is not None:
    _results_folder(out)
    results.write_atomic(out / "results.md", table)
    results.write_atomic(out / "summary.csv", results.summary_csv(summaries))
    if plots.available():
      best = results.best_per_optimizer(summaries)
      plots.write_profile_plot(out / "performance_profile.png", best)
    else:
      print(f"note: {plots.MISSING}.", file=sys.stderr)
  if not args.quiet:
    print(table)
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="curvopt-bench", description="Fair, tuned, time-to-target optimizer comparisons."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="list workloads and optimizers").set_defaults(func=_list)
  run = commands.add_parser(
    "run",
    help="run a TOML config (finished runs of the same spec are skipped, interrupted ones resume)",
  )
  run.add_argument("config")
  run.add_argument("--out", help="results folder (default: runs/<config name>)")
  run.add_argument("--quiet", action="store_true")
  run.add_argument(
    "--no-compilation-cache",
    action="store_true",
    help="compile everything afresh (default: JAX's persistent cache in "
    "$CURVOPT_COMPILATION_CACHE or ~/.cache/curvopt/jax; compile times then include cache reads)",
  )
  run.add_argument(
    "--mesh",
    help="data=N: data-parallel over N devices; data=N,fsdp=M: parameters sharded over M too",
  )
  run.set_defaults(func=_run)
  report = commands.add_parser(
    "report", help="tables and plots from a results folder, without training"
  )
  report.add_argument("results_dir")
  report.add_argument("--quiet", action="store_true")
  report.set_defaults(func=_report)
  compare = commands.add_parser(
    "compare",
    help="one table and one performance profile from several results folders "
    "(refuses workloads run under different protocols)",
  )
  compare.add_argument("results_dirs", nargs="+")
  compare.add_argument("--baseline", help="optimizer the times are relative to")
  compare.add_argument("--out", help="folder for results.md, summary.csv and the profile")
  compare.add_argument("--quiet", action="store_true")
  compare.set_defaults(func=_compare)
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except (ConfigError, _FolderBusy) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
