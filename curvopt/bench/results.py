"""The results folder: atomic writes, run records, seeds' intervals, ranked tables and scores.

The protocol follows AlgoPerf (Dahl et al. 2023, "Benchmarking Neural Network
Training Algorithms"): each optimizer's best trial per workload by time to a
training-loss target, time-to-target relative to a named baseline, and a
performance profile across workloads with its area score.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import pathlib
import statistics
import tempfile
from typing import Any

import numpy as np

SUMMARY_COLUMNS = (
  "run_id",
  "spec_id",
  "trial_id",
  "workload",
  "optimizer",
  "trial",
  "learning_rate",
  "tuned",
  "schedule",
  "seed",
  "steps",
  "steps_run",
  "final_train_loss",
  "test_metric",
  "final_test_metric",
  "target",
  "steps_to_target",
  "time_to_target_s",
  "robust_time_to_target_s",
  "train_time_s",
  "median_step_ms",
  "robust_step_ms",
  "compile_s",
  "optimizer_state_bytes",
  "step_memory_bytes",
  "peak_device_bytes",
  "nonfinite_steps",
  "guard_skipped",
  "guard_resets",
  "diverged",
  "failed",
  "failure",
  "spec",
)
_TEXT_COLUMNS = {
  "run_id",
  "spec_id",
  "trial_id",
  "workload",
  "optimizer",
  "schedule",
  "test_metric",
  "failure",
}
_JSON_COLUMNS = {"tuned", "spec"}
# Bootstrap resamples of the seeds for the 95% interval of a median.
_BOOTSTRAP = 2000
# AlgoPerf integrates the performance profile up to this ratio to the fastest.
PROFILE_MAX_RATIO = 4.0
# Fewer seeds than this cannot support a claim that one optimizer is faster.
MIN_SEEDS_FOR_A_CLAIM = 3


def write_atomic(path: pathlib.Path, text: str | bytes) -> None:
  """Writes `text` so that a kill at any moment leaves the old file or the new one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = "wb" if isinstance(text, bytes) else "w"
  with tempfile.NamedTemporaryFile(mode, dir=path.parent, delete=False, suffix=".tmp") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(f.name, path)


def remove_temporary_files(folder: pathlib.Path) -> int:
  """Deletes `*.tmp` files an interrupted write left under `folder`; returns how many."""
  removed = 0
  for path in folder.rglob("*.tmp"):
    with contextlib.suppress(OSError):
      path.unlink()
      removed += 1
  return removed


def append_record(path: pathlib.Path, record: dict) -> None:
  """Appends one JSON line; a line cut by a kill is ignored when read back."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_records(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      break  # a partial last line from an interrupted write
  return records


def run_summaries(results_dir: pathlib.Path, run_ids: set[str] | None = None) -> list[dict]:
  """The summary record of every finished run in the folder (of `run_ids` only, if given)."""
  summaries = []
  for path in sorted((results_dir / "runs").glob("*.jsonl")):
    if run_ids is not None and path.stem not in run_ids:
      continue
    records = read_records(path)
    done = [r for r in records if r.get("event") == "done"]
    if done:
      # Recomputed from the records, so logs written before the windowed step time
      # are reported by the same definition as new ones.
      summaries.append(with_robust_times(done[-1], records))
  return summaries


# Step times are averaged over windows of at least this many steps before their median
# is taken. A multiple of the usual refresh periods (10 steps: Shampoo's roots, SOAP's
# eigenbasis, Sophia-H's Hessian diagonal), so each window's mean carries its share of the
# expensive steps, which the median of single steps would drop.
TIMING_WINDOW = 50


def robust_step_seconds(records: list[dict], window: int = TIMING_WINDOW) -> float:
  """The step time a run's robust time to target uses: the median of windowed means.

  The evaluation records hold the cumulative training time at each evaluated
  step. Consecutive evaluation intervals are joined into windows of at least
  `window` steps (a shorter remainder joins the last window), each window's
  mean step time is taken, then the median over windows: periodic expensive
  steps count at their frequency, and a few slow windows on a shared machine
  do not move it. NaN when no step was timed.

  Examples:
    >>> records = [{"step": s, "time": 0.01 * s + 0.09 * (s // 10)} for s in range(0, 201, 25)]
    >>> round(robust_step_seconds(records), 4)  # a 0.1 s refresh every 10 steps of 0.01 s
    0.019
  """
  points = [(r["step"], r["time"]) for r in records if "step" in r and finite_number(r.get("time"))]
  bounds = [0]  # indices into points where the windows start and end
  for i in range(1, len(points)):
    if points[i][0] - points[bounds[-1]][0] >= window:
      bounds.append(i)
  if len(points) > 1 and bounds[-1] != len(points) - 1:
    if len(bounds) > 1:
      bounds[-1] = len(points) - 1  # the remainder joins the last window
    else:
      bounds.append(len(points) - 1)  # under one window: the plain mean
  means = [
    (points[b][1] - points[a][1]) / (points[b][0] - points[a][0])
    for a, b in itertools.pairwise(bounds)
    if points[b][0] > points[a][0]
  ]
  return statistics.median(means) if means else math.nan


def with_robust_times(summary: dict, records: list[dict]) -> dict:
  """The summary with its robust step time and time to target taken from its records."""
  step_s = robust_step_seconds(records)
  hit = summary.get("steps_to_target")
  return {
    **summary,
    "robust_step_ms": 1e3 * step_s,
    "robust_time_to_target_s": hit * step_s if hit is not None and not summary["failed"] else None,
  }


def finite_number(x: Any) -> bool:
  """A real number (not a bool, a string or None) that is finite."""
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _or_inf(x: Any) -> float:
  return float(x) if finite_number(x) else math.inf


def median_interval(values: list[float], seed: int = 0) -> tuple[float, float, float]:
  """The median of `values` and a 95% percentile-bootstrap interval for it.

  Misses are `inf` and stay so: the interval's ends are actual resampled
  medians (no interpolation), so an end is `inf` when that many seeds missed.
  """
  data = np.asarray(values, dtype=float)
  median = float(np.median(data))  # a miss (inf) stays inf; no -inf ever occurs
  if len(data) == 1:
    return median, median, median
  rng = np.random.default_rng(seed)
  resamples = np.sort(data[rng.integers(0, len(data), (_BOOTSTRAP, len(data)))], axis=1)
  # The lower median of each resample: an actual value, so inf never meets inf - inf.
  medians = np.sort(resamples[:, (len(data) - 1) // 2])
  low = float(medians[int(0.025 * (_BOOTSTRAP - 1))])
  high = float(medians[math.ceil(0.975 * (_BOOTSTRAP - 1))])
  return median, low, high


def trial_entries(summaries: list[dict]) -> list[dict]:
  """One entry per (workload, optimizer, trial), aggregated over its seeds."""
  groups: dict[tuple, list[dict]] = {}
  for s in summaries:
    groups.setdefault((s["workload"], s["optimizer"], s["trial_id"]), []).append(s)
  entries = []
  for (workload, optimizer, trial_id), runs in sorted(groups.items()):
    runs = sorted(runs, key=lambda r: r["seed"])
    robust = [_or_inf(r["robust_time_to_target_s"]) for r in runs]
    median, low, high = median_interval(robust)
    failures = [f"seed {r['seed']}: {r['failure']}" for r in runs if r["failed"]]
    entries.append(
      {
        "workload": workload,
        "optimizer": optimizer,
        "trial_id": trial_id,
        "trial": runs[0]["trial"],
        "learning_rate": runs[0]["learning_rate"],
        "tuned": runs[0]["tuned"],
        "schedule": runs[0]["schedule"],
        "seeds": len(runs),
        "hit_target": sum(math.isfinite(t) for t in robust),
        "robust_time_to_target_s": median,
        "robust_interval": (low, high),
        "time_to_target_s": float(np.median([_or_inf(r["time_to_target_s"]) for r in runs])),
        "steps_to_target": float(np.median([_or_inf(r["steps_to_target"]) for r in runs])),
        "final_train_loss": float(np.median([_or_inf(r["final_train_loss"]) for r in runs])),
        "test_metric": runs[0]["test_metric"],
        "final_test_metric": statistics.median(_or_nan(r["final_test_metric"]) for r in runs),
        "median_step_ms": statistics.median(_or_nan(r["median_step_ms"]) for r in runs),
        "robust_step_ms": statistics.median(_or_nan(r.get("robust_step_ms")) for r in runs),
        "compile_s": statistics.median(r["compile_s"] for r in runs),
        "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
        "guard_skipped": sum(r["guard_skipped"] for r in runs),
        "guard_resets": sum(r["guard_resets"] for r in runs),
        "steps_run": sum(r["steps_run"] for r in runs),
        "failed": len(failures),
        "failures": failures,
        "target": runs[0]["target"],
        "protocol": protocol(runs[0]),
      }
    )
  return entries


def _or_nan(x: Any) -> float:
  return float(x) if finite_number(x) else math.nan


def protocol(summary: dict) -> dict:
  """What must agree for two runs of a workload to be compared: data, budget, target."""
  spec = summary["spec"]
  return {
    key: spec[key]
    for key in ("workload", "workload_options", "steps", "max_seconds", "eval_every", "target")
  }


def rank_key(entry: dict) -> tuple[float, float]:
  """How trials and optimizers rank: robust time to target, then final training loss."""
  return entry["robust_time_to_target_s"], entry["final_train_loss"]


def best_per_optimizer(summaries: list[dict]) -> dict[str, dict[str, dict]]:
  """For each workload and optimizer, the trial that did best over its seeds, with its count."""
  best: dict[str, dict[str, dict]] = {}
  counts: dict[tuple[str, str], int] = {}
  for entry in trial_entries(summaries):
    key = (entry["workload"], entry["optimizer"])
    counts[key] = counts.get(key, 0) + 1
    current = best.setdefault(entry["workload"], {}).get(entry["optimizer"])
    if current is None or rank_key(entry) < rank_key(current):
      best[entry["workload"]][entry["optimizer"]] = entry
  rates: dict[tuple[str, str], list[float]] = {}
  for s in summaries:
    rates.setdefault((s["workload"], s["optimizer"]), []).append(s["learning_rate"])
  for workload, entries in best.items():
    for optimizer, entry in entries.items():
      entry["trials"] = counts[(workload, optimizer)]
      tried = sorted(set(rates[(workload, optimizer)]))
      entry["lr_edge"] = (
        None
        if len(tried) < 2
        else "largest"
        if entry["learning_rate"] == tried[-1]
        else "smallest"
        if entry["learning_rate"] == tried[0]
        else None
      )
  return best


def verdict(a: dict, b: dict) -> str:
  """Whether `a` reached the target faster than `b`, from the seeds' intervals."""
  a_hit, b_hit = (math.isfinite(e["robust_time_to_target_s"]) for e in (a, b))
  if not a_hit and not b_hit:
    return "neither reached the target"
  if min(a["seeds"], b["seeds"]) < MIN_SEEDS_FOR_A_CLAIM:
    return f"not distinguishable (< {MIN_SEEDS_FOR_A_CLAIM} seeds)"
  (a_low, a_high), (b_low, b_high) = a["robust_interval"], b["robust_interval"]
  if a_high < b_low:
    return "faster"
  if b_high < a_low:
    return "slower"
  return "not distinguishable"


def _ratio(a: float, b: float) -> float:
  return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.inf


def performance_profile(best: dict[str, dict[str, dict]]) -> dict[str, list[float]]:
  """Per optimizer, its ratio to the fastest optimizer on each workload (inf: target missed)."""
  optimizers = sorted({o for entries in best.values() for o in entries})
  ratios: dict[str, list[float]] = {o: [] for o in optimizers}
  for entries in best.values():
    fastest = min(e["robust_time_to_target_s"] for e in entries.values())
    for o in optimizers:
      entry = entries.get(o)
      ratios[o].append(_ratio(entry["robust_time_to_target_s"], fastest) if entry else math.inf)
  return ratios


def profile_score(ratios: list[float], max_ratio: float = PROFILE_MAX_RATIO) -> float:
  """AlgoPerf's score: the area under the profile on [1, max_ratio], normalized to [0, 1]."""
  if not ratios:
    return 0.0
  area = sum(max_ratio - max(r, 1.0) for r in ratios if r <= max_ratio)
  return area / ((max_ratio - 1.0) * len(ratios))


# Below this time to target (both runs), a time ratio is host overhead: no time verdict.
HOST_BOUND_SECONDS = 0.1


def _versus(entry: dict, base: dict) -> str:
  """`entry`'s time to target as a multiple of `base`'s, with the verdict.

  Steps to target do not depend on the machine: a time verdict the step counts
  contradict (faster in more steps, slower in fewer) says so.
  """
  ratio = _ratio(entry["robust_time_to_target_s"], base["robust_time_to_target_s"])
  if math.isfinite(ratio):
    call = verdict(entry, base)
    steps, base_steps = entry["steps_to_target"], base["steps_to_target"]
    slowest = max(entry["robust_time_to_target_s"], base["robust_time_to_target_s"])
    if slowest < HOST_BOUND_SECONDS:
      # A few milliseconds to the target measure Python and dispatch, not the method: a
      # loaded rerun of the same config turned 0.37x into 1.85x. Steps are the measure.
      return f"{ratio:.2f}x, host-overhead bound: {steps:.0f} vs {base_steps:.0f} steps"
    if call == "faster" and steps > base_steps:
      call += f" but in more steps ({steps:.0f} vs {base_steps:.0f})"
    elif call == "slower" and steps < base_steps:
      call += f" but in fewer steps ({steps:.0f} vs {base_steps:.0f})"
    return f"{ratio:.2f}x, {call}"
  if math.isfinite(entry["robust_time_to_target_s"]):
    return "baseline missed the target"
  return "missed the target"


def _fmt(x: Any, spec: str) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "—"
  return format(x, spec)


def _interval(entry: dict) -> str:
  low, high = entry["robust_interval"]
  if not math.isfinite(low):
    return "missed"
  if entry["seeds"] == 1:
    return "1 seed"
  return f"[{_fmt(low, '.3g')}, {_fmt(high, '.3g')}]"


def _trial(entry: dict) -> str:
  tuned = {k: v for k, v in entry["tuned"].items() if k != "learning_rate"}
  edge = f" ({entry['lr_edge']} tried)" if entry.get("lr_edge") else ""
  parts = [f"lr {entry['learning_rate']:.4g}{edge}", *(f"{k} {v}" for k, v in tuned.items())]
  return ", ".join(parts)


def markdown_table(
  summaries: list[dict], baseline: str | None = None, labels: dict[str, str] | None = None
) -> str:
  """Optimizers ranked per workload at their best trial, then the score across workloads."""
  best = best_per_optimizer(summaries)
  lines = [
    "Time to target is robust: steps to target x the step time, the median over windows of",
    f"{TIMING_WINDOW}+ steps of the mean step time (periodic refreshes count at their frequency;",
    "a few slow windows on a shared machine do not move it); the measured sum of step times is",
    "beside it. Values are medians over seeds with a 95% bootstrap interval; an optimizer is",
    "called faster or slower only when the intervals do not overlap (and with at least "
    f"{MIN_SEEDS_FOR_A_CLAIM} seeds).",
    "A best learning rate marked (largest tried) or (smallest tried) lies at the edge of the",
    "search: a wider range might do better.",
    "",
  ]
  for workload, entries in sorted(best.items()):
    ranked = sorted(entries.values(), key=rank_key)
    first = ranked[0]
    base = entries.get(baseline) if baseline else None
    lines += [
      f"### {workload} (target: train loss <= {first['target']:g}; "
      f"test metric: {first['test_metric']})",
      "",
      "| rank | optimizer | schedule | trials | best trial | hit target "
      "| steps to target | time to target (s) | 95% interval | measured (s) "
      f"| vs {baseline or 'baseline'} | vs first "
      "| final train loss | final test metric | step (ms) | compile (s) | state (KiB) "
      "| skipped / resets | failed runs |",
      "|---:|---|---|---:|---|---:|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for rank, e in enumerate(ranked, 1):
      if base is None:
        versus_base = "—"
      elif e is base:
        versus_base = "baseline"
      else:
        versus_base = _versus(e, base)
      versus_first = "—" if e is first else verdict(e, first)
      failed = f"{e['failed']}/{e['seeds']}: {'; '.join(e['failures'])}" if e["failed"] else "0"
      lines.append(
        f"| {rank} | {(labels or {}).get(e['optimizer'], e['optimizer'])} | {e['schedule']} "
        f"| {e['trials']} | {_trial(e)} | {e['hit_target']}/{e['seeds']} "
        f"| {_fmt(e['steps_to_target'], '.0f')} | {_fmt(e['robust_time_to_target_s'], '.3g')} "
        f"| {_interval(e)} | {_fmt(e['time_to_target_s'], '.3g')} | {versus_base} "
        f"| {versus_first} | {_fmt(e['final_train_loss'], '.4g')} "
        f"| {_fmt(e['final_test_metric'], '.4g')} | {_fmt(e['robust_step_ms'], '.3f')} "
        f"| {e['compile_s']:.2f} | {e['optimizer_state_bytes'] / 1024:.1f} "
        f"| {e['guard_skipped']} / {e['guard_resets']} of {e['steps_run']} | {failed} |"
      )
    lines.append("")
  lines += _score_section(best, baseline, labels)
  return "\n".join(lines)


def _score_section(
  best: dict[str, dict[str, dict]], baseline: str | None, labels: dict[str, str] | None
) -> list[str]:
  ratios = performance_profile(best)
  workloads = sorted(best)
  lines = [
    "### Score across workloads",
    "",
    f"Performance-profile area on [1, {PROFILE_MAX_RATIO:g}] (AlgoPerf: 1 = fastest on every "
    "workload, 0 = never within 4x of the fastest or never at the target)"
    + (f"; per workload, robust time to target relative to {baseline}." if baseline else "."),
    "",
    "| optimizer | score | " + " | ".join(workloads) + " |",
    "|---|---:|" + "---:|" * len(workloads),
  ]
  for optimizer, values in sorted(ratios.items(), key=lambda kv: -profile_score(kv[1])):
    cells = []
    for workload in workloads:
      entry = best[workload].get(optimizer)
      base = best[workload].get(baseline) if baseline else None
      if entry is None:
        cells.append("not run")
      elif base is None:
        cells.append(
          _fmt(entry["robust_time_to_target_s"], ".3g") + " s"
          if math.isfinite(entry["robust_time_to_target_s"])
          else "missed"
        )
      else:
        cells.append(_versus(entry, base).split(",")[0])
    name = (labels or {}).get(optimizer, optimizer)
    lines.append(f"| {name} | {profile_score(values):.3f} | " + " | ".join(cells) + " |")
  lines.append("")
  return lines


def _csv_cell(column: str, value: Any) -> Any:
  if column in _JSON_COLUMNS:
    return json.dumps(value, sort_keys=True)
  return value


def summary_csv(summaries: list[dict]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
  writer.writeheader()
  for s in sorted(summaries, key=lambda s: s["run_id"]):
    writer.writerow({c: _csv_cell(c, s.get(c)) for c in SUMMARY_COLUMNS})
  return buffer.getvalue()


def _parse_cell(column: str, text: str) -> Any:
  if column in _JSON_COLUMNS:
    return json.loads(text)
  if column in _TEXT_COLUMNS:
    return text or None
  if text == "":
    return None
  if text in ("True", "False"):
    return text == "True"
  try:
    return int(text)
  except ValueError:
    return float(text)


def read_summary_csv(path: pathlib.Path) -> list[dict]:
  """The run summaries `summary_csv` wrote, with their types."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if rows and set(SUMMARY_COLUMNS) - set(rows[0]):
    missing = ", ".join(sorted(set(SUMMARY_COLUMNS) - set(rows[0])))
    raise ValueError(
      f"{path} lacks the columns {missing}: it was written by an older curvopt. Where the "
      "folder still holds its runs/ logs, `curvopt-bench report FOLDER` rewrites it."
    )
  return [{c: _parse_cell(c, row[c]) for c in SUMMARY_COLUMNS} for row in rows]
