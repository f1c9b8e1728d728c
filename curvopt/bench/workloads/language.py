"""A character-level transformer language model on a play that ships with curvopt."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from curvopt import _checks
from curvopt.bench import data, models
from curvopt.bench.workloads._base import Workload, check_batch_size


def _windows(ids: np.ndarray, starts: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
  index = starts[:, None] + np.arange(context)[None]
  return ids[index], ids[index + 1]


def char_transformer(batch_size: int = 32, context: int = 64) -> Workload:
  """2-layer transformer (width 64, 4 heads) predicting the next character of Macbeth."""
  check_batch_size(batch_size, full_batch_allowed=False)
  _checks.positive_int("context", context)
  train_ids, test_ids, vocabulary = data.macbeth()
  fixed = np.random.default_rng(1234)
  train_eval = _windows(train_ids, fixed.integers(0, len(train_ids) - context - 1, 64), context)
  test_eval = _windows(test_ids, fixed.integers(0, len(test_ids) - context - 1, 64), context)
  test_x, test_y = jnp.asarray(test_eval[0]), jnp.asarray(test_eval[1])

  def sample(seed: int, step: int):
    starts = np.random.default_rng([seed, step]).integers(
      0, len(train_ids) - context - 1, batch_size
    )
    return _windows(train_ids, starts, context)

  return Workload(
    name="char_transformer",
    description=(
      f"Macbeth (shipped, 103 kB), 2-layer char transformer, context {context}, "
      f"vocabulary {len(vocabulary)}"
    ),
    loss_type="softmax_cross_entropy",
    init_params=lambda key: models.init_transformer(key, len(vocabulary), context=context),
    model_fn=models.transformer,
    loss_fn=models.sequence_cross_entropy,
    train=(train_ids[:-1, None], train_ids[1:, None]),
    batch_size=batch_size,
    test_metric="test_loss",
    test_metric_fn=lambda p: models.sequence_cross_entropy(models.transformer(p, test_x), test_y),
    higher_is_better=False,
    target=2.0,
    sample_batch=sample,
    train_eval_batch=train_eval,
  )
