"""Optimizers the runner knows by name, with the extra arguments each consumes."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

import curvopt

EXTRA_ARGS = ("value", "grad", "value_fn", "model_fn", "loss_fn")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "warmup_constant")


def learning_rate_schedule(
  peak: float, schedule: str, steps: int, warmup_fraction: float
) -> optax.ScalarOrSchedule:
  """`peak` held constant, or warmed up linearly from 0 and decayed to 0 by `steps`.

  `warmup_cosine` is AlgoPerf's baseline schedule (Dahl et al. 2023, "Benchmarking
  Neural Network Training Algorithms"): linear warmup over `warmup_fraction` of
  the step budget, then cosine decay. `warmup_constant` holds the peak after
  the warmup: what a schedule-free method takes (Defazio et al. 2024).
  """
  if schedule == "constant":
    return peak
  warmup = max(1, round(warmup_fraction * steps)) if warmup_fraction > 0 else 0
  if schedule == "warmup_constant":
    return optax.warmup_constant_schedule(0.0, peak, warmup) if warmup else peak
  decay = max(1, steps - warmup)
  if schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay, end_value=0.0)
  if schedule == "warmup_linear":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, 0.0, decay)], [warmup]
    )
  raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """How to build and call one optimizer.

  Attributes:
    name: registry name.
    description: one line for `curvopt-bench list`.
    factory: `(learning_rate, **hyperparameters) -> GradientTransformation`.
    extra_args: the keyword arguments its `update` needs, from `EXTRA_ARGS`;
      the runner passes exactly these (optax's line searches reject others).
    value_and_grad_from_state: reuse the value and gradient its line search
      already computed (`optax.value_and_grad_from_state`).
    takes_l2: the factory takes `l2_regularization` and `l2_mask`, which the
      runner sets from the workload's penalty (a Gauss-Newton method sees the
      loss on outputs only, so it must be told about the penalty).
    takes_schedule: the learning rate may follow a schedule. Methods whose
      learning rate scales a step chosen by a line search or a Newton model
      (L-BFGS, EGN, lazy Newton) run at a constant rate, and their tables say so.
    default_schedule: the schedule this optimizer runs unless its config table
      names one (None: the benchmark's). Schedule-free AdamW: `warmup_constant`,
      since it replaces the decay by averaging.
    takes_hidden_matrices: the factory takes `hidden_matrices`, the workload's
      mask of hidden weight matrices (Muon's parameter groups).
    eval_params: `(state, params) -> params` to evaluate instead of the
      iterate (schedule-free methods evaluate their average).
  """

  name: str
  description: str
  factory: Callable[..., optax.GradientTransformation]
  extra_args: tuple[str, ...] = ()
  value_and_grad_from_state: bool = False
  takes_l2: bool = False
  takes_schedule: bool = True
  default_schedule: str | None = None
  takes_hidden_matrices: bool = False
  eval_params: Callable[[Any, Any], Any] | None = None

  @property
  def hyperparameters(self) -> dict[str, object]:
    """Keyword arguments a config may set besides the learning rate, with defaults."""
    return {
      name: p.default
      for name, p in inspect.signature(self.factory).parameters.items()
      if name not in ("learning_rate", "l2_regularization", "l2_mask", "hidden_matrices")
    }

  def build(self, learning_rate: float, **hyperparameters) -> optax.GradientTransformation:
    return self.factory(learning_rate=learning_rate, **hyperparameters)


def _sgd(learning_rate: float) -> optax.GradientTransformation:
  return optax.sgd(learning_rate)


def _momentum(learning_rate: float, momentum: float = 0.9, nesterov: bool = False):
  return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


def _adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def _adamw(
  learning_rate: float,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
):
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _nadamw(
  learning_rate: float,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
):
  return optax.nadamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _muon(
  learning_rate: float,
  hidden_matrices: Callable[[Any], Any],
  beta: float = 0.95,
  weight_decay: float = 1e-4,
  adam_lr_ratio: float = 1.0,
  consistent_rms: float = 0.2,
  ns_steps: int = 5,
):
  """`optax.contrib.muon` with Adam on every leaf `hidden_matrices` leaves out.

  `consistent_rms=0.2` scales each orthogonalized update to AdamW's typical RMS
  (Liu et al. 2025, "Muon is scalable for LLM training"), so one learning rate
  serves both groups; with `consistent_rms=0` (Jordan et al. 2024's width
  scaling instead) set the Adam group's rate with `adam_lr_ratio`.
  """

  def dimension_numbers(params):
    def numbers(leaf, hidden):
      if not hidden:
        return None
      ndim = len(leaf.shape)  # the last axis is the output; the others are reduced
      return optax.contrib.MuonDimensionNumbers(tuple(range(ndim - 1)), ndim - 1)

    return jax.tree.map(numbers, params, hidden_matrices(params))

  if callable(learning_rate):
    adam_lr = lambda step: adam_lr_ratio * learning_rate(step)
  else:
    adam_lr = adam_lr_ratio * learning_rate
  return optax.contrib.muon(
    learning_rate,
    ns_steps=ns_steps,
    beta=beta,
    weight_decay=weight_decay,
    adam_weight_decay=weight_decay,
    adam_learning_rate=adam_lr,
    muon_weight_dimension_numbers=dimension_numbers,
    consistent_rms=consistent_rms or None,
  )


def _psgd_muon(
  learning_rate: float,
  hidden_matrices: Callable[[Any], Any],
  b1: float = 0.9,
  weight_decay: float = 1e-4,
  update_rms: float = 0.2,
):
  return curvopt.psgd_muon(
    learning_rate, b1, weight_decay, matrices=hidden_matrices, update_rms=update_rms
  )


def _psgd_muon_annealed(
  learning_rate: float,
  hidden_matrices: Callable[[Any], Any],
  b1: float = 0.9,
  weight_decay: float = 1e-4,
  update_rms: float = 0.2,
  flat_steps: int = 30,
  decay: float = 0.05,
  min_probability: float = 0.05,
):
  # The fit every step for `flat_steps`, then exp(-decay t) down to `min_probability`.
  probability = curvopt.transforms.psgd_update_probability(1.0, min_probability, decay, flat_steps)
  return curvopt.psgd_muon(
    learning_rate,
    b1,
    weight_decay,
    matrices=hidden_matrices,
    update_rms=update_rms,
    update_probability=probability,
  )


def _schedule_free_adamw(
  learning_rate: float,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
):
  # optax's alias takes the warmup as a step count; the runner's schedule carries it.
  return optax.contrib.schedule_free_adamw(
    learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
  )


def _lbfgs(learning_rate: float, memory_size: int = 10):
  # The zoom line search picks the step; the learning rate scales it (1.0: as found).
  return optax.lbfgs(learning_rate, memory_size=memory_size)


def _psgd_kron_newton(
  learning_rate: float,
  b1: float = 0.9,
  weight_decay: float = 0.0,
  update_probability: float | None = None,
  lr_preconditioner: float = 0.1,
):
  return curvopt.psgd_kron(
    learning_rate,
    b1,
    weight_decay,
    fit="newton",
    update_probability=update_probability,
    lr_preconditioner=lr_preconditioner,
  )


def _sam(learning_rate: float, rho: float = 0.05, momentum: float = 0.9):
  return curvopt.sam(optax.sgd(learning_rate, momentum=momentum), rho)


def _asam(learning_rate: float, rho: float = 0.5, eta: float = 0.01, momentum: float = 0.9):
  return curvopt.sam(optax.sgd(learning_rate, momentum=momentum), rho, adaptive=True, eta=eta)


def _gam(
  learning_rate: float,
  rho: float = 0.03,
  grad_norm_rho: float = 0.2,
  gamma: float = 0.05,
  momentum: float = 0.9,
):
  base = optax.sgd(learning_rate, momentum=momentum)
  return curvopt.gam(base, rho, grad_norm_rho, gamma=gamma)


OPTIMIZERS: dict[str, OptimizerSpec] = {
  spec.name: spec
  for spec in (
    OptimizerSpec("sgd", "optax.sgd: plain (stochastic) gradient descent", _sgd),
    OptimizerSpec("momentum", "optax.sgd with heavy-ball momentum 0.9", _momentum),
    OptimizerSpec("adam", "optax.adam (Kingma and Ba 2015)", _adam),
    OptimizerSpec("adamw", "optax.adamw, decoupled weight decay 1e-4", _adamw),
    OptimizerSpec(
      "nadamw",
      "optax.nadamw, Nesterov AdamW (AlgoPerf's baseline; Dozat 2016), weight decay 1e-4",
      _nadamw,
    ),
    OptimizerSpec(
      "muon",
      "optax.contrib.muon on hidden matrices, AdamW on embeddings, head, norms, biases "
      "(Jordan et al. 2024; update RMS 0.2, Liu et al. 2025)",
      _muon,
      takes_hidden_matrices=True,
    ),
    OptimizerSpec(
      "schedule_free_adamw",
      "optax.contrib.schedule_free_adamw, warmup then constant, evaluated at its average "
      "(Defazio et al. 2024)",
      _schedule_free_adamw,
      default_schedule="warmup_constant",
      eval_params=optax.contrib.schedule_free_eval_params,
    ),
    OptimizerSpec(
      "lbfgs",
      "optax.lbfgs with a zoom line search (on the current batch)",
      _lbfgs,
      extra_args=("value", "grad", "value_fn"),
      value_and_grad_from_state=True,
      takes_schedule=False,
    ),
    OptimizerSpec(
      "adahessian",
      "curvopt.adahessian: Adam with a Hutchinson Hessian diagonal (Yao et al. 2021)",
      curvopt.adahessian,
      extra_args=("value_fn",),
    ),
    OptimizerSpec(
      "sophia_h",
      "curvopt.sophia_h: clipped diagonal Newton, Hessian refreshed every 10 steps",
      curvopt.sophia_h,
      extra_args=("value_fn",),
    ),
    OptimizerSpec(
      "shampoo",
      "curvopt.shampoo: Kronecker-factored blocks, roots every 10 steps, Adam grafting",
      curvopt.shampoo,
    ),
    OptimizerSpec(
      "psgd_kron",
      "curvopt.psgd_kron: Kronecker factors fitted to whiten the gradient (PSGD)",
      curvopt.psgd_kron,
    ),
    OptimizerSpec(
      "psgd_kron_newton",
      "curvopt.psgd_kron(fit='newton'): Kronecker factors fitted to Hessian products",
      _psgd_kron_newton,
      extra_args=("value_fn",),
    ),
    OptimizerSpec(
      "psgd_muon",
      "curvopt.psgd_muon: Muon's orthogonalized momentum of PSGD-Kron's whitened gradient on "
      "hidden matrices, AdamW on the rest",
      _psgd_muon,
      takes_hidden_matrices=True,
    ),
    OptimizerSpec(
      "psgd_muon_annealed",
      "curvopt.psgd_muon fitting PSGD on every step for 30 steps, then on 5% (by step 90)",
      _psgd_muon_annealed,
      takes_hidden_matrices=True,
    ),
    OptimizerSpec(
      "psgd_lra",
      "curvopt.psgd_lra: low-rank-plus-diagonal Q fitted to whiten the gradient (PSGD)",
      curvopt.psgd_lra,
    ),
    OptimizerSpec(
      "sam",
      "curvopt.sam around SGD with momentum 0.9 (Foret et al. 2021), rho 0.05",
      _sam,
      extra_args=("value_fn",),
    ),
    OptimizerSpec(
      "asam",
      "curvopt.sam(adaptive=True) around SGD with momentum 0.9 (Kwon et al. 2021), rho 0.5",
      _asam,
      extra_args=("value_fn",),
    ),
    OptimizerSpec(
      "gam",
      "curvopt.gam around SGD with momentum 0.9 (Zhang et al. 2023)",
      _gam,
      extra_args=("value_fn",),
    ),
    OptimizerSpec(
      "egn",
      "curvopt.egn: exact Gauss-Newton in the batch space, fixed damping 0.1, Armijo line search",
      curvopt.egn,
      extra_args=("model_fn", "loss_fn"),
      takes_l2=True,
      takes_schedule=False,
    ),
    OptimizerSpec(
      "egn_lm",
      "curvopt.egn(adaptive_damping=True): Levenberg-Marquardt damping from 1.0",
      functools.partial(curvopt.egn, damping=1.0, adaptive_damping=True),
      extra_args=("model_fn", "loss_fn"),
      takes_l2=True,
      takes_schedule=False,
    ),
    OptimizerSpec(
      "lazy_newton",
      "curvopt.lazy_newton: cubic Newton, one Hessian per d steps (full-batch problems)",
      curvopt.lazy_newton,
      extra_args=("value_fn",),
      takes_schedule=False,
    ),
    OptimizerSpec(
      "mfac",
      "curvopt.mfac: inverse empirical Fisher of the last 32 gradients (Frantar et al. 2021)",
      # A CPU-sized window (the paper's 1024 holds 1024 copies of the gradient).
      functools.partial(curvopt.mfac, num_grads=32, damping=1e-4, momentum=0.9),
    ),
    OptimizerSpec(
      "newton_cg",
      "curvopt.newton_cg: Hessian-free Newton, truncated CG on the damped Gauss-Newton (Martens)",
      functools.partial(curvopt.newton_cg, max_cg_iters=20),
      extra_args=("model_fn", "loss_fn"),
      takes_schedule=False,
    ),
    OptimizerSpec(
      "soap",
      "curvopt.soap: Adam in Shampoo's eigenbasis, refreshed every 10 steps",
      curvopt.soap,
    ),
  )
}


def build_optimizer(
  spec: OptimizerSpec,
  workload,
  learning_rate: optax.ScalarOrSchedule,
  hyperparameters: dict,
) -> optax.GradientTransformation:
  """`spec`'s optimizer, told the workload's L2 penalty when it must see it apart."""
  if spec.takes_l2:
    hyperparameters = {
      **hyperparameters,
      "l2_regularization": workload.l2,
      "l2_mask": workload.l2_mask,
    }
  if spec.takes_hidden_matrices:
    hyperparameters = {**hyperparameters, "hidden_matrices": workload.hidden_matrix_mask}
  return spec.build(learning_rate, **hyperparameters)
