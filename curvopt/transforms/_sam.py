"""Sharpness-aware gradients: SAM, ASAM and GAM as transforms that output the gradient to follow."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.transforms._cadence import value_at
from curvopt.transforms._extra_args import require_value_fn

PyTree = Any
Perturbation = Literal["global", "per_group"]
PERTURBATIONS = ("global", "per_group")


class SharpnessAwareState(NamedTuple):
  """State of `sam_gradient`: the step count (for a `rho` schedule)."""

  count: jax.Array


class GradientNormAwareState(NamedTuple):
  """State of `gam_gradient`: the step count (its own type, so checkpoints are not mixed)."""

  count: jax.Array


def _gradient_of(value_fn: Callable, has_aux: bool) -> Callable[[PyTree], PyTree]:
  """`params -> gradient` of the loss; with `has_aux` the auxiliary output is dropped."""
  if has_aux:
    return lambda p: jax.grad(value_fn, has_aux=True)(p)[0]
  return jax.grad(value_fn)


def _normalizer(params: PyTree, adaptive: bool, eta: float) -> PyTree | None:
  """ASAM's `T = |w| + eta` per entry, or None (plain SAM, `T = 1`)."""
  if not adaptive:
    return None
  return jax.tree.map(lambda w: jnp.abs(w) + eta, params)


def _ascent(g: PyTree, radius: jax.Array, scale: PyTree | None, eps: float) -> PyTree:
  """`radius T^2 g / (||T g|| + eps)`, the norm global over every leaf."""
  if scale is None:
    return jax.tree.map(lambda x: radius * x / (_tree.norm(g) + eps), g)
  scaled = jax.tree.map(jnp.multiply, scale, g)
  norm = _tree.norm(scaled)
  return jax.tree.map(lambda t, x: radius * t * x / (norm + eps), scale, scaled)


def _shifted(params: PyTree, delta: PyTree) -> PyTree:
  return jax.tree.map(lambda w, d: (w + d).astype(w.dtype), params, delta)


def sam_gradient(
  rho: optax.ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  eps: float = 1e-12,
  has_aux: bool = False,
  perturbation: Perturbation = "global",
  num_groups: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""The sharpness-aware gradient `grad L(w + e)`, `e` the worst-case step of radius `rho`.

  The input is the gradient `g` of the extra argument `value_fn` at
  `params` (the first pass); the output is

  $$
  e = \rho \frac{T^2 g}{\lVert T g \rVert + \epsilon}, \qquad g_{\text{SAM}} = \nabla L(w + e)
  $$

  with `T = 1` (SAM) or `T = |w| + eta` (ASAM, `adaptive=True`), the norm
  global over all leaves, evaluated by `value_fn` on the same batch. A zero
  gradient gives `e = 0` (optax's SAM divides by zero there). `rho = 0`
  returns the input gradient itself.

  `perturbation="per_group"` is m-sharpness (Foret et al. section 4.1;
  google-sam's default under data parallelism, one perturbation per device):
  the batch is `num_groups` groups, each perturbed along its own gradient,
  and the output is the mean of the groups' perturbed gradients. It needs
  the extra argument `group_value_fn(params, i)`, the loss on group `i`
  (for data-parallel shards: the shard's slice of the batch); the groups'
  first-pass gradients are recomputed, so a step costs three gradients'
  work instead of two. `"global"` (default) perturbs all replicas alike
  with the gradient passed in, which under `jit` is the global mean.

  Args:
    rho: the radius; a float or a schedule of the step.
    adaptive: ASAM's scale-invariant perturbation.
    eta: ASAM's offset in `T = |w| + eta` (the official 0.01).
    eps: added to every normalizing norm.
    has_aux: `value_fn` returns `(loss, aux)`; the second pass's `aux` is
      dropped, so state such as batch statistics is updated by the caller's
      first pass only.
    perturbation: "global" or "per_group" (m-sharpness); see above.
    num_groups: the number of groups for "per_group".

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * w**2)
    >>> w = jnp.array([1.0, 1.0])
    >>> tx = curvopt.transforms.sam_gradient(rho=0.0)
    >>> g, _ = tx.update(jnp.array([1.0, 4.0]), tx.init(w), w, value_fn=loss)
    >>> g
    Array([1., 4.], dtype=float32)

  References:
    Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021; Kwon, Kim, Park, Choi,
    "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021.
  """
  _checks.in_range("rho", rho, 0.0, float("inf"))
  _checks.in_range("eta", eta, 0.0, float("inf"))
  _checks.in_range("eps", eps, 0.0, float("inf"))
  _checks.one_of("perturbation", perturbation, PERTURBATIONS)
  _checks.positive_int("num_groups", num_groups)
  _checks.flag("adaptive", adaptive)
  _checks.flag("has_aux", has_aux)

  def init(params: PyTree) -> SharpnessAwareState:
    del params
    return SharpnessAwareState(jnp.zeros((), jnp.int32))

  def per_group(params, radius, group_value_fn):
    if group_value_fn is None:
      raise TypeError(
        "sam with perturbation='per_group' needs the extra argument "
        "group_value_fn(params, i): the loss on group i of the batch, 0 <= i < num_groups."
      )
    _checks.callable_arg("group_value_fn", group_value_fn)
    scale = _normalizer(params, adaptive, eta)
    total = None
    # Unrolled, not a lax loop: on XLA:CPU a convolution inside a loop loses its fast path.
    for i in range(num_groups):
      grad = _gradient_of(lambda p, i=i: group_value_fn(p, i), has_aux)
      g_i = grad(_shifted(params, _ascent(grad(params), radius, scale, eps)))
      total = g_i if total is None else jax.tree.map(jnp.add, total, g_i)
    return jax.tree.map(lambda x: x / num_groups, total)

  def update(updates, state, params=None, *, value_fn=None, group_value_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("sam needs params in update(updates, state, params, ...).")
    radius = value_at(rho, state.count)
    if perturbation == "per_group":
      perturbed = per_group(params, radius, group_value_fn)
    else:
      value_fn = require_value_fn("sam", value_fn, params, has_aux=has_aux)
      g = _tree.cast_like(updates, _tree.structure_of(params))
      e = _ascent(g, radius, _normalizer(params, adaptive, eta), eps)
      perturbed = _gradient_of(value_fn, has_aux)(_shifted(params, e))
    out = jax.tree.map(
      lambda a, b: jnp.where(radius == 0, a, b), updates, _tree.cast_like(perturbed, updates)
    )
    return out, SharpnessAwareState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def gam_gradient(
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
  r"""Gradient-norm-aware minimization's combined gradient, from four passes on one batch.

  With `g0` the input gradient (of `value_fn` at `params`),

  $$
  g_1 = \nabla L(w + \rho \hat g_0),\;
  d = g_1 - g_0,\;
  w_2 = w + \rho' \hat d,\;
  g_2 = \nabla L(w_2),\;
  g_3 = \nabla L(w_2 + \rho \hat g_2)
  $$

  (`\hat x = x / (||x|| + eps)`; `d` approximates `rho H g0 / ||g0||`, the
  direction in which the gradient norm grows), then `a = b0 g0 + |beta2| g2`
  (`beta2 = 1 - beta0`), `u = beta1 g1 + beta3 g3` (`beta3 = 1 - beta1` by
  default), and the output is `u - gamma a_perp`, `a_perp` the part of `a`
  orthogonal to `u`. The reference code never applies `beta0` to `g0`
  (`b0 = 1`); `apply_beta0=True` uses `b0 = beta0` as the paper writes.
  `adaptive` scales every perturbation ASAM-style by `|w|` (`eta = 0`, as
  the reference).

  Args:
    rho: SAM radius (`grad_rho`); a float or a schedule.
    grad_norm_rho: `rho'` (`grad_norm_rho`), the step along the gradient-norm ascent.
    beta1: weight of `g1`.
    beta3: weight of `g3`.
    beta0: `beta2 = 1 - beta0`.
    gamma: weight of the orthogonal correction.
    apply_beta0: see above.
    adaptive: ASAM-style perturbations.
    eps: added to every normalizing norm.
    has_aux: `value_fn` returns `(loss, aux)`; see `sam_gradient`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> loss = lambda w: 0.5 * jnp.sum(w**2)
    >>> w = jnp.array([3.0, 4.0])
    >>> tx = curvopt.transforms.gam_gradient(rho=0.5, gamma=0.0, beta1=1.0, beta3=0.0)
    >>> g, _ = tx.update(w, tx.init(w), w, value_fn=loss)  # gamma 0, beta1 1: SAM's gradient
    >>> g
    Array([3.3, 4.4], dtype=float32)

  References:
    Zhang, Xu, Cui, Lin, "Gradient Norm Aware Minimization Seeks First-Order
    Flatness and Improves Generalization", CVPR 2023.
  """
  for name, value in (
    ("rho", rho),
    ("grad_norm_rho", grad_norm_rho),
    ("gamma", gamma),
    ("eps", eps),
    ("beta0", beta0),
    ("beta1", beta1),
    *((("beta3", beta3),) if beta3 is not None else ()),
  ):
    _checks.in_range(name, value, 0.0, float("inf"))
  for name, value in (("apply_beta0", apply_beta0), ("adaptive", adaptive), ("has_aux", has_aux)):
    _checks.flag(name, value)

  def init(params: PyTree) -> GradientNormAwareState:
    del params
    return GradientNormAwareState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("gam needs params in update(updates, state, params, ...).")
    value_fn = require_value_fn("gam", value_fn, params, has_aux=has_aux)
    grad = _gradient_of(value_fn, has_aux)
    radius = value_at(rho, state.count)
    scale = _normalizer(params, adaptive, 0.0)
    g0 = _tree.cast_like(updates, _tree.structure_of(params))
    g1 = grad(_shifted(params, _ascent(g0, radius, scale, eps)))
    dgn = jax.tree.map(jnp.subtract, g1, g0)
    w2 = _shifted(params, _ascent(dgn, grad_norm_rho, scale, eps))
    g2 = grad(w2)
    g3 = grad(_shifted(w2, _ascent(g2, radius, scale, eps)))
    b3 = 1.0 - beta1 if beta3 is None else beta3
    b0 = beta0 if apply_beta0 else 1.0
    a = jax.tree.map(lambda x, y: b0 * x + jnp.abs(1.0 - beta0) * y, g0, g2)
    u = jax.tree.map(lambda x, y: beta1 * x + b3 * y, g1, g3)
    norm_a, norm_u = _tree.norm(a), _tree.norm(u)
    cosine = _tree.dot(a, u) / (norm_a * norm_u + eps)
    final = jax.tree.map(
      lambda ui, ai: ui - gamma * (ai - cosine * norm_a * ui / (norm_u + eps)), u, a
    )
    return _tree.cast_like(final, updates), GradientNormAwareState(
      optax.safe_increment(state.count)
    )

  return optax.GradientTransformationExtraArgs(init, update)
