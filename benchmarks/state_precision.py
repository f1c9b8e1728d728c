"""Optimizer state in bfloat16 against float32: bytes per parameter, and the loss it costs.

Bytes come from `curvopt.state_size` (shapes only, nothing allocated) on the runner's
`gpt_lm` and `resnet_digits` at `small` size, per optimizer and per layer shape. Losses
come from the run logs of `configs/state_precision_{gpt,resnet}_{float32,bfloat16}.toml`
(the same learning rate and seeds in both precisions): median final training loss and
test metric over seeds, and bfloat16's relative change.

Run:  python benchmarks/state_precision.py --out benchmarks/results/state_precision/README.md
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import statistics

import jax
import jax.numpy as jnp
import optax

import curvopt
from curvopt.bench import results
from curvopt.bench.optimizers import OPTIMIZERS, build_optimizer
from curvopt.bench.workloads import WORKLOADS

FOLDERS = {"gpt_lm": "gpt", "resnet_digits": "resnet"}
# Row label -> folder of run logs: the contest configs, and Shampoo with an EMA of its
# statistics (configs/state_precision_gpt_shampoo_ema_*.toml).
LOSS_FOLDERS = {**FOLDERS, "gpt_lm, beta2 0.999": "gpt_shampoo_ema"}
OPTIMIZERS_SIZED = ["adamw", "adahessian", "sophia_h", "soap", "shampoo", "psgd_kron", "psgd_muon"]
# Rows whose low-precision column keeps some statistics apart: label -> (optimizer, arguments).
VARIANTS_SIZED = {
  "shampoo, statistics bfloat16": ("shampoo", {"statistics_dtype": "bfloat16"}),
  "shampoo, statistics unpacked": ("shampoo", {"packed_statistics": False}),
}


def _bytes_per_parameter(opt, params) -> float:
  return curvopt.state_size(opt, params).bytes_per_parameter


def workload_bytes() -> list[str]:
  lines = [
    "| workload | optimizer | float32 state (bytes/param) | bfloat16 state | ratio |",
    "|---|---|---:|---:|---:|",
  ]
  for name in FOLDERS:
    workload = WORKLOADS[name](size="small")
    params = jax.eval_shape(workload.init_params, jax.random.key(0))
    rows = [(o, o, {}) for o in OPTIMIZERS_SIZED]
    rows += [(label, o, kept) for label, (o, kept) in VARIANTS_SIZED.items()]
    for label, optimizer, kept in rows:
      spec = OPTIMIZERS[optimizer]
      sizes = []
      for dtype in (None, "bfloat16"):
        if optimizer == "adamw":  # optax has mu_dtype but no nu_dtype: wrapped like the rest
          opt = curvopt.transforms.with_state_dtype(optax.adamw(1e-3), dtype)
        elif optimizer == "psgd_muon":  # the runner's spec keeps its committed arguments
          opt = curvopt.psgd_muon(1e-3, matrices=workload.hidden_matrix_mask, state_dtype=dtype)
        else:
          extra = {} if dtype is None else {"state_dtype": dtype, **kept}
          opt = build_optimizer(spec, workload, 1e-3, {**spec.hyperparameters, **extra})
        sizes.append(_bytes_per_parameter(opt, params))
      lines.append(
        f"| {name} | {label} | {sizes[0]:.2f} | {sizes[1]:.2f} | {sizes[1] / sizes[0]:.2f} |"
      )
  return lines


SHAPES = [(256, 256), (128, 512), (64, 1024), (1024,), (3, 3, 64, 64), (50_000, 128)]


def shape_bytes() -> list[str]:
  lines = [
    "| shape | optimizer | block_size | float32 (bytes/param) | bfloat16 |",
    "|---|---|---:|---:|---:|",
  ]
  for shape in SHAPES:
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    for name in ("soap", "shampoo"):
      for block in (1024, 256, 128):
        factory = getattr(curvopt, name)
        f32 = _bytes_per_parameter(factory(1e-3, block_size=block), params)
        bf16 = _bytes_per_parameter(
          factory(1e-3, block_size=block, state_dtype=jnp.bfloat16), params
        )
        lines.append(f"| {shape} | {name} | {block} | {f32:.2f} | {bf16:.2f} |")
    for name in ("psgd_kron",):
      f32 = _bytes_per_parameter(curvopt.psgd_kron(1e-3), params)
      bf16 = _bytes_per_parameter(curvopt.psgd_kron(1e-3, state_dtype=jnp.bfloat16), params)
      lines.append(f"| {shape} | {name} | — | {f32:.2f} | {bf16:.2f} |")
  return lines


def _variant(optimizer: str, dtype: str, hyperparameters: dict) -> str:
  """What a run stored apart from `state_dtype`, against today's defaults ("": nothing)."""
  if optimizer != "shampoo" or dtype == "float32":
    return ""
  # Before statistics_dtype existed (no such key in the run's spec), Shampoo's statistics
  # followed state_dtype; since, they stay float32 unless statistics_dtype says otherwise.
  statistics = hyperparameters.get("statistics_dtype", dtype) or "float32"
  parts = [f"statistics {statistics}"] if statistics != "float32" else []
  if hyperparameters.get("root_dtype"):
    parts.append(f"roots {hyperparameters['root_dtype']}")
  return ", ".join(parts)


def losses(root: pathlib.Path) -> list[str]:
  # (workload, optimizer, variant, dtype) -> seed -> (final train loss, test metric). A
  # variant is a per-statistic dtype (Shampoo's statistics_dtype, root_dtype), compared with the
  # plain float32 runs. One run per seed: a rerun of a seed under a newer spec id (the
  # optimizer gained an argument) replaces the older one.
  runs = collections.defaultdict(dict)
  for workload, folder in LOSS_FOLDERS.items():
    paths = sorted((root / folder / "runs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    for path in paths:
      records = results.read_records(path)
      if not records or records[-1].get("event") != "done":
        continue
      spec = records[0].get("spec", records[0])
      hyperparameters = dict(spec.get("hyperparameters", {}))
      dtype = hyperparameters.get("state_dtype") or "float32"
      variant = _variant(spec["optimizer"], dtype, hyperparameters)
      done = records[-1]
      runs[(workload, spec["optimizer"], variant, dtype)][spec["seed"]] = (
        done["final_train_loss"],
        done.get("final_test_metric"),
      )
  lines = [
    "| workload | optimizer | seeds (both) | final train loss, float32 [seeds' range] "
    "| bfloat16 [range] | change "
    "| test metric, float32 | bfloat16 |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for workload, optimizer, variant in sorted({k[:3] for k in runs}):
    f32_seeds = runs.get((workload, optimizer, "", "float32"), {})
    bf16_seeds = runs.get((workload, optimizer, variant, "bfloat16"), {})
    seeds = sorted(f32_seeds.keys() & bf16_seeds.keys())  # compared over the seeds both have
    if not seeds:
      continue
    f32, bf16 = [f32_seeds[k] for k in seeds], [bf16_seeds[k] for k in seeds]
    median = lambda xs, i: statistics.median(x[i] for x in xs)
    spread = lambda xs: f"[{min(x[0] for x in xs):.4g}, {max(x[0] for x in xs):.4g}]"
    a, b = median(f32, 0), median(bf16, 0)
    label = f"{optimizer}, {variant}" if variant else optimizer
    lines.append(
      f"| {workload} | {label} | {len(seeds)} | {a:.4g} {spread(f32)} | {b:.4g} {spread(bf16)} "
      f"| {(b / a - 1) * 100:+.1f}% | {median(f32, 1):.4f} | {median(bf16, 1):.4f} |"
    )
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="benchmarks/results/state_precision")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  text = "\n".join(
    [
      "### State bytes per parameter, whole model (`curvopt.state_size`)",
      "",
      *workload_bytes(),
      "",
      "### Per layer shape",
      "",
      *shape_bytes(),
      "",
      "### Loss with bfloat16 state (median over seeds, same learning rate)",
      "",
      *losses(pathlib.Path(args.root)),
      "",
    ]
  )
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
