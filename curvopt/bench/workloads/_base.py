"""What a workload is: data, a model and a loss, kept apart (as in AlgoPerf)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt import _checks

Params = Any
Batch = tuple[Any, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
  """A training problem, with `model_fn` and `loss_fn` separate for Gauss-Newton methods.

  Attributes:
    name: registry name.
    description: one line for `curvopt-bench list`.
    loss_type: "softmax_cross_entropy", "sigmoid_cross_entropy",
      "mean_squared_error" or "least_squares" (a sum of squared residuals).
    init_params: `key -> params`.
    model_fn: `(params, inputs) -> outputs` on a batch.
    loss_fn: `(outputs, targets) -> scalar` mean loss on a batch.
    train: `(inputs, targets)` numpy arrays with a leading example axis.
    batch_size: examples per step; None means full batch.
    test_metric: name of `test_metric_fn`'s value.
    test_metric_fn: `params -> scalar` on held-out data (or the optimum).
    higher_is_better: direction of the test metric.
    target: the default training-loss target for steps- and time-to-target.
    l2: strength of an L2 penalty `(l2/2) ||mask * params||^2` added to the loss.
    l2_mask: `params -> pytree of booleans` choosing the penalized leaves (None: all).
    sample_batch: `(seed, step) -> batch` when batches are not subsets of `train`.
    train_eval_batch: the batch the reported training loss is measured on.
    hidden_matrices: `params -> pytree of booleans` marking the hidden weight
      matrices (and convolution kernels), the leaves matrix optimizers such as
      Muon orthogonalize; embeddings, output heads, the first layer, norms and
      biases go to Adam (Jordan et al. 2024). None: `default_hidden_matrices`.
  """

  name: str
  description: str
  loss_type: str
  init_params: Callable[[jax.Array], Params]
  model_fn: Callable[[Params, Any], Any]
  loss_fn: Callable[[Any, Any], jax.Array]
  train: Batch
  batch_size: int | None
  test_metric: str
  test_metric_fn: Callable[[Params], jax.Array]
  higher_is_better: bool
  target: float
  l2: float = 0.0
  l2_mask: Callable[[Params], Any] | None = None
  sample_batch: Callable[[int, int], Batch] | None = None
  train_eval_batch: Batch | None = None
  hidden_matrices: Callable[[Params], Any] | None = None

  @property
  def loss_lower_bound(self) -> float:
    """The training objective is never below this: every loss type here and the L2 penalty
    are non-negative."""
    return 0.0

  @property
  def num_train(self) -> int:
    return len(self.train[0])

  def value_fn(self, params: Params, batch: Batch) -> jax.Array:
    """The training objective on `batch`: the mean loss plus the penalty."""
    inputs, targets = batch
    value = self.loss_fn(self.model_fn(params, inputs), targets)
    if not self.l2:
      return value
    mask = jax.tree.map(lambda _: True, params) if self.l2_mask is None else self.l2_mask(params)
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
    return value + 0.5 * self.l2 * sum(jnp.sum(p**2) for p, m in leaves if m)

  def batch(self, seed: int, step: int) -> Batch:
    """The batch of `step`, a function of `(seed, step)` only, so runs resume exactly."""
    if self.sample_batch is not None:
      return self.sample_batch(seed, step)
    if self.batch_size is None or self.batch_size >= self.num_train:
      return self.train
    index = _batch_indices(self.num_train, self.batch_size, seed, step)
    return self.train[0][index], self.train[1][index]

  def eval_batch(self) -> Batch:
    return self.train if self.train_eval_batch is None else self.train_eval_batch

  def hidden_matrix_mask(self, params: Params) -> Any:
    """Which leaves of `params` are hidden weight matrices (see `hidden_matrices`)."""
    rule = default_hidden_matrices if self.hidden_matrices is None else self.hidden_matrices
    return rule(params)


# Leaves under these names are not hidden matrices: the input and output layers.
_INPUT_OUTPUT_NAMES = frozenset({"embed", "position", "unembed", "head", "stem"})


def default_hidden_matrices(params: Params) -> Any:
  """Leaves of two or more axes outside any `embed`, `position`, `unembed`, `head`, `stem` key.

  Matrix optimizers treat the last axis as the output axis and the others as
  inputs (dense `(in, out)`, convolution `(h, w, in, out)`).
  """

  def hidden(path, leaf) -> bool:
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return len(getattr(leaf, "shape", ())) >= 2 and not names & _INPUT_OUTPUT_NAMES

  return jax.tree_util.tree_map_with_path(hidden, params)


def check_batch_size(batch_size: int | None, *, full_batch_allowed: bool = True) -> None:
  """Rejects a batch size that is not a positive integer (or None for full batch)."""
  if batch_size is None and full_batch_allowed:
    return
  _checks.positive_int("batch_size", batch_size)


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Shuffled epochs without replacement; the last partial batch of an epoch is dropped."""
  per_epoch = n // batch_size
  epoch, offset = divmod(step, per_epoch)
  return _permutation(n, seed, epoch)[offset * batch_size : (offset + 1) * batch_size]
