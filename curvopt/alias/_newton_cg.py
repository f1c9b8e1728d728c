"""Hessian-free Newton with truncated conjugate gradients (Martens 2010)."""

from __future__ import annotations

import optax

from curvopt import _checks
from curvopt.transforms import Curvature, levenberg_marquardt, scale_by_newton_cg, skip_nonfinite


def newton_cg(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  damping: float = 1.0,
  *,
  curvature: Curvature = "gauss_newton",
  adaptive_damping: bool = True,
  max_cg_iters: int = 50,
  cg_tol: float = 1e-4,
  warm_start: float = 0.95,
  backtracking: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Hessian-free Newton: a truncated-CG step on the damped curvature, damping by the gain ratio.

  Each step solves `(B + \lambda I) x = -g` by conjugate gradients (see
  `curvopt.transforms.scale_by_newton_cg`: warm start, CG-backtracking,
  negative-curvature exit for the Hessian) and moves `learning_rate * x`.
  With `curvature="gauss_newton"` (extra arguments `model_fn`, `loss_fn`) and
  `adaptive_damping`, `\lambda` follows Martens' Levenberg-Marquardt rule on
  the gain ratio `rho` of the damped Gauss-Newton model: `rho < 1/4`:
  `\lambda *= 3/2`; `rho > 3/4`: `\lambda *= 2/3` (`levenberg_marquardt`;
  steps that make the loss non-finite are rejected, others are taken as
  Martens does). With `curvature="hessian"` (extra argument `value_fn`) the
  damping is fixed.

  Args:
    learning_rate: scales the CG step (1: the Newton step).
    damping: the (initial) `lambda`.
    curvature: "gauss_newton" or "hessian".
    adaptive_damping: adapt `lambda` from the gain ratio (Gauss-Newton only).
    max_cg_iters: operator products per step at most.
    cg_tol: CG's relative residual tolerance.
    warm_start: the fraction of the previous solution CG starts from.
    backtracking: choose the best stored CG iterate by the batch loss.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, curvopt
    >>> x, y = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]), jnp.array([1.0, 2.0, 2.0])
    >>> model_fn, loss_fn = (lambda w: x @ w), (lambda f: 0.5 * jnp.sum((f - y) ** 2))
    >>> opt = curvopt.newton_cg(damping=1e-6)
    >>> w = jnp.zeros(2)
    >>> grads = jax.grad(lambda w: loss_fn(model_fn(w)))(w)
    >>> u, _ = opt.update(grads, opt.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
    >>> (w + u).round(3)  # least squares in one step
    Array([1., 1.], dtype=float32)

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010;
    Martens and Sutskever, "Training deep and recurrent networks with
    Hessian-free optimization", 2012.
  """
  _checks.shared_hyperparameters(learning_rate=learning_rate)
  _checks.one_of("curvature", curvature, ("gauss_newton", "hessian"))
  _checks.flag("adaptive_damping", adaptive_damping)
  _checks.in_range("damping", damping, 0.0, float("inf"))
  if adaptive_damping and curvature == "hessian":
    raise ValueError(
      "newton_cg: adaptive_damping needs curvature='gauss_newton' (the gain ratio uses the "
      "Gauss-Newton model); pass adaptive_damping=False for a fixed damping with the Hessian."
    )

  def steps(damping_or_none):
    return optax.chain(
      scale_by_newton_cg(
        damping_or_none,
        curvature=curvature,
        max_cg_iters=max_cg_iters,
        cg_tol=cg_tol,
        warm_start=warm_start,
        backtracking=backtracking,
      ),
      optax.scale_by_learning_rate(learning_rate),
    )

  if not adaptive_damping:
    return skip_nonfinite(steps(damping))
  _checks.positive("damping", damping, " (the adaptive rule multiplies it)")
  inner = steps(None)  # the damping arrives from levenberg_marquardt
  return skip_nonfinite(
    levenberg_marquardt(
      inner,
      damping,
      increase=1.5,
      decrease=2.0 / 3.0,
      low=0.25,
      high=0.75,
      reject_below=None,
      name="newton_cg",
    )
  )
