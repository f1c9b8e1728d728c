"""Grafting: the diagonal optimizer whose per-block step size Shampoo borrows."""

from __future__ import annotations

from typing import Literal

import optax

Grafting = Literal["adam", "rmsprop", "adagrad", "sgd"]
GRAFTINGS = ("adam", "rmsprop", "adagrad", "sgd")


def grafting_transform(
  grafting: Grafting | optax.GradientTransformation | None, b2: float, eps: float
) -> optax.GradientTransformation | None:
  """The graft direction's transform (second moments only; momentum comes later in the chain).

  "adam" is bias-corrected RMSProp (Meta's Adam grafting), "rmsprop" the
  uncorrected EMA, "adagrad" the running sum of squares, "sgd" the gradient
  itself; an optax transform is used as given; None means no grafting.
  """
  if grafting is None or isinstance(grafting, optax.GradientTransformation):
    return grafting
  if grafting not in GRAFTINGS:
    raise ValueError(
      f"grafting must be one of {', '.join(map(repr, GRAFTINGS))}, an optax "
      f"GradientTransformation, or None; got {grafting!r}."
    )
  if grafting == "sgd":
    return optax.identity()
  if grafting == "adagrad":
    return optax.scale_by_rss(initial_accumulator_value=0.0, eps=eps)
  return optax.scale_by_rms(
    decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=grafting == "adam"
  )
