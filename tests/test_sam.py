"""SAM, ASAM and GAM against their formulas on quadratics (spec section 6.5), in float64."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt.transforms import gam_gradient, sam_gradient
from curvopt.transforms._sam import _ascent, _normalizer, _shifted

A = np.diag([1.0, 3.0, 10.0]) + 0.5
B = np.array([1.0, -2.0, 0.5])


def _quadratic(w):
  return 0.5 * w @ jnp.asarray(A) @ w - jnp.asarray(B) @ w


def _grad(w):
  return A @ np.asarray(w) - B


def _base():
  return optax.sgd(0.05, momentum=0.9)


def test_rho_zero_gives_exactly_the_base_optimizer():
  w = jnp.array([0.3, -1.0, 2.0])
  opt, base = curvopt.sam(_base(), rho=0.0), _base()
  state, base_state = opt.init(w), base.init(w)
  for _ in range(5):
    g = jax.grad(_quadratic)(w)
    u, state = opt.update(g, state, w, value_fn=_quadratic)
    ub, base_state = base.update(g, base_state, w)
    chex.assert_trees_all_equal(u, ub)
    w = optax.apply_updates(w, u)
  chex.assert_trees_all_equal(state.inner_state[1], base_state)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_gradient_is_the_gradient_at_the_normalized_ascent_point(rho):
  w = np.array([0.3, -1.0, 2.0])
  g = _grad(w)
  expected = A @ (w + rho * g / np.linalg.norm(g)) - B
  tx = sam_gradient(rho)
  out, _ = tx.update(jnp.asarray(g), tx.init(w), jnp.asarray(w), value_fn=_quadratic)
  np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_asam_gradient_uses_the_scaled_perturbation():
  w = np.array([0.3, -1.0, 2.0])
  g = _grad(w)
  t = np.abs(w) + 0.01
  e = 0.5 * t**2 * g / np.linalg.norm(t * g)
  tx = sam_gradient(0.5, adaptive=True)
  out, _ = tx.update(jnp.asarray(g), tx.init(w), jnp.asarray(w), value_fn=_quadratic)
  np.testing.assert_allclose(out, A @ (w + e) - B, rtol=1e-12)


def test_asam_with_equal_magnitudes_and_zero_eta_is_sam_with_scaled_rho():
  # Spec 6.5 test 4: |w_i| = c for all i gives SAM with rho * c.
  w = jnp.array([2.0, -2.0, 2.0])
  g = jax.grad(_quadratic)(w)
  asam, plain = sam_gradient(0.1, adaptive=True, eta=0.0), sam_gradient(0.2)
  a, _ = asam.update(g, asam.init(w), w, value_fn=_quadratic)
  b, _ = plain.update(g, plain.init(w), w, value_fn=_quadratic)
  np.testing.assert_allclose(a, b, rtol=1e-12)


def test_asam_perturbed_loss_is_invariant_to_rescaling_a_layer():
  # A two-layer linear model f(x) = c * (a @ x): scaling a by s and c by 1/s leaves
  # the function unchanged. ASAM's perturbation (eta = 0) is scale invariant, so
  # the perturbed loss L(w + e) is the same for both parameterizations.
  x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.3]])
  y = jnp.array([1.0, -0.5, 0.7])
  loss = lambda p: jnp.mean((p["c"] * (x @ p["a"]) - y) ** 2)

  def perturbed_loss(p):
    g = jax.grad(loss)(p)
    return loss(_shifted(p, _ascent(g, 0.3, _normalizer(p, True, 0.0), 1e-12)))

  p = {"a": jnp.array([0.4, -0.7]), "c": jnp.array(1.3)}
  s = 3.0
  q = {"a": p["a"] * s, "c": p["c"] / s}
  assert loss(p) == pytest.approx(float(loss(q)), rel=1e-12)
  # Scale invariance holds per parameter group for elementwise T = |w|: the
  # perturbed losses agree.
  np.testing.assert_allclose(perturbed_loss(p), perturbed_loss(q), rtol=1e-10)


def test_linear_loss_is_unaffected_by_the_perturbation():
  a = jnp.array([1.0, -2.0, 3.0])
  loss = lambda w: a @ w
  tx = sam_gradient(0.5)
  w = jnp.zeros(3)
  out, _ = tx.update(a, tx.init(w), w, value_fn=loss)
  np.testing.assert_allclose(out, a, rtol=1e-12)


@pytest.mark.parametrize(
  "make",
  [
    lambda: curvopt.sam(_base()),
    lambda: curvopt.sam(_base(), 0.5, adaptive=True),
    lambda: curvopt.gam(_base()),
  ],
)
def test_zero_gradient_gives_a_finite_update(make):
  opt = make()
  w = jnp.zeros(3)
  flat = lambda p: 0.0 * jnp.sum(p)
  u, _ = opt.update(jax.grad(flat)(w), opt.init(w), w, value_fn=flat)
  assert bool(jnp.all(jnp.isfinite(u)))
  np.testing.assert_array_equal(u, 0.0)


def _normalized(x, eps=1e-12):
  return x / (np.linalg.norm(x) + eps)


@pytest.mark.parametrize("apply_beta0", [False, True])
def test_gam_matches_its_formula_on_a_quadratic(apply_beta0):
  rho, rho2, beta0, beta1, gamma = 0.05, 0.2, 0.3, 0.6, 0.05
  w = np.array([0.3, -1.0, 2.0])
  g0 = _grad(w)
  g1 = _grad(w + rho * _normalized(g0))
  np.testing.assert_allclose(g1 - g0, rho * A @ g0 / np.linalg.norm(g0), rtol=1e-9)  # spec test 6
  w2 = w + rho2 * _normalized(g1 - g0)
  g2 = _grad(w2)
  g3 = _grad(w2 + rho * _normalized(g2))
  a = (beta0 if apply_beta0 else 1.0) * g0 + abs(1 - beta0) * g2
  u = beta1 * g1 + (1 - beta1) * g3
  cosine = a @ u / (np.linalg.norm(a) * np.linalg.norm(u) + 1e-12)
  expected = u - gamma * (a - cosine * np.linalg.norm(a) * u / (np.linalg.norm(u) + 1e-12))
  tx = gam_gradient(rho, rho2, beta1, None, beta0, gamma, apply_beta0=apply_beta0)
  out, _ = tx.update(jnp.asarray(g0), tx.init(w), jnp.asarray(w), value_fn=_quadratic)
  np.testing.assert_allclose(out, expected, rtol=1e-10)


def test_gam_reduces_to_sam_with_gamma_zero_and_beta1_one():
  w = jnp.array([0.3, -1.0, 2.0])
  g = jax.grad(_quadratic)(w)
  gam = gam_gradient(0.1, gamma=0.0, beta1=1.0, beta3=0.0)
  sam = sam_gradient(0.1)
  a, _ = gam.update(g, gam.init(w), w, value_fn=_quadratic)
  b, _ = sam.update(g, sam.init(w), w, value_fn=_quadratic)
  np.testing.assert_allclose(a, b, rtol=1e-12)


def test_matches_optax_contrib_sam_in_opaque_mode_where_the_formulas_coincide():
  # optax's opaque SAM negates its "adversarial" optimizer's update, so a
  # normalized descent step of size rho becomes the ascent; with sync_period=2
  # it takes the base step with the perturbed gradient, as curvopt does in one call.
  rho, eps = 0.05, 1e-12
  w = jnp.array([0.3, -1.0, 2.0])
  ours = curvopt.sam(optax.sgd(0.05), rho=rho, eps=eps)
  adversarial = optax.chain(
    optax.contrib.normalize(),  # g / ||g|| (no epsilon: the gradient here is non-zero)
    optax.scale(-rho),
  )
  theirs = optax.contrib.sam(optax.sgd(0.05), adversarial, sync_period=2, opaque_mode=True)
  ws, wt = w, w
  so, st = ours.init(ws), theirs.init(wt)
  for _ in range(4):
    u, so = ours.update(jax.grad(_quadratic)(ws), so, ws, value_fn=_quadratic)
    ws = optax.apply_updates(ws, u)
    v, st = theirs.update(
      jax.grad(_quadratic)(wt), st, wt, grad_fn=lambda p, _: jax.grad(_quadratic)(p)
    )
    wt = optax.apply_updates(wt, v)
    np.testing.assert_allclose(ws, wt, rtol=1e-9)


def test_has_aux_drops_the_second_pass_state():
  # A "batch statistic" updated by the caller's first pass only.
  stats = {"mean": jnp.zeros(3)}
  x = jnp.array([1.0, 2.0, 3.0])

  def loss_and_stats(w, stats):
    new = {"mean": 0.9 * stats["mean"] + 0.1 * x * w}
    return jnp.sum((w * x - 1.0) ** 2), new

  opt = curvopt.sam(optax.sgd(0.1), rho=0.1, has_aux=True)
  w = jnp.ones(3)
  (_, new_stats), g = jax.value_and_grad(loss_and_stats, has_aux=True)(w, stats)
  u, _ = opt.update(g, opt.init(w), w, value_fn=lambda p: loss_and_stats(p, new_stats))
  # Only the first pass's statistics survive; the update used the perturbed gradient.
  chex.assert_trees_all_close(new_stats, {"mean": 0.1 * x})
  assert not np.allclose(u, -0.1 * g)


def test_rho_schedule_is_followed():
  schedule = optax.linear_schedule(0.0, 0.2, 10)
  tx = sam_gradient(schedule)
  w = jnp.array([0.3, -1.0, 2.0])
  state = tx.init(w)
  g = jax.grad(_quadratic)(w)
  out0, state = tx.update(g, state, w, value_fn=_quadratic)
  np.testing.assert_array_equal(out0, g)  # rho(0) = 0
  out1, _ = tx.update(g, state, w, value_fn=_quadratic)
  e = 0.02 * np.asarray(g) / np.linalg.norm(g)
  # The schedule's value is float32.
  np.testing.assert_allclose(out1, A @ (np.asarray(w) + e) - B, rtol=1e-6)


def test_bad_arguments_and_missing_value_fn_fail_clearly():
  with pytest.raises(ValueError, match="rho must be in"):
    curvopt.sam(_base(), rho=-0.1)
  with pytest.raises(ValueError, match="gamma must be in"):
    curvopt.gam(_base(), gamma=-1.0)
  opt = curvopt.sam(_base())
  w = jnp.ones(3)
  with pytest.raises(TypeError, match="sam needs the loss as an extra argument"):
    opt.update(w, opt.init(w), w)


def test_per_group_perturbations_average_the_groups_sam_gradients():
  # Spec 6.5 test 5: m-sharpness with b/m groups equals the mean of per-group SAM gradients.
  rng = np.random.default_rng(0)
  mats = [np.diag(rng.uniform(0.5, 3.0, 3)) for _ in range(2)]
  vecs = [rng.normal(size=3) for _ in range(2)]
  group_loss = lambda w, i: (
    0.5 * w @ jnp.asarray(np.stack(mats))[i] @ w - jnp.asarray(np.stack(vecs))[i] @ w
  )
  w = np.array([0.3, -1.0, 2.0])
  expected = []
  for a, b in zip(mats, vecs, strict=True):
    g = a @ w - b
    expected.append(a @ (w + 0.1 * g / np.linalg.norm(g)) - b)
  tx = sam_gradient(0.1, perturbation="per_group", num_groups=2)
  g_global = jnp.zeros(3)  # not used by per-group perturbations
  out, _ = tx.update(g_global, tx.init(w), jnp.asarray(w), group_value_fn=group_loss)
  np.testing.assert_allclose(out, np.mean(expected, axis=0), rtol=1e-12)


def test_one_group_is_global_sam():
  w = jnp.array([0.3, -1.0, 2.0])
  g = jax.grad(_quadratic)(w)
  one = sam_gradient(0.1, perturbation="per_group", num_groups=1)
  plain = sam_gradient(0.1)
  a, _ = one.update(g, one.init(w), w, group_value_fn=lambda p, i: _quadratic(p))
  b, _ = plain.update(g, plain.init(w), w, value_fn=_quadratic)
  np.testing.assert_allclose(a, b, rtol=1e-12)


def test_per_group_without_group_value_fn_fails_clearly():
  opt = curvopt.sam(_base(), perturbation="per_group", num_groups=4)
  w = jnp.ones(3)
  with pytest.raises(TypeError, match="needs the extra argument group_value_fn"):
    opt.update(w, opt.init(w), w, value_fn=_quadratic)
  with pytest.raises(ValueError, match="perturbation must be one of"):
    curvopt.sam(_base(), perturbation="local")


def _two_steps(opt, w, **extra):
  state, out = opt.init(w), []
  for _ in range(2):
    updates, state = opt.update(jax.grad(_quadratic)(w), state, w, value_fn=_quadratic, **extra)
    w = optax.apply_updates(w, updates)
    out.append(w)
  return out


def _group_loss(w, i):
  return _quadratic(w) * (1.0 + i) + jnp.sum(w) * i


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"adaptive": True},  # eta (0.01 by default) and eps enter only ASAM's scaling
    {"adaptive": True, "eta": 0.3, "eps": 1e-3, "rho": 0.2},
    {"perturbation": "per_group"},  # one group by default
    {"perturbation": "per_group", "num_groups": 2},
  ],
)
def test_sam_is_its_gradient_transform_then_the_base_optimizer(kwargs):
  w = jnp.array([0.3, -1.0, 2.0])
  extra = {"group_value_fn": _group_loss} if "perturbation" in kwargs else {}
  named = _two_steps(curvopt.sam(_base(), **kwargs), w, **extra)
  chained = _two_steps(optax.chain(sam_gradient(**kwargs), _base()), w, **extra)
  chex.assert_trees_all_equal(named, chained)


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {
      "rho": 0.1,
      "grad_norm_rho": 0.3,
      "beta1": 0.2,
      "beta3": 0.4,
      "beta0": 0.3,
      "gamma": 0.1,
      "apply_beta0": True,
      "adaptive": True,
      "eps": 1e-3,
    },
  ],
)
def test_gam_is_its_gradient_transform_then_the_base_optimizer(kwargs):
  w = jnp.array([0.3, -1.0, 2.0])
  named = _two_steps(curvopt.gam(_base(), **kwargs), w)
  chained = _two_steps(optax.chain(gam_gradient(**kwargs), _base()), w)
  chex.assert_trees_all_equal(named, chained)
  if kwargs:  # every value above differs from the default, so the comparison can fail
    default = _two_steps(optax.chain(gam_gradient(), _base()), w)
    assert not np.array_equal(named[-1], default[-1])


@pytest.mark.parametrize("name", ["sam", "gam"])
@pytest.mark.parametrize("bad", [0.1, "sgd"])
def test_the_base_optimizer_is_required_first_by_name(name, bad):
  class InitOnly:
    init = staticmethod(lambda p: ())

  for given in (bad, InitOnly()):
    with pytest.raises(TypeError) as caught:
      getattr(curvopt, name)(given)
    assert str(caught.value) == (
      f"{name}'s first argument is the base optax optimizer it wraps, such as "
      f"{name}(optax.sgd(0.1, momentum=0.9), rho=0.05); got {given!r}."
    )


def test_gam_passes_has_aux_on():
  w = jnp.array([0.3, -1.0, 2.0])
  with_aux = lambda p: (_quadratic(p), {"norm": jnp.sum(p**2)})
  outputs = []
  for opt in (curvopt.gam(_base(), has_aux=True), optax.chain(gam_gradient(has_aux=True), _base())):
    updates, _ = opt.update(jax.grad(_quadratic)(w), opt.init(w), w, value_fn=with_aux)
    outputs.append(updates)
  chex.assert_trees_all_equal(*outputs)
