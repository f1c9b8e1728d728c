"""What every notebook shares: the fast mode, where figures and numbers go, small MLPs.

`CURVOPT_NOTEBOOK_FAST=1` shrinks every experiment so the notebook tests run
in CI; `CURVOPT_NOTEBOOK_OUT` (default `notebooks/figures`) receives the
PNG figures and one JSON file of key numbers per notebook.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")

FAST = os.environ.get("CURVOPT_NOTEBOOK_FAST", "0") == "1"
OUT = pathlib.Path(
  os.environ.get("CURVOPT_NOTEBOOK_OUT", pathlib.Path(__file__).parent / "figures")
)
OUT.mkdir(parents=True, exist_ok=True)


def fast_or_full(fast, full):
  """The fast-mode value in CI, the full one otherwise."""
  return fast if FAST else full


def save_figure(fig, name: str) -> pathlib.Path:
  path = OUT / f"{name}.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


def record(notebook: str, numbers: dict) -> None:
  """Writes the notebook's key numbers (what its test checks) as JSON."""
  suffix = "_fast" if FAST else ""
  (OUT / f"{notebook}{suffix}.json").write_text(json.dumps(numbers, indent=2, sort_keys=True))
  print(json.dumps(numbers, indent=2, sort_keys=True))


def init_mlp(key, sizes, parameterization="sp", bias=True):
  """Weights for `mlp`: "sp" draws `N(0, 1/fan_in)`; "ntk" and "mup" draw `N(0, 1)`.

  The multipliers live in `mlp`: NTK scales every layer by `1/sqrt(fan_in)`,
  muP the same but the readout by `1/fan_in` (Yang and Hu 2021, the
  multiplier form of Noci et al. 2024).
  """
  params = []
  for k, (m, n) in zip(
    jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes), strict=True
  ):
    scale = 1 / jnp.sqrt(m) if parameterization == "sp" else 1.0
    layer = {"w": scale * jax.random.normal(k, (m, n))}
    if bias:
      layer["b"] = jnp.zeros(n)
    params.append(layer)
  return params


def mlp(params, x, parameterization="sp"):
  for i, layer in enumerate(params):
    fan_in = layer["w"].shape[0]
    readout = i == len(params) - 1
    if parameterization == "sp":
      multiplier = 1.0
    elif parameterization == "mup" and readout:
      multiplier = 1.0 / fan_in
    else:
      multiplier = 1.0 / jnp.sqrt(fan_in)
    x = multiplier * (x @ layer["w"]) + layer.get("b", 0.0)
    if not readout:
      x = jnp.tanh(x)
  return x


def half_mse(outputs, labels, num_classes=10):
  """Cohen et al.'s square loss: 0.5 mean over examples of ||f - onehot||^2."""
  return 0.5 * jnp.mean(jnp.sum((outputs - jax.nn.one_hot(labels, num_classes)) ** 2, axis=-1))


def cross_entropy(outputs, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(outputs), labels[:, None], axis=-1))
