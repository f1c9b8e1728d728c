"""A residual CNN with per-example normalization on image-shaped digits."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from curvopt import _checks
from curvopt.bench import data, models
from curvopt.bench.workloads._base import Workload, check_batch_size

# (resolution, stage widths, blocks per stage, batch size, target): parameters
# tiny 8k, small 0.17M, medium 0.70M, full 2.8M.
_RESNET_SIZES = {
  "tiny": (8, (8, 16), 1, 32, 0.3),
  "small": (16, (24, 48, 96), 1, 32, 0.05),
  "medium": (16, (32, 64, 128), 2, 64, 0.02),
  "full": (32, (64, 128, 256), 2, 128, 0.01),
}


@functools.cache
def _digit_images(resolution: int) -> data.Dataset:
  """sklearn digits as `(n, r, r, 1)` images, upsampled from 8 x 8 by pixel repetition."""
  d = data.digits()
  factor = resolution // 8

  def images(x):
    x = x.reshape(-1, 8, 8)
    return np.repeat(np.repeat(x, factor, 1), factor, 2)[..., None].astype(np.float32)

  return d._replace(x_train=images(d.x_train), x_test=images(d.x_test))


def resnet_digits(size: str = "small", batch_size: int | None = None) -> Workload:
  """ResNet with GroupNorm (per-example statistics) on sklearn digits upsampled; test accuracy."""
  _checks.one_of("size", size, tuple(_RESNET_SIZES))
  resolution, widths, blocks, default_batch, target = _RESNET_SIZES[size]
  batch_size = default_batch if batch_size is None else batch_size
  check_batch_size(batch_size)
  d = _digit_images(resolution)
  x_test, y_test = jnp.asarray(d.x_test), jnp.asarray(d.y_test)
  return Workload(
    name="resnet_digits",
    description=(
      f"{size}: ResNet {'-'.join(map(str, widths))} x{blocks} blocks, GroupNorm, on sklearn "
      f"digits upsampled to {resolution}x{resolution} (1438 train / 359 test), cross-entropy"
    ),
    loss_type="softmax_cross_entropy",
    init_params=lambda key: models.init_resnet(key, widths, blocks),
    model_fn=models.resnet,
    loss_fn=models.softmax_cross_entropy,
    train=(d.x_train, d.y_train),
    batch_size=batch_size,
    test_metric="test_accuracy",
    test_metric_fn=lambda p: models.accuracy(models.resnet(p, x_test), y_test),
    higher_is_better=True,
    target=target,
  )
