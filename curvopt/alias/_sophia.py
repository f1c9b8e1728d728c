"""Sophia-H (Liu et al. 2024)."""

from __future__ import annotations

import optax
from jax.typing import DTypeLike

from curvopt import _checks
from curvopt.transforms import (
  hutchinson_diagonal_estimator,
  scale_by_sophia_h,
  skip_nonfinite,
  with_state_dtype,
)


def sophia_h(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.965,
  b2: float = 0.99,
  gamma: float = 0.01,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
  clip_threshold: float = 1.0,
  *,
  refresh_every: int = 10,
  seed: int = 0,
  state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sophia-H: a clipped diagonal Newton step with a lazy Hutchinson Hessian diagonal.

  $$
  m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
  \theta \leftarrow \theta - \eta \left(
    \mathrm{clip}\left(\frac{m / (1 - \beta_1^t)}{\max(\gamma h, \epsilon)}, \pm c\right)
    + \lambda \theta \right)
  $$

  and every `refresh_every` steps (from the first), `h <- b2 h + (1 - b2) z * Hz`
  with a Rademacher probe `z` and `H` the Hessian of the extra argument
  `value_fn`. Each step uses the `h` known before it, so the first step is
  the clipped sign step. This is optax's `contrib.sophia` update, step for
  step, with the paper's clipping (`min(|m| / max(gamma h, eps), 1)`);
  the differences are deliberate: the probe's key lives in the state and is
  seeded by `seed`, the probe is one draw cut into the leaves (identical on
  every replica), statistics are float32 for bfloat16 parameters, and the
  extra argument is `value_fn` (optax calls it `obj_fn`).

  Args:
    learning_rate: a float or an optax schedule.
    b1: EMA rate of the gradient.
    b2: EMA rate of the Hessian diagonal (per refresh).
    gamma: scale of the Hessian diagonal in the denominator.
    eps: floor of the denominator (also where curvature is negative).
    weight_decay: decoupled weight decay.
    clip_threshold: the per-coordinate clip `c`.
    refresh_every: Hessian refresh interval `k` (the paper's 10).
    seed: seed of the probes' PRNG key.
    state_dtype: the dtype the state is stored in (None: float32; `jnp.bfloat16`
      halves it); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`.

  Returns:
    A `GradientTransformationExtraArgs` whose `update` needs `value_fn`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> loss = lambda w: jnp.sum(jnp.array([1.0, 10.0]) * (w - 1.0) ** 2)
    >>> params, opt = jnp.zeros(2), curvopt.sophia_h(0.02, weight_decay=0.0)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> params.round(2)
    Array([1., 1.], dtype=float32)

  References:
    Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order
    Optimizer for Language Model Pre-training", ICLR 2024.
  """
  _checks.shared_hyperparameters(
    learning_rate=learning_rate,
    b1=b1,
    b2=b2,
    gamma=gamma,
    eps=eps,
    weight_decay=weight_decay,
  )
  _checks.positive("eps", eps, _checks.EPS_IS_A_FLOOR)

  _checks.positive("clip_threshold", clip_threshold, " (0 would never move)")
  return skip_nonfinite(
    with_state_dtype(
      optax.chain(
        scale_by_sophia_h(
          b1,
          b2,
          gamma,
          eps,
          clip_threshold,
          refresh_every=refresh_every,
          hessian_diagonal_fn=hutchinson_diagonal_estimator(seed=seed, name="sophia_h"),
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
      ),
      state_dtype,
    )
  )
