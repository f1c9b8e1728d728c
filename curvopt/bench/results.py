"""The results folder: atomic writes, run records, the ranked table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import statistics
import tempfile
from typing import Any

SUMMARY_COLUMNS = (
  "run_id",
  "workload",
  "optimizer",
  "learning_rate",
  "seed",
  "steps_run",
  "final_train_loss",
  "test_metric",
  "final_test_metric",
  "target",
  "steps_to_target",
  "time_to_target_s",
  "train_time_s",
  "median_step_ms",
  "compile_s",
  "optimizer_state_bytes",
  "step_memory_bytes",
  "peak_device_bytes",
  "nonfinite_steps",
  "diverged",
)


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` so that a kill at any moment leaves the old file or the new one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(f.name, path)


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


def run_summaries(results_dir: pathlib.Path) -> list[dict]:
  """The summary record of every finished run in the folder."""
  summaries = []
  for path in sorted((results_dir / "runs").glob("*.jsonl")):
    done = [r for r in read_records(path) if r.get("event") == "done"]
    if done:
      summaries.append(done[-1])
  return summaries


def _mean(values: list[float]) -> float:
  return statistics.fmean(values) if values else math.inf


def best_per_optimizer(summaries: list[dict]) -> dict[str, dict[str, dict]]:
  """For each workload and optimizer, the learning rate that did best over its seeds.

  Best means: the shortest mean time to target (a seed that missed counts as
  infinite), then the lowest mean final training loss.
  """
  groups: dict[tuple, list[dict]] = {}
  for s in summaries:
    groups.setdefault((s["workload"], s["optimizer"], s["learning_rate"]), []).append(s)
  best: dict[str, dict[str, dict]] = {}
  for (workload, optimizer, lr), runs in groups.items():
    times = [r["time_to_target_s"] if r["time_to_target_s"] is not None else math.inf for r in runs]
    steps = [r["steps_to_target"] if r["steps_to_target"] is not None else math.inf for r in runs]
    losses = [r["final_train_loss"] if _finite(r["final_train_loss"]) else math.inf for r in runs]
    entry = {
      "workload": workload,
      "optimizer": optimizer,
      "learning_rate": lr,
      "seeds": len(runs),
      "hit_target": sum(t < math.inf for t in times),
      "time_to_target_s": _mean(times),
      "steps_to_target": _mean(steps),
      "final_train_loss": _mean(losses),
      "test_metric": runs[0]["test_metric"],
      "final_test_metric": _mean([r["final_test_metric"] for r in runs]),
      "median_step_ms": statistics.median(r["median_step_ms"] for r in runs),
      "compile_s": statistics.median(r["compile_s"] for r in runs),
      "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
      "nonfinite_steps": sum(r["nonfinite_steps"] for r in runs),
      "target": runs[0]["target"],
    }
    current = best.setdefault(workload, {}).get(optimizer)
    if current is None or rank_key(entry) < rank_key(current):
      best[workload][optimizer] = entry
  return best


def _finite(x: Any) -> bool:
  return isinstance(x, int | float) and math.isfinite(x)


def rank_key(entry: dict) -> tuple[float, float]:
  """How the tables rank optimizers: time to target, then final training loss."""
  return entry["time_to_target_s"], entry["final_train_loss"]


def _fmt(x: Any, spec: str) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "—"
  return format(x, spec)


def markdown_table(summaries: list[dict]) -> str:
  """Optimizers ranked per workload at their best learning rate."""
  lines = []
  for workload, entries in sorted(best_per_optimizer(summaries).items()):
    ranked = sorted(entries.values(), key=rank_key)
    first = ranked[0]
    lines += [
      f"### {workload} (target: train loss <= {first['target']:g}; "
      f"test metric: {first['test_metric']})",
      "",
      "| rank | optimizer | best lr | hit target | steps to target | time to target (s) "
      "| final train loss | test metric | median step (ms) | compile (s) | state (KiB) "
      "| non-finite steps |",
      "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, e in enumerate(ranked, 1):
      lines.append(
        f"| {rank} | {e['optimizer']} | {e['learning_rate']:g} | {e['hit_target']}/{e['seeds']} "
        f"| {_fmt(e['steps_to_target'], '.0f')} | {_fmt(e['time_to_target_s'], '.3f')} "
        f"| {_fmt(e['final_train_loss'], '.4g')} | {_fmt(e['final_test_metric'], '.4g')} "
        f"| {e['median_step_ms']:.3f} | {e['compile_s']:.2f} "
        f"| {e['optimizer_state_bytes'] / 1024:.1f} "
        f"| {e['nonfinite_steps']} |"
      )
    lines.append("")
  return "\n".join(lines)


def summary_csv(summaries: list[dict]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
  writer.writeheader()
  for s in sorted(summaries, key=lambda s: s["run_id"]):
    writer.writerow(s)
  return buffer.getvalue()
