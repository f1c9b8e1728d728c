"""M-FAC (Frantar, Kurtic and Alistarh 2021)."""

from __future__ import annotations

import optax

from curvopt import _checks
from curvopt.transforms import (
  ema_momentum,
  refuse_unaffordable_state,
  scale_by_mfac,
  skip_nonfinite,
)

_MEMORY_HINT = (
  "Lower num_grads: the window holds num_grads gradients and a num_grads x num_grads "
  "Gram matrix, and beyond the parameter count it adds no rank."
)


def mfac(
  learning_rate: optax.ScalarOrSchedule,
  num_grads: int = 1024,
  damping: float = 1e-5,
  momentum: float = 0.0,
  weight_decay: float = 0.0,
  refresh_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""M-FAC: steps along the inverse empirical Fisher of the last `m` gradients.

  $$
  g \leftarrow g + \text{wd}\,\theta, \quad
  u = \Big(\lambda I + \tfrac{1}{m} \sum_{i=1}^{m} g_i g_i^T\Big)^{-1} g, \quad
  v \leftarrow \mu v + (1 - \mu) u, \quad
  \theta \leftarrow \theta - \text{lr}\, v
  $$

  with the current gradient (weight decay included, as in the paper's code)
  entering the window before the product. A step costs `O(d m + m^2)` (the
  paper's dynamic algorithm; `O(d^2 + d m)` when `d < m`), plus an exact
  recomputation every `refresh_every` steps; memory is `m d` (the window)
  and `min(d, m)^2`. See `curvopt.transforms.scale_by_mfac`.

  Args:
    learning_rate: a float or an optax schedule.
    num_grads: `m`, the window length.
    damping: `lambda > 0`.
    momentum: `mu` in [0, 1): an EMA of the directions (0: none).
    weight_decay: L2 coefficient added to the gradient (coupled).
    refresh_every: steps between exact recomputations of the window's
      inverse (None: `m`; 1: every step, the static algorithm).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> opt = curvopt.mfac(0.5, num_grads=4, damping=0.1)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(5):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < loss(jnp.zeros(2)))
    True

  References:
    Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations
    of Second-Order Information", NeurIPS 2021.
  """
  _checks.shared_hyperparameters(learning_rate=learning_rate, weight_decay=weight_decay)
  _checks.in_range("momentum", momentum, 0.0, 1.0)
  transforms = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  transforms.append(scale_by_mfac(num_grads, damping, refresh_every))
  if momentum:
    transforms.append(ema_momentum(momentum))
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  return skip_nonfinite(refuse_unaffordable_state(optax.chain(*transforms), "mfac", _MEMORY_HINT))
