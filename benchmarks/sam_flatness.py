"""Test accuracy and final sharpness of SGD, SAM, ASAM and GAM from a `configs/sam.toml` run.

Reads the run logs of a results folder (`curvopt-bench run configs/sam.toml
--out DIR`) and writes two Markdown tables: per workload and optimizer, the
learning rate with the best mean test accuracy over seeds, with that
accuracy, the final training loss and the final sharpness (largest Hessian
eigenvalue of the training loss on 512 fixed examples), mean and standard
deviation over seeds; and the mean final sharpness at every learning rate,
since sharpness depends on the step size (edge of stability: about 2 / lr).

Run:  python benchmarks/sam_flatness.py benchmarks/results/sam
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics


def _final(path: pathlib.Path) -> dict | None:
  """The run's summary with its last sharpness, or None while it is unfinished."""
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  done = next((r for r in records if r.get("event") == "done"), None)
  if done is None:
    return None
  sharp = [r["sharpness"] for r in records if "sharpness" in r]
  return {**done, "final_sharpness": sharp[-1] if sharp else float("nan")}


def _mean_sd(values: list[float]) -> str:
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("results")
  args = parser.parse_args()
  folder = pathlib.Path(args.results)
  runs = [r for p in sorted((folder / "runs").glob("*.jsonl")) if (r := _final(p))]
  groups = collections.defaultdict(list)
  for r in runs:
    groups[(r["workload"], r["optimizer"], r["learning_rate"])].append(r)
  lines = [
    "| workload | optimizer | best lr | seeds | test accuracy | final train loss "
    "| final sharpness |",
    "|---|---|---:|---:|---|---|---|",
  ]
  per_lr = [
    "| workload | optimizer | " + "learning rate: mean final sharpness (test accuracy) |",
    "|---|---|---|",
  ]
  for workload in sorted({k[0] for k in groups}):
    for optimizer in sorted({k[1] for k in groups if k[0] == workload}):
      rates = sorted(k[2] for k in groups if k[:2] == (workload, optimizer))
      accuracy = {
        lr: statistics.mean(r["final_test_metric"] for r in groups[(workload, optimizer, lr)])
        for lr in rates
      }
      best = max(rates, key=accuracy.get)
      rs = groups[(workload, optimizer, best)]
      lines.append(
        f"| {workload} | {optimizer} | {best} | {len(rs)} | "
        f"{_mean_sd([r['final_test_metric'] for r in rs])} | "
        f"{_mean_sd([r['final_train_loss'] for r in rs])} | "
        f"{_mean_sd([r['final_sharpness'] for r in rs])} |"
      )
      sharpness = {
        lr: statistics.mean(r["final_sharpness"] for r in groups[(workload, optimizer, lr)])
        for lr in rates
      }
      cells = [f"{lr}: {sharpness[lr]:.3g} ({accuracy[lr]:.3f})" for lr in rates]
      per_lr.append(f"| {workload} | {optimizer} | {'; '.join(cells)} |")
  text = "\n".join(lines) + "\n\n" + "\n".join(per_lr) + "\n"
  (folder / "flatness.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
