"""SAM, ASAM and GAM: a base optimizer fed a sharpness-aware gradient, in one `update` call."""

from __future__ import annotations

import optax

from curvopt.transforms import Perturbation, gam_gradient, sam_gradient, skip_nonfinite


def sam(
  base_optimizer: optax.GradientTransformation,
  rho: optax.ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  eps: float = 1e-12,
  has_aux: bool = False,
  perturbation: Perturbation = "global",
  num_groups: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-aware minimization: `base_optimizer` applied to `grad L(w + e)` (ASAM: `adaptive`).

  `optax.chain(sam_gradient(...), base_optimizer)`: one `update(grads,
  state, params, value_fn=...)` computes the perturbed gradient from
  `value_fn` on the same batch (one extra gradient evaluation) and passes it
  to the base optimizer, whose state is the only other state. Extra
  arguments reach the base optimizer too.

  Decisions where the references differ:
    - `eps = 1e-12` in the normalization (google-sam has none and returns
      NaN for a zero gradient; davda54 1e-12, ASAM 1e-16).
    - ASAM's `T = |w| + eta` with the official `eta = 0.01`, on every
      parameter (the official code exempts parameters not named "weight";
      names are not visible to an optax transform: mask with
      `optax.masked`/`optax.partition` if needed). Its `rho` is larger: the
      official default is 0.5.
    - Weight decay belongs to the base optimizer (davda54), which sees the
      perturbed gradient; an L2 term inside `value_fn` (google-sam) also works.
    - Under data parallelism the choice is named:
      `perturbation="global"` (default; davda54's DDP behaviour) perturbs
      with the gradient passed in, which under `jit` with a sharded batch is
      already the global mean; `perturbation="per_group"` with `num_groups`
      and the extra argument `group_value_fn(params, i)` gives every group
      (a shard) its own perturbation, m-sharpness as in google-sam.

  Models with state (batch statistics): compute the first pass in your
  step with the state updated, and pass a `value_fn` that uses the updated
  statistics without mutating them (flax: `use_running_average=True` or
  `mutable=False`), or one returning `(loss, new_state)` with
  `has_aux=True`: SAM drops the second pass's `aux`.

  The other arguments (`adaptive`, `eta`, `eps`, `has_aux`, `perturbation`,
  `num_groups`) are those of `curvopt.transforms.sam_gradient`, which documents them.

  Args:
    base_optimizer: any optax transform (its extra arguments are forwarded).
    rho: the radius; a float or a schedule.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> params, opt = jnp.zeros(3), curvopt.sam(optax.sgd(0.1), rho=0.05)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(jnp.allclose(params, 1.0, atol=1e-2))  # SAM settles within about rho
    True

  References:
    Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021; Kwon, Kim, Park, Choi,
    "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021.
  """
  _require_base_optimizer("sam", base_optimizer)
  return skip_nonfinite(
    optax.chain(
      sam_gradient(
        rho,
        adaptive=adaptive,
        eta=eta,
        eps=eps,
        has_aux=has_aux,
        perturbation=perturbation,
        num_groups=num_groups,
      ),
      base_optimizer,
    )
  )


def gam(
  base_optimizer: optax.GradientTransformation,
  rho: optax.ScalarOrSchedule = 0.03,
  grad_norm_rho: float = 0.2,
  beta1: float = 0.1,
  beta3: float | None = None,
  beta0: float = 0.1,
  gamma: float = 0.05,
  *,
  apply_beta0: bool = False,
  adaptive: bool = False,
  eps: float = 1e-12,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Gradient-norm-aware minimization: `base_optimizer` applied to GAM's combined gradient.

  `optax.chain(gam_gradient(...), base_optimizer)`: three extra gradient
  evaluations of `value_fn` on the same batch per step. Defaults are the
  reference's CIFAR-10 ResNet row (`rho` 0.03, `grad_norm_rho` 0.2,
  `beta0 = beta1 = 0.1`, `gamma` 0.05).

  Decision where the references differ: the reference computes `beta2 = 1 -
  beta0` but never applies `beta0` to `g0`; `apply_beta0=False` reproduces
  it, `True` follows the paper.

  The other arguments (`rho`, `grad_norm_rho`, `beta1`, `beta3`, `beta0`, `gamma`,
  `apply_beta0`, `adaptive`, `eps`, `has_aux`) are those of
  `curvopt.transforms.gam_gradient`, which documents them.

  Args:
    base_optimizer: any optax transform.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> params, opt = jnp.zeros(3), curvopt.gam(optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(jnp.allclose(params, 1.0, atol=3e-2))  # GAM's perturbations leave a small offset too
    True

  References:
    Zhang, Xu, Cui, Lin, "Gradient Norm Aware Minimization Seeks First-Order
    Flatness and Improves Generalization", CVPR 2023.
  """
  _require_base_optimizer("gam", base_optimizer)
  return skip_nonfinite(
    optax.chain(
      gam_gradient(
        rho,
        grad_norm_rho,
        beta1,
        beta3,
        beta0,
        gamma,
        apply_beta0=apply_beta0,
        adaptive=adaptive,
        eps=eps,
        has_aux=has_aux,
      ),
      base_optimizer,
    )
  )


def _require_base_optimizer(name: str, base_optimizer) -> None:
  if not (hasattr(base_optimizer, "init") and hasattr(base_optimizer, "update")):
    raise TypeError(
      f"{name}'s first argument is the base optax optimizer it wraps, such as "
      f"{name}(optax.sgd(0.1, momentum=0.9), rho=0.05); got {base_optimizer!r}."
    )
