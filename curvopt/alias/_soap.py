"""SOAP (Vyas et al. 2025): Adam in Shampoo's eigenbasis."""

from __future__ import annotations

import jax
import optax
from jax.typing import DTypeLike

from curvopt import _checks
from curvopt.alias._shampoo import MEMORY_HINT
from curvopt.transforms import (
  EigenbasisMethod,
  MatrixAxes,
  refuse_unaffordable_state,
  scale_by_soap,
  skip_nonfinite,
  with_state_dtype,
)


def soap(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.01,
  shampoo_beta: float | None = None,
  *,
  precondition_frequency: int = 10,
  start_preconditioning_step: int = 0,
  block_size: int = 1024,
  merge_dims: bool = True,
  precondition_1d: bool = False,
  matrix_axes: MatrixAxes | None = None,
  one_sided: bool = True,
  block_sharding: jax.sharding.NamedSharding | None = None,
  eigenbasis_method: EigenbasisMethod = "eigh",
  state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""SOAP: Adam run in the eigenbasis of each block's Shampoo factors.

  Per block `G` with factors `L_i <- s L_i + (1 - s) G_(i) G_(i)^T`
  (`s = shampoo_beta`, default `b2`) and their eigenvectors `Q_i`
  (recomputed by `eigh` every `precondition_frequency` steps, from step
  `start_preconditioning_step`; the identity before):

  $$
  G' = G \times_i Q_i^\top, \quad m \leftarrow b_1 m + (1-b_1) G, \quad
  v \leftarrow b_2 v + (1-b_2) G'^2, \quad
  u = \Big(\frac{\hat m \times_i Q_i^\top}{\sqrt{\hat v} + \epsilon}\Big) \times_i Q_i
  $$

  with bias-corrected `m`, `v`; then decoupled weight decay and the learning
  rate. Vectors and scalars (unless `precondition_1d`) get plain Adam. The
  block layout (merging, `block_size`, `matrix_axes`) is Shampoo's; see
  `curvopt.shampoo`.

  Decisions where the references differ: the
  defaults are the paper's (`b1 = b2 = 0.95`, `f = 10`; the repository uses
  `b1 = 0.9`, `f = 2`); the eigenbasis is recomputed by `eigh`, not by the
  reference's one QR power-iteration step (exact, and `v` needs no
  re-sorting); the first step is an update, not only an initialization; with
  `start_preconditioning_step` beyond the run the basis stays the identity
  and SOAP is exactly AdamW.

  A limit of the method, not of this implementation: while a factor's
  statistic is rank-deficient (fewer gradients seen than its dimension, or
  gradients of low rank), its zero eigenvalue is repeated and `eigh` may
  return any basis of that eigenspace; Adam's per-coordinate normalization is
  not invariant to that choice, so the update there depends on round-off. A
  float32 rounding of `b2` (as `inject_hyperparams` stores it) then moves a
  rank-1 problem's parameters by about 1e-2 after two steps, where with
  full-rank statistics the runs agree to 1e-6. `start_preconditioning_step`
  at least the largest factor dimension avoids the early steps' case.

  Args:
    learning_rate: a float or an optax schedule.
    b1: EMA rate of the gradient.
    b2: EMA rate of the rotated squared gradient.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay.
    shampoo_beta: EMA rate of the factors (None: `b2`).
    precondition_frequency: steps between eigenbasis refreshes.
    start_preconditioning_step: the first step whose refresh is used.
    block_size: the largest factor dimension.
    merge_dims: merge small adjacent dims.
    precondition_1d: rotate vectors too (one factor).
    matrix_axes: `shape -> (rows, columns)` to choose the matrix axes.
    one_sided: leave unrotated the long axis of a thin block (see `curvopt.shampoo`).
    block_sharding: spread the eigendecompositions over devices (see `curvopt.shampoo`).
    eigenbasis_method: "eigh" (every refresh) or "power_qr" (`eigh` the first
      time, then one power-iteration step and a QR per refresh, `Q <- qr(L Q)`
      with `Q`'s columns ordered by `diag(Q^T L Q)`: the reference's refresh,
      matrix products and a QR that accelerators run faster than `eigh`).
      The default stays "eigh" on every backend until a GPU measurement says
      otherwise; on 2 CPU cores see the README.
    state_dtype: the dtype the state is stored in (None: float32; `jnp.bfloat16`
      halves it); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`.

  Returns:
    An optax `GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> target = jnp.arange(6.0).reshape(2, 3)
    >>> loss = lambda w: jnp.sum((w - target) ** 2)
    >>> params, opt = jnp.zeros((2, 3)), curvopt.soap(0.1, weight_decay=0.0)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(400):
    ...   params, state = step(params, state)
    >>> bool(jnp.allclose(params, target, atol=1e-2))
    True

  References:
    Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade,
    "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025.
  """
  _checks.shared_hyperparameters(
    learning_rate=learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
  )
  _checks.positive("eps", eps, _checks.EPS_IS_A_FLOOR)

  if shampoo_beta is not None:
    _checks.in_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
  return skip_nonfinite(
    refuse_unaffordable_state(
      with_state_dtype(
        optax.chain(
          scale_by_soap(
            b1,
            b2,
            eps,
            shampoo_beta,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            block_size=block_size,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            matrix_axes=matrix_axes,
            one_sided=one_sided,
            block_sharding=block_sharding,
            eigenbasis_method=eigenbasis_method,
          ),
          optax.add_decayed_weights(weight_decay),
          optax.scale_by_learning_rate(learning_rate),
        ),
        state_dtype,
      ),
      "soap",
      MEMORY_HINT,
    )
  )
