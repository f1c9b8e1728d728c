"""AdaHessian (Yao et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.typing import DTypeLike

from curvopt import _checks
from curvopt.transforms import (
  hutchinson_diagonal_estimator,
  scale_by_adahessian,
  skip_nonfinite,
  with_state_dtype,
)


def adahessian(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-4,
  weight_decay: float = 0.0,
  hessian_power: float = 1.0,
  *,
  refresh_every: int = 1,
  absolute: bool = True,
  averaging_axes: str | Callable[[jax.Array], tuple[int, ...]] | Any | None = "flax",
  seed: int = 0,
  state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaHessian: Adam whose second moment is a Hutchinson Hessian diagonal.

  At step `t`, with gradient `g` and a Rademacher probe `z` drawn from the key
  in the state:

  $$
  D = \mathrm{avg}(|z \odot H z|), \quad
  m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
  v \leftarrow \beta_2 v + (1 - \beta_2) D^2, \\
  \theta \leftarrow \theta - \eta \left(
    \frac{m / (1 - \beta_1^t)}{(\sqrt{v / (1 - \beta_2^t)})^{k} + \epsilon}
    + \lambda \theta \right)
  $$

  `H` is the Hessian of the extra argument `value_fn` (the loss of the current
  batch); the probe is refreshed every `refresh_every` steps (the latest `D`
  is reused in between). `avg` is the spatial average over `averaging_axes`.

  The absolute value is taken *before* averaging, as in all four reference
  implementations (the paper writes the signed `z * Hz`); `absolute=False`
  gives the paper's form. Spatial averaging defaults to flax's kernel layout
  `(*spatial, in, out)` (`averaging_axes="flax"`): rank-3 kernels (1-D
  convolutions) are averaged over axis 0, rank-4 over axes (0, 1); dense
  kernels, biases and scales are not. Pass a function `leaf -> axes`, a
  pytree of axis tuples, or None instead.

  Weight decay is decoupled (added after the scaling, as in the reference
  code). Moments are float32 for any parameter dtype; updates come back in
  the parameters' dtype.

  Args:
    learning_rate: a float or an optax schedule.
    b1: EMA rate of the gradient.
    b2: EMA rate of the squared Hessian diagonal.
    eps: added to the denominator after the power (1e-4, the reference value).
    weight_decay: decoupled weight decay.
    hessian_power: the exponent `k` in [0, 1] on the denominator.
    refresh_every: Hessian-diagonal refresh interval in steps (1: every step,
      which costs one Hessian-vector product per step; above 1 the refresh
      sits in a `lax.cond`, which on CPU slows convolutions, jax-ml/jax#12868).
    absolute: take `|z * Hz|` before averaging (reference code) or not (paper).
    averaging_axes: spatial averaging axes (see above). With
      `optax.inject_hyperparams`, pass `static_args=("refresh_every",
      "absolute", "seed")`: they are Python values, not hyperparameters.
    seed: seed of the probes' PRNG key.
    state_dtype: the dtype the state is stored in (None: float32; `jnp.bfloat16`
      halves it); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`.

  Returns:
    A `GradientTransformationExtraArgs` whose `update` needs `value_fn`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> loss = lambda w: jnp.sum(jnp.array([1.0, 10.0]) * (w - 1.0) ** 2)
    >>> params = jnp.zeros(2)
    >>> opt = curvopt.adahessian(0.1)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params, value_fn=loss)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> params.round(2)
    Array([1., 1.], dtype=float32)

  References:
    Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive
    Second Order Optimizer for Machine Learning", AAAI 2021.
  """
  _checks.shared_hyperparameters(
    learning_rate=learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
  )
  _checks.positive("eps", eps, _checks.EPS_IS_A_FLOOR)

  _checks.in_range("hessian_power", hessian_power, 0.0, 1.0, high_inclusive=True)
  return skip_nonfinite(
    with_state_dtype(
      optax.chain(
        scale_by_adahessian(
          b1,
          b2,
          eps,
          hessian_power,
          refresh_every=refresh_every,
          absolute=absolute,
          averaging_axes=averaging_axes,
          hessian_diagonal_fn=hutchinson_diagonal_estimator(seed=seed, name="adahessian"),
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
      ),
      state_dtype,
    )
  )
