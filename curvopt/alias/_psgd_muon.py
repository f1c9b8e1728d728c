"""PSGD-Muon: Muon's orthogonalized momentum of PSGD-Kron's whitened gradient on hidden matrices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.typing import DTypeLike

from curvopt import _checks
from curvopt.transforms import (
  MUON_NS_COEFFS,
  Geometry,
  ema_momentum,
  matrix_leaves,
  multi_transform,
  orthogonalize,
  refuse_unaffordable_state,
  scale_by_psgd_kron,
  skip_nonfinite,
  with_float32_statistics,
  with_state_dtype,
)

PyTree = Any


def psgd_muon(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  weight_decay: float = 0.0,
  *,
  matrices: PyTree | Callable[[PyTree], PyTree] | None = None,
  update_rms: float = 0.2,
  ns_steps: int = 5,
  ns_coeffs: tuple[float, float, float] = MUON_NS_COEFFS,
  adam_b1: float = 0.9,
  adam_b2: float = 0.999,
  adam_eps: float = 1e-8,
  lr_preconditioner: optax.ScalarOrSchedule = 0.1,
  update_probability: optax.ScalarOrSchedule | None = None,
  max_size: int | None = None,
  max_skew: float = 1.0,
  geometry: Geometry = "Q0.5EQ1.5",
  seed: int = 0,
  state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""PSGD-Muon: on hidden matrices, Muon's step on PSGD-Kron's whitened gradient.

  For each leaf that `matrices` marks (a hidden weight matrix, or a
  convolution kernel read as `(h w in, out)`):
  $$
  h = P g, \quad m \leftarrow b_1 m + (1 - b_1) h, \quad
  u = \mathrm{polar}\big(b_1 m + (1 - b_1) h\big)\, \rho \sqrt{\max(m, n)}
  $$
  with `P = Q^T Q` PSGD-Kron's Kronecker preconditioner fitted to whiten the
  gradients (`curvopt.psgd_kron`'s `fit="whitening"`, its update probability
  annealed from 1 to 0.03 after 500 steps), Nesterov momentum, and `polar`
  by `ns_steps` Newton-Schulz iterations (`curvopt.transforms.orthogonalize`,
  `rho = update_rms`); then decoupled weight decay and the learning rate.
  Every other leaf (embeddings, the output head, norms, biases, when
  `matrices` says so) gets AdamW with Nesterov momentum at the same learning
  rate and weight decay, as optax's Muon does; with `update_rms = 0.2` both
  groups take steps of AdamW's typical RMS, so one learning rate serves both
  (Liu et al. 2025).

  Muon orthogonalizes the raw momentum; orthogonalizing after a whitening
  preconditioner first rescales the gradient's row and column spaces by the
  long-run statistics PSGD fits. On the shipped GPT (`gpt_lm` small) it reached
  a lower loss than tuned Muon in the same steps: see the choosing guide and
  `benchmarks/results/lm_contest/`.

  Args:
    learning_rate: a float or an optax schedule (both groups).
    b1: momentum of the matrix group (an EMA of `P g`, with Nesterov's look-ahead).
    weight_decay: decoupled weight decay (both groups).
    matrices: which leaves are matrices for the orthogonalized step: a pytree of
      booleans like the parameters, or a function of the parameters returning
      one. None: every leaf with two or more axes (`curvopt.transforms.matrix_leaves`).
      Pass a mask that leaves embeddings and the output head to AdamW, as Muon's
      authors do.
    update_rms: the RMS of an orthogonalized update's entries.
    ns_steps: Newton-Schulz iterations.
    ns_coeffs: the iteration's coefficients (Muon's quintic by default).
    adam_b1: AdamW's momentum for the other leaves.
    adam_b2: AdamW's second-moment rate for the other leaves.
    adam_eps: AdamW's epsilon.
    lr_preconditioner: PSGD's preconditioner step `mu`; see `curvopt.psgd_kron`.
    update_probability: PSGD's fitting probability; see `curvopt.psgd_kron`.
    max_size: PSGD's largest dense factor; see `curvopt.psgd_kron`.
    max_skew: PSGD's dense-factor rule; see `curvopt.psgd_kron`.
    geometry: PSGD's Lie-group geometry; see `curvopt.psgd_kron`.
    seed: PSGD's probe seed. With `optax.inject_hyperparams`, pass `matrices`,
      `ns_steps`, `ns_coeffs`, `max_size`, `max_skew`, `geometry` and `seed` as
      `static_args`.
    state_dtype: the dtype the state is stored in (None: float32; `jnp.bfloat16`
      halves it); every step computes in float32. See
      `curvopt.transforms.with_state_dtype`.

  Returns:
    An optax `GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> target = {"w": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.ones(3)}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
    >>> params = jax.tree.map(jnp.zeros_like, target)
    >>> opt = curvopt.psgd_muon(optax.cosine_decay_schedule(0.1, 300))
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-3)
    True

  References:
    Li, "Preconditioner on Matrix Lie Group for SGD", ICLR 2019; Jordan, Jin,
    Boza, You, Cesista, Newhouse, Bernstein, "Muon: an optimizer for hidden
    layers in neural networks", 2024; Liu et al., "Muon is scalable for LLM
    training", 2025.
  """
  _checks.shared_hyperparameters(learning_rate=learning_rate, b1=b1, weight_decay=weight_decay)
  _checks.in_range("adam_b1", adam_b1, 0.0, 1.0)
  _checks.in_range("adam_b2", adam_b2, 0.0, 1.0)
  _checks.in_range("adam_eps", adam_eps, 0.0, float("inf"))
  matrix_step = optax.chain(
    scale_by_psgd_kron(
      "whitening",
      lr_preconditioner,
      update_probability,
      None,
      max_size=max_size,
      max_skew=max_skew,
      geometry=geometry,
      seed=seed,
    ),
    ema_momentum(b1, nesterov=True),
    orthogonalize(ns_steps, update_rms, ns_coeffs),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  adam_step = with_float32_statistics(
    optax.adamw(learning_rate, adam_b1, adam_b2, adam_eps, weight_decay=weight_decay, nesterov=True)
  )
  if matrices is None:
    matrices = matrix_leaves

  def labels(params: PyTree) -> PyTree:
    mask = matrices(params) if callable(matrices) else matrices
    if jax.tree.structure(mask) != jax.tree.structure(params):
      raise ValueError(
        "matrices must be a pytree of booleans like the parameters (or a function "
        f"returning one).\n  params:   {jax.tree.structure(params)}\n"
        f"  matrices: {jax.tree.structure(mask)}"
      )
    return jax.tree.map(lambda is_matrix: "matrix" if is_matrix else "adam", mask)

  return skip_nonfinite(
    refuse_unaffordable_state(
      with_state_dtype(
        multi_transform({"matrix": matrix_step, "adam": adam_step}, labels), state_dtype
      ),
      "psgd_muon",
      "Lower max_skew (1 keeps every dense Kronecker factor within its matrix's size) or set "
      "max_size.",
    )
  )
