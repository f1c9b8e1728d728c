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


# (width, depth, heads, context, batch size, validation windows, target): parameters
# tiny 21k, small 0.36M, medium 1.8M, full 7.5M. `small` is sized for a 2-core CPU
# comparison, `medium` for a tuned one in about two hours of 2 cores, `full` for one
# accelerator. The small target: Adam at 3e-3 (constant) reached 2.35 in 300 steps
# (62.6 ms a step on 2 cores); medium: AdamW at 2.5e-3 (warmup + cosine, seed 0)
# reached 2.30 at step 225 and 2.25 at 300 (1.45 s a step on 2 busy cores); tiny and
# full targets are not calibrated.
_GPT_SIZES = {
  "tiny": (32, 1, 2, 32, 8, 32, 2.8),
  "small": (96, 3, 4, 64, 16, 128, 2.3),
  "medium": (192, 4, 6, 64, 32, 128, 2.3),
  "full": (320, 6, 5, 256, 64, 256, 1.2),
}


def gpt_lm(
  size: str = "small", batch_size: int | None = None, context: int | None = None
) -> Workload:
  """GPT-style decoder (pre-norm, tied embeddings) on Python's stdlib source, byte level."""
  _checks.one_of("size", size, tuple(_GPT_SIZES))
  width, depth, heads, default_context, default_batch, windows, target = _GPT_SIZES[size]
  batch_size = default_batch if batch_size is None else batch_size
  context = default_context if context is None else context
  check_batch_size(batch_size, full_batch_allowed=False)
  _checks.positive_int("context", context)
  corpus = data.python_source_corpus()
  train_ids, validation_ids = corpus.train, corpus.validation
  fixed = np.random.default_rng(1234)
  train_eval = _windows(
    train_ids, fixed.integers(0, len(train_ids) - context - 1, windows), context
  )
  valid = _windows(
    validation_ids, fixed.integers(0, len(validation_ids) - context - 1, windows), context
  )
  valid_x, valid_y = jnp.asarray(valid[0], jnp.int32), jnp.asarray(valid[1], jnp.int32)

  def model_fn(params, tokens):
    return models.transformer(params, tokens, heads=heads)

  def sample(seed: int, step: int):
    starts = np.random.default_rng([seed, step]).integers(
      0, len(train_ids) - context - 1, batch_size
    )
    inputs, targets = _windows(train_ids, starts, context)
    return inputs.astype(np.int32), targets.astype(np.int32)

  return Workload(
    name="gpt_lm",
    description=(
      f"{size}: {depth}-layer GPT (width {width}, {heads} heads, context {context}, tied "
      f"embeddings), bytes of {corpus.description}"
    ),
    loss_type="softmax_cross_entropy",
    init_params=lambda key: models.init_transformer(
      key, 256, context=context, width=width, depth=depth, heads=heads, tied=True
    ),
    model_fn=model_fn,
    loss_fn=models.sequence_cross_entropy,
    train=(train_ids[:-1, None], train_ids[1:, None]),
    batch_size=batch_size,
    test_metric="validation_loss",
    test_metric_fn=lambda p: models.sequence_cross_entropy(model_fn(p, valid_x), valid_y),
    higher_is_better=False,
    target=target,
    sample_batch=sample,
    train_eval_batch=(train_eval[0].astype(np.int32), train_eval[1].astype(np.int32)),
  )
