"""PSGD's shared driver: when to fit the preconditioner, on what, and applying it.

A preconditioner family (Kronecker factors, low rank plus diagonal, dense)
supplies `init`, `rescale`, `fit` and `apply` on its own view of the
parameters; this module owns the rest: the PRNG key and the coin flip that
decides each step whether to fit, the probe pair `(v, h)` (a Hessian-vector
product for Newton-type fitting, the gradient for whitening), damping, the
initial scale derived from the first pair, and the step-size schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree
from curvopt.oracles import hvp, random_vector
from curvopt.oracles._probes import counter_uniform
from curvopt.transforms._cadence import refresh_when, value_at
from curvopt.transforms._extra_args import require_value_fn
from curvopt.transforms.psgd._grouping import group_indices, map_grouped

PyTree = Any
Fit = Literal["whitening", "newton"]
FITS = ("whitening", "newton")


class FitSettings(NamedTuple):
  """What every family's fit is built with: the bound's decay and the fitting criterion."""

  beta_l: float
  whitening: bool


class PreconditionerFamily(Protocol):
  """What a PSGD preconditioner form supplies to the driver (`scale_by_psgd`).

  `view(tree) -> x` and `unview(x, like) -> tree` map parameter-shaped trees
  to the family's own arrays (the leaves for Kronecker factors, the flattened
  vector for dense and low-rank forms). On `x`: `init(x, key) -> state` (the
  preconditioner `I`), `rescale(state, scales)` (one scale per array of `x`:
  `Q <- s Q`), `fit(state, v, h, step, coin) -> state` (one Lie-group step of
  the fitting criterion with step size `step`; `coin` is a fresh uniform draw
  in [0, 1) for families that randomize a step, as low rank alternates `U`
  and `V`), `apply(state, g) -> P g`.
  """

  def view(self, tree: PyTree) -> list[jax.Array]: ...
  def unview(self, x: list[jax.Array], like: PyTree) -> PyTree: ...
  def init(self, x: list[jax.Array], key: jax.Array) -> Any: ...
  def rescale(self, state: Any, scales: list) -> Any: ...
  def fit(
    self, state: Any, v: list[jax.Array], h: list[jax.Array], step: Any, coin: jax.Array
  ) -> Any: ...
  def apply(self, state: Any, g: list[jax.Array]) -> list[jax.Array]: ...


class Family(NamedTuple):
  """A `PreconditionerFamily` from its six functions."""

  view: Callable[[PyTree], list[jax.Array]]
  unview: Callable[[list[jax.Array], PyTree], PyTree]
  init: Callable[[list[jax.Array], jax.Array], Any]
  rescale: Callable[[Any, list], Any]
  fit: Callable[..., Any]
  apply: Callable[[Any, list[jax.Array]], list[jax.Array]]


class ScaleByPSGDState(NamedTuple):
  """State of the `scale_by_psgd_*` transforms.

  Attributes:
    count: steps so far.
    key: the PRNG key every probe and coin flip of step `t` derives from (fixed;
      draws are counter-based on `t`, so identical on every replica).
    fits: how many steps fitted the preconditioner.
    preconditioner: the family's state (factors of `Q`, Lipschitz estimates).
  """

  count: jax.Array
  key: jax.Array
  fits: jax.Array
  preconditioner: Any


class ScaleByPSGDNewtonState(ScaleByPSGDState):
  """`ScaleByPSGDState` of a preconditioner fitted to Hessian products (`fit="newton"`).

  Its own type, so a checkpoint of one fit is not restored into the other
  (whose `Q` means something else).
  """


def psgd_update_probability(
  max_probability: float = 1.0,
  min_probability: float = 0.03,
  decay: float = 0.001,
  flat_steps: int = 500,
) -> optax.Schedule:
  """The common preconditioner-update schedule: flat, then decaying exponentially to a floor.

  `p(t) = clip(max_probability * exp(-decay * (t - flat_steps)), min_probability,
  max_probability)`. The defaults are psgd_jax's: 1 for 500 steps, 0.03 from about
  step 4000.

  Examples:
    >>> import curvopt
    >>> p = curvopt.transforms.psgd_update_probability()
    >>> round(float(p(0)), 3), round(float(p(1500)), 3), round(float(p(10_000)), 3)
    (1.0, 0.368, 0.03)

  References:
    Li, "Preconditioned Stochastic Gradient Descent", 2015; psgd_jax's
    `precond_update_prob_schedule`.
  """
  _checks.in_range("max_probability", max_probability, 0.0, 1.0, high_inclusive=True)
  _checks.in_range("min_probability", min_probability, 0.0, 1.0, high_inclusive=True)
  _checks.in_range("decay", decay, 0.0, float("inf"))

  def schedule(count):
    p = max_probability * jnp.exp(-decay * (jnp.asarray(count, jnp.float32) - flat_steps))
    return jnp.clip(p, min_probability, max_probability)

  return schedule


def initial_scales(v: PyTree, h: PyTree, whitening: bool) -> list[jax.Array]:
  """The scale `s` of the first `Q = s I`, one per leaf, from the first probe pair.

  Whitening: `s = mean(g^4)^(-1/8)` per leaf, so `P = s^2 I` maps the gradient
  to unit RMS. Newton: one `s = mean(v^2)^(1/4) max_leaf mean(h^4)^(-1/8)` for
  all leaves (psgd_torch), since the Hessian couples them. A zero `h` gives 1.
  """
  leaves_h = jax.tree.leaves(h)
  # One program per leaf shape (a transformer's 21 leaves have 7): leaf by leaf,
  # these statistics were 147 of PSGD-Kron's 1,047 kernels on gpt_lm small.
  groups = group_indices([(x.shape, x.dtype) for x in leaves_h])
  inverse_roots = map_grouped(lambda i: _inverse_eighth_root_of_mean_fourth_power, groups, leaves_h)
  if whitening:
    return inverse_roots
  leaves_v = jax.tree.leaves(v)
  mean_square = _tree.dot(leaves_v, leaves_v) / _tree.size_of(leaves_v)
  shared = jnp.min(jnp.stack(inverse_roots)) * mean_square**0.25
  return [shared] * len(leaves_h)


def _inverse_eighth_root_of_mean_fourth_power(x: jax.Array) -> jax.Array:
  # Factoring out max|x| keeps x^4 from overflowing or underflowing in float32.
  peak = jnp.max(jnp.abs(x))
  safe_peak = jnp.where(peak > 0, peak, 1.0)
  ratio = jnp.mean((x / safe_peak) ** 4)
  root = safe_peak**-0.5 * ratio**-0.125
  return jnp.where((peak > 0) & jnp.isfinite(root), root, 1.0)


def scale_by_psgd(
  family_for: Callable[[PyTree, FitSettings], PreconditionerFamily],
  *,
  fit: Fit,
  lr_preconditioner: optax.ScalarOrSchedule,
  update_probability: optax.ScalarOrSchedule | None,
  init_scale: float | None,
  beta_l: float,
  damping: float,
  seed: int,
  name: str,
) -> optax.GradientTransformationExtraArgs:
  """The PSGD transform around a preconditioner family: output `P g`.

  Each step, with probability `update_probability(t)` (always at step 0),
  `Q` takes one normalized Lie-group step on the fitting criterion
  `E[h^T P h + v^T P^-1 v]`: Newton type, `v ~ N(0, I)` and `h = H v`
  from the extra argument `value_fn` (minimizer `|H|^-1`); whitening,
  `h = g` (minimizer `E[g g^T]^-1/2`). `h` is damped as
  `h + (damping rms(h) + eps |h|) xi` with `xi ~ N(0, I)`, which bounds
  `P <= I / (damping rms(h))` and keeps the fit invariant to the loss scale.
  Then the output is `P g` with the fitted `P`.
  """
  _checks.one_of("fit", fit, FITS)
  _checks.in_range("beta_l", beta_l, 0.0, 1.0)
  _checks.in_range("damping", damping, 0.0, float("inf"))
  if init_scale is not None:
    _checks.in_range("init_scale", init_scale, 0.0, float("inf"))
    if init_scale == 0:
      raise ValueError("init_scale must be positive (Q = init_scale * I is invertible), got 0.")
  if update_probability is None:
    update_probability = psgd_update_probability()
  if not callable(update_probability):
    _checks.in_range("update_probability", update_probability, 0.0, 1.0, high_inclusive=True)
  if not callable(lr_preconditioner):
    _checks.in_range("lr_preconditioner", lr_preconditioner, 0.0, 1.0, high_inclusive=True)
  whitening = fit == "whitening"
  settings = FitSettings(beta_l, whitening)
  state_type = ScaleByPSGDState if whitening else ScaleByPSGDNewtonState
  make_key = _checks.seed("seed", seed)

  def init(params: PyTree) -> ScaleByPSGDState:
    dtype = _tree.working_dtype(_tree.structure_of(params))
    key = make_key()
    zero = jnp.zeros((), jnp.int32)
    if not jax.tree.leaves(params):  # no tensors (map_params' placeholder, a masked-out group)
      # One element, not none: orbax refuses to save zero-size arrays.
      return state_type(zero, key, zero, jnp.zeros((1,), dtype))
    family = family_for(params, settings)
    x = family.view(_tree.zeros(_tree.structure_of(params), dtype))
    preconditioner = family.init(x, key)
    if init_scale is not None:
      preconditioner = family.rescale(
        preconditioner, [jnp.asarray(init_scale, dtype)] * len(jax.tree.leaves(x))
      )
    return state_type(zero, key, zero, preconditioner)

  def update(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    if not jax.tree.leaves(updates):  # every leaf masked out (a group with no tensors)
      return updates, state._replace(count=optax.safe_increment(state.count))
    if not whitening:
      if params is None:
        raise ValueError(
          f"{name} with fit='newton' needs params in update(updates, state, params)."
        )
      value_fn = require_value_fn(name, value_fn, params)
    family = family_for(updates, settings)
    dtype = _tree.working_dtype(_tree.structure_of(updates))
    grads = _tree.cast(updates, dtype)
    count = state.count
    probability = value_at(update_probability, count)
    due = (count == 0) | (counter_uniform(state.key, 3 * count + 2) < probability)

    def fit_preconditioner():
      v = random_vector(state.key, grads, "gaussian", dtype, counter=3 * count)
      if whitening:
        h = grads
      else:
        tangent = _tree.cast_like(v, _tree.structure_of(params))
        h = _tree.cast(hvp(value_fn, params, tangent), dtype)
      xv, xh = family.view(v), family.view(h)
      preconditioner = state.preconditioner
      if init_scale is None:  # from the undamped pair: a zero gradient gives scale 1
        first = family.rescale(preconditioner, initial_scales(xv, xh, whitening))
        preconditioner = jax.tree.map(
          lambda a, b: jnp.where(count == 0, a, b), first, preconditioner
        )
      noise = random_vector(state.key, grads, "gaussian", dtype, counter=3 * count + 1)
      xh = family.view(_damped(h, damping, noise))
      step = value_at(lr_preconditioner, count)
      coin = counter_uniform(jax.random.fold_in(state.key, 2), count)
      return family.fit(preconditioner, xv, xh, step, coin)

    preconditioner = refresh_when(due, fit_preconditioner, lambda: state.preconditioner)
    direction = family.unview(family.apply(preconditioner, family.view(grads)), updates)
    new_state = state_type(
      optax.safe_increment(count),
      state.key,
      state.fits + due.astype(jnp.int32),
      preconditioner,
    )
    return _tree.cast_like(direction, _tree.structure_of(updates)), new_state

  return optax.GradientTransformationExtraArgs(init, update)


def _damped(h: PyTree, damping: float, noise: PyTree) -> PyTree:
  """`h + (damping * rms(h) + eps |h|) xi`: damping relative to the probe's scale.

  psgd_torch adds an absolute `damping * xi`; relative to the RMS of `h` over
  all leaves, the fit is invariant to the loss scale (at gradients ~1e-30 an
  absolute 1e-9 dominated `h`, and the fit's products overflowed float32). An
  all-zero `h` keeps the absolute form, so `P` stays bounded on a flat stretch.
  """
  peak = _tree.max_abs(h)
  safe_peak = jnp.where(peak > 0, peak, 1.0)
  # Scaled by the peak before squaring, so tiny probes do not underflow.
  scaled = jax.tree.map(lambda x: x / safe_peak, h)
  mean_square = _tree.dot(scaled, scaled) / _tree.size_of(h)
  scale = jnp.where(peak > 0, safe_peak * jnp.sqrt(mean_square), 1.0)

  def damp(x, xi):
    eps = jnp.finfo(x.dtype).eps
    return x + (damping * scale.astype(x.dtype) + eps * jnp.abs(x)) * xi

  return jax.tree.map(damp, h, noise)
