"""Shampoo (Gupta et al. 2018), with the practice of Anil et al. 2020 and Meta's Shampoo."""

from __future__ import annotations

import jax
import optax
from jax.typing import DTypeLike

from curvopt import _checks
from curvopt._matrix_roots import RootMethod
from curvopt.transforms import (
  Grafting,
  MatrixAxes,
  ema_momentum,
  refuse_unaffordable_state,
  scale_by_shampoo,
  skip_nonfinite,
  with_state_dtype,
)

# What lowers a Kronecker state that `refuse_unaffordable_state` refuses.
MEMORY_HINT = (
  "Lower block_size (a vector block of b entries holds b x b factors), leave vectors to the "
  "grafted/Adam step (precondition_1d=False), or keep one_sided=True for thin matrices."
)


def shampoo(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  beta2: float = 1.0,
  epsilon: float = 1e-6,
  weight_decay: float = 0.0,
  *,
  block_size: int = 1024,
  precondition_frequency: int = 10,
  start_preconditioning_step: int | None = None,
  nesterov: bool = False,
  relative_epsilon: bool = True,
  root_method: RootMethod = "eigh",
  exponent_override: int | None = None,
  rank_rtol: float | None = None,
  grafting: Grafting | optax.GradientTransformation | None = "adam",
  grafting_b2: float = 0.999,
  grafting_eps: float = 1e-8,
  merge_dims: bool = True,
  precondition_1d: bool = False,
  matrix_axes: MatrixAxes | None = None,
  one_sided: bool = True,
  block_sharding: jax.sharding.NamedSharding | None = None,
  state_dtype: DTypeLike | None = None,
  statistics_dtype: DTypeLike | None = None,
  root_dtype: DTypeLike | None = None,
  packed_statistics: bool | None = None,
) -> optax.GradientTransformation:
  r"""Shampoo: each block of each tensor preconditioned by inverse roots of its Kronecker factors.

  For a block `G` with axes `1..k` (a matrix: `k = 2`), every step

  $$
  S_i \leftarrow \beta_2 S_i + w\, G_{(i)} G_{(i)}^\top, \qquad
  \tilde G = G \times_1 P_1 \cdots \times_k P_k, \qquad
  P_i = (S_i + \epsilon_i I)^{-1/(2k)}
  $$

  (`w = 1` when `beta2 = 1`, the AdaGrad-style sum; else `1 - beta2`, and
  the EMA is debiased before the root), with the roots `P_i` recomputed
  only every `precondition_frequency` steps. `\tilde G` is then rescaled,
  block by block, to the norm of the grafting optimizer's direction
  (per-layer step sizes from a diagonal method), and before
  `start_preconditioning_step` the graft's direction is used as is. Last come
  momentum (an EMA, `m = b1 m + (1 - b1) u`, optionally Nesterov), decoupled
  weight decay and the learning rate.

  Layout. Size-1 dims are dropped; adjacent dims merge while their product
  stays <= `block_size` (the last dim stays apart, so a conv kernel
  `(3, 3, 16, 32)` is a `(144, 32)` matrix); every dim longer than
  `block_size` is cut into blocks. Blocks of equal shape, from all leaves,
  are stacked: their statistics, roots and products are one batched call,
  so the compiled step grows with the number of distinct block shapes, not
  with depth. An axis whose factor would hold more numbers than its block
  (`d^2 > block size`: the long side of a thin block, such as a `(1280, 10)`
  classifier head) gets no factor when `one_sided` (the default), and the
  exponent counts the factored axes only: the head is preconditioned by
  `R^(-1/2)` on its 10 x 10 side. Vectors and scalars follow the graft alone, unless
  `precondition_1d` (one factor, `p = 2`). `matrix_axes(shape) -> (rows,
  columns)` (or None for the default) chooses the matrix axes of a leaf
  yourself: the leaf becomes a `(prod rows, prod columns)` matrix and the
  other axes a batch of independent blocks.

  Decisions where the references differ:
    - `beta2 = 1` (sum, Gupta et al. and Meta) by default; an EMA with `beta2 < 1`
      (Anil et al. use 0.999) is debiased as Meta does.
    - `epsilon` is relative to each factor's largest eigenvalue (Anil et al.)
      with eigh too (Meta uses an absolute 1e-12): float32 eigenvalues carry
      errors near `1e-7 lambda_max`, and an absolute 1e-12 would amplify those
      round-off directions a millionfold; relative damping is also invariant
      to the scale of the loss. `relative_epsilon=False` gives Meta's form.
    - Statistics start at zero (Meta), not `epsilon I`.
    - Momentum follows preconditioning and grafting (Anil et al.), as an EMA,
      so learning rates are on Adam's scale.
    - Grafting is per block (Meta), by bias-corrected RMSProp ("adam") by default.

  Robustness. A root that is not finite, or whose residual exceeds 0.1
  (the coupled Newton iteration's `max |M - I|`), is rejected: the previous
  root is kept and `failures` in the state counts it. Non-finite statistics
  are restarted from zero at the next refresh.

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum (EMA) rate; 0 for none.
    beta2: statistics decay; 1.0 sums them.
    epsilon: damping of each factor (relative to its largest eigenvalue by default).
    weight_decay: decoupled weight decay.
    block_size: the largest factor dimension (Meta's `max_preconditioner_dim`).
    precondition_frequency: steps between root refreshes (the first at step 0).
    start_preconditioning_step: steps that use the graft alone; defaults to
      `precondition_frequency`.
    nesterov: Nesterov momentum.
    relative_epsilon: see above.
    root_method: "eigh" (default) or "newton" (coupled Newton, matmul-only).
    exponent_override: use `(S + eps)^(-1/p)` with this `p` for every factor
      instead of `2k` (2 gives full-matrix AdaGrad's exponent on a matrix).
    rank_rtol: a truncated pseudo-inverse root: eigenvalues below
      `rank_rtol * lambda_max` are dropped ("eigh" only).
    grafting: "adam", "rmsprop", "adagrad", "sgd", any optax transform, or None.
    grafting_b2: second-moment decay of "adam"/"rmsprop" grafting.
    grafting_eps: epsilon of the grafting optimizer.
    merge_dims: merge small adjacent dims (see above).
    precondition_1d: precondition vectors with one factor.
    one_sided: see above; False gives every axis a factor.
    block_sharding: a `NamedSharding` over the leading axis of the stacked
      factors, e.g. `NamedSharding(mesh, PartitionSpec("data"))`: the root
      computations are spread over those devices (each stack padded with
      identity factors to a multiple of the shards) instead of repeated on
      every device. None: XLA's choice (with replicated parameters,
      every device computes every root).
    matrix_axes: see above. With `optax.inject_hyperparams`, pass the
      integer, boolean, string and function arguments as `static_args`.
    state_dtype: the dtype the momentum, the graft's moments and the inverse
      roots are stored in (None: float32); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`. With `jnp.bfloat16`, the state
      takes 50% of its float32 bytes on the runner's GPT and ResNet (the
      float32 statistics packed, see `packed_statistics`), and
      the final loss of a small GPT moves by +0.2% (3 seeds).
    statistics_dtype: the dtype the Kronecker statistics are stored in (None:
      as computed, float32, whatever `state_dtype`). The inverse roots raise
      their eigenvalues to `-1/(2k)`, so the smallest matter; bfloat16 entries
      err by `2^-9` of the largest and blur every eigenvalue below that:
      `jnp.bfloat16` stores them low as well (the whole state halved), at a
      measured 3.1% higher final loss on the small GPT (3.3% with `beta2 = 0.999`).
    root_dtype: the dtype the inverse roots are stored in (None: `state_dtype`).
    packed_statistics: store each symmetric statistic as its upper triangle
      (LAPACK's packed storage): float32 statistics in the bytes of bfloat16
      ones at float32's precision (the updates agree to rounding), for one
      gather a step and one at each refresh.
      None: packed exactly when `state_dtype` is given (a stored dtype is a
      request for fewer bytes).

  Returns:
    An optax `GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> target = jnp.arange(6.0).reshape(2, 3)
    >>> loss = lambda w: jnp.sum((w - target) ** 2)
    >>> params, opt = jnp.zeros((2, 3)), curvopt.shampoo(0.1)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(jnp.allclose(params, target, atol=1e-2))
    True

  References:
    Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor
    Optimization", ICML 2018; Anil, Gupta, Koren, Regan, Singer, "Scalable
    Second Order Optimization for Deep Learning", 2020; Shi et al., "A
    Distributed Data-Parallel PyTorch Implementation of the Distributed
    Shampoo Optimizer for Training Neural Networks At-Scale", 2023.
  """
  _checks.shared_hyperparameters(learning_rate=learning_rate, b1=b1, weight_decay=weight_decay)
  # The statistics stay as computed unless asked otherwise; the roots follow state_dtype.
  field_dtypes = {"statistics": None}
  if packed_statistics is None:
    packed_statistics = state_dtype is not None
  if statistics_dtype is not None:
    field_dtypes["statistics"] = _checks.floating_dtype("statistics_dtype", statistics_dtype)
  if root_dtype is not None:
    field_dtypes["roots"] = _checks.floating_dtype("root_dtype", root_dtype)
  return skip_nonfinite(
    refuse_unaffordable_state(
      with_state_dtype(
        optax.chain(
          scale_by_shampoo(
            block_size,
            beta2,
            epsilon,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            relative_epsilon=relative_epsilon,
            root_method=root_method,
            exponent_override=exponent_override,
            rank_rtol=rank_rtol,
            grafting=grafting,
            grafting_b2=grafting_b2,
            grafting_eps=grafting_eps,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            matrix_axes=matrix_axes,
            one_sided=one_sided,
            block_sharding=block_sharding,
            packed_statistics=packed_statistics,
          ),
          ema_momentum(b1, nesterov),
          optax.add_decayed_weights(weight_decay),
          optax.scale_by_learning_rate(learning_rate),
        ),
        state_dtype,
        field_dtypes=field_dtypes,
      ),
      "shampoo",
      MEMORY_HINT,
    )
  )
