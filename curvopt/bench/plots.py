"""Plots from saved run records (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import io
import math
import pathlib

from curvopt.bench import results

MISSING = (
  "plots not drawn: matplotlib is not installed (pip install 'curvopt[bench]', then "
  "curvopt-bench report DIR draws them from the saved runs)"
)


def available() -> bool:
  """Whether matplotlib can be imported (a bare accelerator image may lack it)."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return False
  return True


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: pathlib.Path) -> None:
  """Writes the figure atomically (a temporary file, then a rename), like every output."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  results.write_atomic(path, buffer.getvalue())


def write_profile_plot(
  path: pathlib.Path, best: dict[str, dict[str, dict]], labels: dict[str, str] | None = None
) -> pathlib.Path:
  """The performance profile: per optimizer, the fraction of workloads within tau of the fastest."""
  plt = _pyplot()
  ratios = results.performance_profile(best)
  taus = [1 + i * (results.PROFILE_MAX_RATIO - 1) / 300 for i in range(301)]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for optimizer, values in sorted(ratios.items()):
    fractions = [sum(r <= tau for r in values) / len(values) for tau in taus]
    score = results.profile_score(values)
    name = (labels or {}).get(optimizer, optimizer)
    ax.step(taus, fractions, where="post", label=f"{name} (score {score:.2f})")
  ax.set_xlabel("tau: time to target / fastest optimizer's (robust, per workload)")
  ax.set_ylabel("fraction of workloads")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"Performance profile over {len(best)} workloads")
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def write_plots(results_dir: pathlib.Path, summaries: list[dict]) -> list[pathlib.Path]:
  """Per workload: loss against steps and time, and sharpness, at each optimizer's best trial.

  Also the performance profile across workloads (`performance_profile.png`).
  """
  plt = _pyplot()
  plots_dir = results_dir / "plots"
  plots_dir.mkdir(parents=True, exist_ok=True)
  written = []
  best = results.best_per_optimizer(summaries)
  for workload, entries in sorted(best.items()):
    curves = {}
    for optimizer, entry in sorted(entries.items()):
      run = min(
        (
          s
          for s in summaries
          if s["workload"] == workload
          and s["optimizer"] == optimizer
          and s["trial_id"] == entry["trial_id"]
        ),
        key=lambda s: s["seed"],
      )
      records = [
        r
        for r in results.read_records(results_dir / "runs" / f"{run['run_id']}.jsonl")
        if "step" in r
      ]
      curves[f"{optimizer} (lr {entry['learning_rate']:.3g})"] = records
    panels = [("step", "train_loss", "loss_vs_step"), ("time", "train_loss", "loss_vs_time")]
    if any("sharpness" in r for rs in curves.values() for r in rs):
      panels.append(("step", "sharpness", "sharpness"))
    for x_key, y_key, suffix in panels:
      fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
      for label, records in curves.items():
        points = [(r[x_key], r[y_key]) for r in records if y_key in r and math.isfinite(r[y_key])]
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
      _save(fig, path)
      plt.close(fig)
      written.append(path)
  if best:
    written.append(write_profile_plot(plots_dir / "performance_profile.png", best))
  return written
