"""PSGD (Li 2015-2026): preconditioners fitted on Lie groups, as short optax chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
from jax.typing import DTypeLike

from curvopt import _checks
from curvopt.transforms import (
  Fit,
  Geometry,
  ema_momentum,
  refuse_unaffordable_state,
  scale_by_psgd_dense,
  scale_by_psgd_kron,
  scale_by_psgd_lra,
  skip_nonfinite,
  with_state_dtype,
)

_MEMORY_HINT = (
  "Lower max_skew (1 keeps every dense Kronecker factor within its tensor's size) or set "
  "max_size (PSGD-Kron), or lower rank (PSGD-LRA)."
)


def _chain(
  name: str,
  preconditioner: optax.GradientTransformationExtraArgs,
  learning_rate: optax.ScalarOrSchedule,
  b1: float,
  weight_decay: float,
  weight_decay_mask: Any,
  max_update_rms: float | None,
  state_dtype: DTypeLike | None,
) -> optax.GradientTransformationExtraArgs:
  _checks.shared_hyperparameters(learning_rate=learning_rate, b1=b1, weight_decay=weight_decay)
  if max_update_rms is not None:
    # 0 would zero every update: "no clip" is None.
    _checks.positive("max_update_rms", max_update_rms, " (None for no clip)")
  steps = with_state_dtype(
    optax.chain(
      preconditioner,
      ema_momentum(b1),
      optax.clip_by_block_rms(max_update_rms) if max_update_rms is not None else optax.identity(),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
    ),
    state_dtype,
  )
  if name != "psgd_dense":  # its own max_dimension refuses; raising it is meant
    steps = refuse_unaffordable_state(steps, name, _MEMORY_HINT)
  return skip_nonfinite(steps)


def psgd_kron(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  weight_decay: float = 0.0,
  *,
  fit: Fit = "whitening",
  lr_preconditioner: optax.ScalarOrSchedule = 0.1,
  update_probability: optax.ScalarOrSchedule | None = None,
  init_scale: float | None = None,
  beta_l: float = 0.9,
  damping: float = 1e-9,
  max_size: int | None = None,
  max_skew: float = 1.0,
  geometry: Geometry = "Q0.5EQ1.5",
  max_update_rms: float | None = 1.1,
  weight_decay_mask: Any | Callable | None = None,
  seed: int = 0,
  state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  """PSGD-Kron: per tensor, a Kronecker product of per-axis factors fitted on a Lie group.

  `optax.chain(scale_by_psgd_kron, ema_momentum(b1), clip_by_block_rms,
  add_decayed_weights, scale_by_learning_rate)`: the direction `P g` with
  `P = Q^T Q`, `Q = Q_1 (x) ... (x) Q_k` per tensor (dense factors on short
  sides, diagonal ones on long sides: see `scale_by_psgd_kron`), fitted with
  probability `update_probability` per step either to the gradients
  (`fit="whitening"`, the default: `P -> E[g g^T]^{-1/2}`, Adam-like learning
  rates, about half of Adam's) or to Hessian-vector products with Gaussian
  probes (`fit="newton"`, pass `value_fn`: `P -> |H|^{-1}`, learning rates
  a fraction of a Newton step, psgd_torch's default 0.01).

  Defaults per mode: whitening follows psgd_jax's
  `kron` (momentum 0.9, update probability 1 for 500 steps then decaying to
  0.03, RMS clip 1.1) with psgd_torch's scale derived from the first gradient;
  for psgd_torch's `KronNewton` pass `fit="newton", b1=0.0,
  update_probability=1.0, max_update_rms=None`.

  Decisions where the references differ:
    - The step normalizer is psgd_torch's running bound `L <- max(beta_l L +
      (1 - beta_l) ell, ell)`; `beta_l = 0` is the paper's and psgd_jax's
      per-step `mu / ||T_1 + T_2||`. Because `L` depends on the current
      sample, the fitted `P` is biased by a few percent when the probe pairs
      are noisy (whitening, or Newton on an indefinite `H`): measured 3% at
      `beta_l = 0.9`, under 1% at 0.999 (tests/test_psgd.py).
    - Kron and dense geometry: psgd_torch's Q0.5EQ1.5 (no triangular solves,
      `Q` kept near SPD by a Procrustes step) by default; "QE" and the
      paper's triangular "EQ" are options.
    - Momentum is an EMA of the preconditioned gradient, after `P` (psgd_torch's
      `whiten_grad=True`), so the preconditioner is fitted on the gradient
      itself and its target is `E[g g^T]^{-1/2}`, not that of the momentum.
    - The update's RMS is clipped per leaf at `max_update_rms` (psgd_jax's
      1.1) before weight decay and the learning rate.
    - Damping (`h + (damping rms(h) + eps |h|) xi`) is applied in both modes, so a
      parameter whose gradient is always zero keeps a finite `Q` (bounded by
      `P <= I / (damping rms(h))`) instead of growing geometrically. It is
      relative to the probe's RMS over all leaves (psgd_torch: absolute), so
      scaling the loss by any factor leaves the iterates unchanged (an absolute
      1e-9 swamped gradients of 1e-30 and the fit overflowed).
    - Factors are rebalanced at every fit (psgd_torch: with probability 0.01):
      it is cheap and deterministic.
    - The probes, the coin flip for fitting, and the LRA's coin for `U` or
      `V` are counter-based draws from one key in the state: fresh each step
      (psgd_jax fixes its probe seed) and identical on every replica.

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum (EMA of `P g`); 0 for none.
    weight_decay: decoupled weight decay.
    weight_decay_mask: optax mask for the weight decay.
    max_update_rms: per-leaf clip of the update's RMS; None for none.
    fit: "whitening" (`h = g`; `P -> E[g g^T]^{-1/2}`, no extra argument) or
      "newton" (`h = H v`, `v ~ N(0, I)`, from the extra argument `value_fn`;
      `P -> |H|^{-1}`).
    lr_preconditioner: `mu`, in (0, 1]; a float or a schedule of the step.
    update_probability: per-step probability of fitting `Q`; a float or a
      schedule. None: `psgd_update_probability()` (1 for 500 steps, then
      decaying to 0.03).
    init_scale: `Q = init_scale I` at the start; None derives it from the first
      probe pair (1 for a zero gradient).
    beta_l: decay of the running bound `L_i`; 0 gives the paper's per-step
      normalizer `mu / ||T_1 + T_2||` (psgd_jax).
    damping: `h + (damping rms(h) + eps |h|) xi`, `xi ~ N(0, I)`, with `rms(h)` over all
      leaves (1 if `h` is zero); bounds `P <= I / (damping rms(h))`.
    max_size: largest dense factor; None for no limit.
    max_skew: dense only if `d_i^2 <= max_skew * numel`; `float("inf")` for all dense.
    geometry: "Q0.5EQ1.5" (psgd_torch 2026, default), "QE" (psgd_torch 2025)
      or "EQ" (upper-triangular `Q`, the paper and psgd_jax).
    seed: the PRNG seed of the probes and coin flips (the key lives in the state). With
      `optax.inject_hyperparams`, pass `fit`, `max_size`, `max_skew`,
      `geometry` and `seed` as `static_args`.
    state_dtype: the dtype the state is stored in (None: float32; `jnp.bfloat16`
      halves it); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> target = jnp.arange(6.0).reshape(2, 3)
    >>> loss = lambda w: jnp.sum((w - target) ** 2)
    >>> params, opt = jnp.zeros((2, 3)), curvopt.psgd_kron(0.05)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(jnp.allclose(params, target, atol=3e-2))
    True

  References:
    Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018; Li,
    "Preconditioner on Matrix Lie Group for SGD", ICLR 2019; Pooladzandi & Li,
    "Curvature-Informed SGD via General Purpose Lie-Group Preconditioners",
    2024; Li, "Stochastic Hessian Fitting on Lie Group", 2024.
  """
  return _chain(
    "psgd_kron",
    scale_by_psgd_kron(
      fit,
      lr_preconditioner,
      update_probability,
      init_scale,
      beta_l=beta_l,
      damping=damping,
      max_size=max_size,
      max_skew=max_skew,
      geometry=geometry,
      seed=seed,
    ),
    learning_rate,
    b1,
    weight_decay,
    weight_decay_mask,
    max_update_rms,
    state_dtype=state_dtype,
  )


def psgd_lra(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  weight_decay: float = 0.0,
  *,
  fit: Fit = "whitening",
  rank: int = 10,
  lr_preconditioner: optax.ScalarOrSchedule = 0.1,
  update_probability: optax.ScalarOrSchedule | None = None,
  init_scale: float | None = None,
  beta_l: float = 0.9,
  damping: float = 1e-9,
  max_update_rms: float | None = 1.1,
  weight_decay_mask: Any | Callable | None = None,
  seed: int = 0,
  state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  """PSGD-LRA: one low-rank-plus-diagonal `Q = (I + U V^T) diag(d)` on all parameters.

  The chain of `psgd_kron` with `scale_by_psgd_lra` as the preconditioner:
  `O(n rank)` memory, and curvature shared across all layers.
  Decisions where the references differ: as for `psgd_kron`.

  The other arguments (`learning_rate`, `b1`, `weight_decay`, `weight_decay_mask`,
  `max_update_rms`, `fit`, `lr_preconditioner`, `update_probability`, `init_scale`,
  `beta_l`, `damping`) are those of `psgd_kron`, which documents them.

  Args:
    rank: the rank of `U V^T` (at most `n - 1`: a model with fewer than
      `rank + 1` parameters gets `n - 1`).
    seed: the PRNG seed of the probes and coin flips (the key lives in the state).
      `fit`, `rank` and `seed` are static under `optax.inject_hyperparams`.
    state_dtype: the dtype the state is stored in (None: float32; `jnp.bfloat16`
      halves it); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> loss = lambda w: jnp.sum(jnp.array([1.0, 10.0, 100.0]) * (w - 1.0) ** 2)
    >>> params, opt = jnp.zeros(3), curvopt.psgd_lra(0.05, rank=1)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(jnp.allclose(params, 1.0, atol=3e-2))
    True

  References:
    Li, "Preconditioner on Matrix Lie Group for SGD", ICLR 2019; Pooladzandi &
    Li, "Curvature-Informed SGD via General Purpose Lie-Group Preconditioners", 2024.
  """
  return _chain(
    "psgd_lra",
    scale_by_psgd_lra(
      fit,
      lr_preconditioner,
      update_probability,
      init_scale,
      rank=rank,
      beta_l=beta_l,
      damping=damping,
      seed=seed,
    ),
    learning_rate,
    b1,
    weight_decay,
    weight_decay_mask,
    max_update_rms,
    state_dtype=state_dtype,
  )


def psgd_dense(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.0,
  weight_decay: float = 0.0,
  *,
  fit: Fit = "newton",
  lr_preconditioner: optax.ScalarOrSchedule = 0.1,
  update_probability: optax.ScalarOrSchedule = 1.0,
  init_scale: float | None = None,
  beta_l: float = 0.9,
  damping: float = 1e-9,
  geometry: Geometry = "Q0.5EQ1.5",
  max_dimension: int = 16384,
  max_update_rms: float | None = 1.1,
  weight_decay_mask: Any | Callable | None = None,
  seed: int = 0,
  state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  """PSGD-dense: one dense `Q` on all `n` parameters; a quasi-Newton method for small models.

  The chain of `psgd_kron` with `scale_by_psgd_dense`. Defaults follow
  psgd_torch's `DenseNewton`: Newton-type fitting from the extra argument
  `value_fn` (`P -> |H|^{-1}`, saddle-free), a fit every step, no momentum;
  but the update's RMS is clipped at 1.1 as in `psgd_kron` (`DenseNewton`
  does not clip: after a flat stretch its fitted `P` is huge when curvature
  returns, and on a small MLP at learning rate 1 the unclipped updates grew
  3-10x a step until they overflowed). `O(n^2)` memory.
  Decisions where the references differ: as for `psgd_kron`.

  The other arguments (`learning_rate`, `b1`, `weight_decay`, `weight_decay_mask`,
  `max_update_rms`, `fit`, `lr_preconditioner`, `init_scale`, `beta_l`, `damping`,
  `geometry`, `seed`) are those of `psgd_kron`, which documents them.

  Args:
    update_probability: per-step probability of fitting `Q`; a float or a
      schedule. (1 by default here).
    max_dimension: the most parameters accepted (a dense `n x n` `Q`).
    state_dtype: the dtype the state is stored in (None: float32; `jnp.bfloat16`
      halves it); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> loss = lambda w: jnp.sum(jnp.array([1.0, 100.0]) * (w - 1.0) ** 2)
    >>> params, opt = jnp.zeros(2), curvopt.psgd_dense(0.5)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(jnp.allclose(params, 1.0, atol=1e-3))
    True

  References:
    Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018.
  """
  return _chain(
    "psgd_dense",
    scale_by_psgd_dense(
      fit,
      lr_preconditioner,
      update_probability,
      init_scale,
      beta_l=beta_l,
      damping=damping,
      geometry=geometry,
      max_dimension=max_dimension,
      seed=seed,
    ),
    learning_rate,
    b1,
    weight_decay,
    weight_decay_mask,
    max_update_rms,
    state_dtype=state_dtype,
  )
