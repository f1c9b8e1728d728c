"""Classification workloads on real data: digits, mnist1d, breast cancer."""

from __future__ import annotations

import jax.numpy as jnp

from curvopt import _checks
from curvopt.bench import data, models
from curvopt.bench.workloads._base import Workload, check_batch_size


def _accuracy_on(dataset, apply):
  x, y = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
  return lambda params: models.accuracy(apply(params, x), y)


def digits_mlp(batch_size: int | None = 128, hidden: str = "64") -> Workload:
  """MLP 64-64-10 (tanh) on sklearn digits; test accuracy on 359 held-out images.

  `hidden` gives the hidden widths, "-"-separated ("384-192": a network wide for
  a small batch, where a Kronecker method's matrix work rivals the model's).
  """
  check_batch_size(batch_size)
  try:
    widths = tuple(int(w) for w in hidden.split("-"))
  except (AttributeError, ValueError):
    widths = ()
  if not widths or min(widths) <= 0:
    raise ValueError(
      f'hidden must be positive widths separated by "-" (e.g. "384-192"), got {hidden!r}.'
    )
  d = data.digits()
  sizes = (64, *widths, 10)
  return Workload(
    name="digits_mlp",
    description=(
      f"sklearn digits (1438 train / 359 test), MLP {'-'.join(map(str, sizes))} tanh, cross-entropy"
    ),
    loss_type="softmax_cross_entropy",
    init_params=lambda key: models.init_mlp(key, sizes),
    model_fn=models.mlp,
    loss_fn=models.softmax_cross_entropy,
    train=(d.x_train, d.y_train),
    batch_size=batch_size,
    test_metric="test_accuracy",
    test_metric_fn=_accuracy_on(d, models.mlp),
    higher_is_better=True,
    target=0.05,
  )


def mnist1d_cnn(batch_size: int | None = 128) -> Workload:
  """A 1-D CNN (three 5-wide convolutions, 32 channels) on mnist1d (generated locally)."""
  check_batch_size(batch_size)
  d = data.mnist1d()
  return Workload(
    name="mnist1d_cnn",
    description="mnist1d (4000 train / 1000 test, generated), 1-D CNN 3x conv5(32), cross-entropy",
    loss_type="softmax_cross_entropy",
    init_params=lambda key: models.init_cnn1d(key),
    model_fn=models.cnn1d,
    loss_fn=models.softmax_cross_entropy,
    train=(d.x_train, d.y_train),
    batch_size=batch_size,
    test_metric="test_accuracy",
    test_metric_fn=_accuracy_on(d, models.cnn1d),
    higher_is_better=True,
    target=0.5,
  )


def breast_cancer_logreg(l2: float = 1e-3) -> Workload:
  """L2-regularized logistic regression on sklearn breast cancer, full batch (convex)."""
  _checks.non_negative_float("l2", l2)
  d = data.breast_cancer()
  model = lambda params, x: x @ params["w"] + params["b"]
  x_test, y_test = jnp.asarray(d.x_test), jnp.asarray(d.y_test)
  return Workload(
    name="breast_cancer_logreg",
    description=f"sklearn breast cancer (455 / 114), logistic regression, L2 {l2:g}, full batch",
    loss_type="sigmoid_cross_entropy",
    init_params=lambda key: {"w": jnp.zeros((30, 1)), "b": jnp.zeros(1)},
    model_fn=model,
    loss_fn=models.binary_logistic_loss,
    train=(d.x_train, d.y_train),
    batch_size=None,
    test_metric="test_accuracy",
    test_metric_fn=lambda p: jnp.mean((model(p, x_test)[:, 0] > 0) == (y_test == 1)),
    higher_is_better=True,
    target=0.07,
    l2=l2,
    l2_mask=lambda p: {"w": True, "b": False},
  )
