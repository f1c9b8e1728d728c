"""Steps and robust time to several training-loss levels, from a results folder's run logs.

One target can flatter whoever is fastest early: a level reached during the warmup
ranks optimizers differently from one reached at the end of the schedule (Wen et al.
2025, "Fantastic pretraining optimizers and where to find them"). For each optimizer
and each level, this takes the learning rate whose seeds reach the level soonest
(median over seeds; a seed that never reaches it counts as never), and reports the
median steps, the seeds that reached it, and the robust time (steps x the run's
windowed step time, as the runner's tables). Levels are checked at the evaluations
the runs logged.

Run:  python benchmarks/loss_thresholds.py benchmarks/results/lm_contest \\
        --levels 2.5,2.2,2.0,1.9 --out benchmarks/results/lm_contest/loss_thresholds.md
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib
import statistics

from curvopt.bench import results


def _runs(folder: pathlib.Path) -> list[tuple[dict, list[dict]]]:
  """(summary, evaluation records) of every finished run in `folder/runs`."""
  out = []
  for path in sorted((folder / "runs").glob("*.jsonl")):
    records = results.read_records(path)
    if records and records[-1].get("event") == "done":
      out.append((records[-1], [r for r in records[1:-1] if "train_loss" in r]))
  return out


def first_step_at(records: list[dict], level: float) -> float:
  """The first evaluated step whose training loss is at or below `level` (inf: never)."""
  return next(
    (
      r["step"]
      for r in records
      if results.finite_number(r["train_loss"]) and r["train_loss"] <= level
    ),
    math.inf,
  )


def table(folder: pathlib.Path, levels: list[float]) -> str:
  groups: dict[tuple[str, str, float], list[tuple[dict, list[dict]]]] = collections.defaultdict(
    list
  )
  for summary, records in _runs(folder):
    groups[(summary["workload"], summary["optimizer"], summary["learning_rate"])].append(
      (summary, records)
    )
  lines = [
    f"Steps to each training-loss level in `{folder.name}` (median over seeds at the learning "
    "rate that reaches the level soonest; seeds that reached it; robust time = steps x the "
    "windowed step time). `—`: no learning rate reached it in a majority of seeds.",
    "",
  ]
  for workload in sorted({w for w, _, _ in groups}):
    optimizers = sorted({o for w, o, _ in groups if w == workload})
    lines += [
      f"### {workload}",
      "",
      "| optimizer | "
      + " | ".join(f"loss {level:g}: steps (seeds, lr, time s)" for level in levels)
      + " |",
      "|---|" + "---|" * len(levels),
    ]
    for optimizer in optimizers:
      cells = []
      for level in levels:
        best = None
        for (w, o, lr), runs in groups.items():
          if (w, o) != (workload, optimizer):
            continue
          steps = [first_step_at(records, level) for _, records in runs]
          times = [
            s * summary["robust_step_ms"] / 1e3 if math.isfinite(s) else math.inf
            for s, (summary, _) in zip(steps, runs, strict=True)
          ]
          candidate = (statistics.median(steps), statistics.median(times), lr, steps)
          if best is None or candidate[:2] < best[:2]:
            best = candidate
        median_steps, median_time, lr, steps = best
        reached = sum(math.isfinite(s) for s in steps)
        cells.append(
          "—"
          if not math.isfinite(median_steps)
          else f"{median_steps:.0f} ({reached}/{len(steps)}, lr {lr:g}, {median_time:.3g} s)"
        )
      lines.append(f"| {optimizer} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("folder")
  parser.add_argument("--levels", required=True, help="comma-separated training losses")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  levels = [float(x) for x in args.levels.split(",")]
  text = table(pathlib.Path(args.folder), levels)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
