"""Plots from saved run records (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import pathlib

from curvopt.bench import results


def write_plots(results_dir: pathlib.Path, summaries: list[dict]) -> list[pathlib.Path]:
  """Per workload: loss against steps and time, and sharpness, at each optimizer's best lr."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plots_dir = results_dir / "plots"
  plots_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for workload, entries in sorted(results.best_per_optimizer(summaries).items()):
    curves = {}
    for optimizer, entry in sorted(entries.items()):
      run = min(
        (
          s
          for s in summaries
          if s["workload"] == workload
          and s["optimizer"] == optimizer
          and s["learning_rate"] == entry["learning_rate"]
        ),
        key=lambda s: s["seed"],
      )
      records = [
        r
        for r in results.read_records(results_dir / "runs" / f"{run['run_id']}.jsonl")
        if "step" in r
      ]
      curves[f"{optimizer} (lr {entry['learning_rate']:g})"] = records
    panels = [("step", "train_loss", "loss_vs_step"), ("time", "train_loss", "loss_vs_time")]
    if any("sharpness" in r for rs in curves.values() for r in rs):
      panels.append(("step", "sharpness", "sharpness"))
    for x_key, y_key, suffix in panels:
      fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
      for label, records in curves.items():
        points = [(r[x_key], r[y_key]) for r in records if y_key in r]
        if points:
          ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 30 else None)
      if y_key == "train_loss":
        ax.set_yscale("log")
        target = next(iter(entries.values()))["target"]
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:g}")
      ax.set_xlabel({"step": "step", "time": "training time (s, compilation excluded)"}[x_key])
      ax.set_ylabel(y_key.replace("_", " "))
      ax.set_title(f"{workload}: {y_key.replace('_', ' ')}")
      ax.legend(fontsize=7)
      fig.tight_layout()
      path = plots_dir / f"{workload}_{suffix}.png"
      fig.savefig(path)
      plt.close(fig)
      written.append(path)
  return written
