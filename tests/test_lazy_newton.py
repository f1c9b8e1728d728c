"""Lazy-Hessian cubic Newton against independent float64 solutions of the cubic subproblem."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import quadratic_with_spectrum

import curvopt


def _reference_cubic_step(a, g, m, iterations=200):
  """Bisection on `||(A + M r/2)^{-1} g|| = r` with dense solves (no eigenbasis), easy case."""
  lowest = np.linalg.eigvalsh(a)[0]
  lo = max(0.0, -2 * lowest / m) * (1 + 1e-15) + 1e-300
  hi = lo + np.sqrt(2 * np.linalg.norm(g) / m) + 1.0
  step = lambda r: np.linalg.solve(a + 0.5 * m * r * np.eye(len(g)), -g)
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np.linalg.norm(step(mid)) > mid else (lo, mid)
  return step(hi)


def _cubic_model(a, g, m, h):
  return g @ h + 0.5 * h @ a @ h + m / 6 * np.linalg.norm(h) ** 3


def _solve_in_eigenbasis(a, g, m):
  values, vectors = np.linalg.eigh(a)
  return vectors @ np.asarray(curvopt.cubic_subproblem(values, vectors.T @ g, m))


@pytest.mark.parametrize("seed", range(4))
def test_cubic_subproblem_matches_an_independent_solution_on_indefinite_matrices(seed):
  rng = np.random.default_rng(seed)
  values = np.concatenate([rng.uniform(-2, -0.1, 3), rng.uniform(0.1, 5, 5)])
  _, a = quadratic_with_spectrum(values, seed)
  g = rng.normal(size=8)
  for m in (0.1, 1.0, 10.0):
    expected = _reference_cubic_step(a, g, m)
    got = _solve_in_eigenbasis(a, g, m)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_spec_subproblem_optimality():
  values = np.array([3, 1, 0.5, -0.7, 2, -0.1])
  _, a = quadratic_with_spectrum(values, 0)
  g = np.random.default_rng(1).normal(size=6)
  h = _solve_in_eigenbasis(a, g, 2.0)
  r = np.linalg.norm(h)
  assert np.linalg.norm(a @ h + r * h + g) < 1e-12  # (A + M r/2) h = -g, M = 2
  assert np.linalg.eigvalsh(a)[0] + r > 0.5  # the spec measures 0.52
  best = _cubic_model(a, g, 2.0, h)
  nearby = h + 0.3 * np.random.default_rng(2).normal(size=(20000, 6))
  trial = np.einsum("ni,i->n", nearby, g) + 0.5 * np.einsum("ni,ij,nj->n", nearby, a, nearby)
  trial += 2.0 / 6 * np.linalg.norm(nearby, axis=1) ** 3
  assert best <= trial.min()


def test_one_dimensional_closed_form():
  for a, g, m in [(1.0, 4.0, 1.0), (-2.0, 0.5, 3.0), (0.0, -1.0, 2.0)]:
    expected = -np.sign(g) * 2 * abs(g) / (a + np.sqrt(a * a + 2 * m * abs(g)))
    got = curvopt.cubic_subproblem(jnp.array([a]), jnp.array([g]), m)
    np.testing.assert_allclose(got, [expected], rtol=1e-12)


def test_hard_case_moves_along_the_lowest_eigenvector_to_radius_two_over_m():
  h = np.asarray(curvopt.cubic_subproblem(jnp.array([-1.0, 2.0]), jnp.array([0.0, 1.0]), 1.0))
  np.testing.assert_allclose(np.linalg.norm(h), 2.0, rtol=1e-12)  # r = -2 lambda_min / M
  np.testing.assert_allclose(h[1], -1 / 3, rtol=1e-12)  # -g_2 / (lambda_2 - lambda_min)
  assert abs(h[0]) > 1.9
  a, g = np.diag([-1.0, 2.0]), np.array([0.0, 1.0])
  other = np.array([-h[0], h[1]])  # both signs are global minimizers
  np.testing.assert_allclose(_cubic_model(a, g, 1.0, h), _cubic_model(a, g, 1.0, other))
  grid = np.stack(np.meshgrid(np.linspace(-3, 3, 301), np.linspace(-3, 3, 301)), -1).reshape(-1, 2)
  values = grid @ g + 0.5 * np.einsum("ni,ij,nj->n", grid, a, grid)
  values += np.linalg.norm(grid, axis=1) ** 3 / 6
  assert _cubic_model(a, g, 1.0, h) <= values.min() + 1e-12


def test_hard_case_in_a_rotated_basis_is_still_solved():
  # g orthogonal to the lowest eigenvector up to round-off after rotation.
  _, a = quadratic_with_spectrum([-1.0, 2.0, 3.0], 4)
  _values, vectors = np.linalg.eigh(a)
  g = vectors[:, 1] + vectors[:, 2]
  h = _solve_in_eigenbasis(a, g, 1.0)
  r = np.linalg.norm(h)
  np.testing.assert_allclose(r, 2.0, rtol=1e-8)
  assert np.linalg.norm(a @ h + 0.5 * r * h + g) < 1e-7


def test_small_regularization_gives_the_newton_step():
  _, a = quadratic_with_spectrum([1.0, 2.0, 5.0], 0)
  g = np.array([1.0, -1.0, 0.5])
  np.testing.assert_allclose(_solve_in_eigenbasis(a, g, 1e-9), -np.linalg.solve(a, g), rtol=1e-7)


def test_zero_gradient_and_zero_matrix_give_a_zero_step():
  for dtype in (jnp.float32, jnp.float64):
    h = curvopt.cubic_subproblem(jnp.zeros(3, dtype), jnp.zeros(3, dtype), 1.0)
    assert h.dtype == dtype and not bool(jnp.any(h))


def _nonconvex(w):
  return jnp.sum(jnp.cos(3 * w)) + 0.1 * jnp.sum(w**4) + w[0] * w[1]


def _run(opt, value_fn, w, steps):
  state = opt.init(w)
  iterates = [w]
  step = jax.jit(lambda w, s: opt.update(jax.grad(value_fn)(w), s, w, value_fn=value_fn))
  for _ in range(steps):
    updates, state = step(w, state)
    w = optax.apply_updates(w, updates)
    iterates.append(w)
  return iterates, state


def test_every_step_hessian_is_cubic_newton_iterate_for_iterate():
  w = jnp.array([0.4, -0.3, 1.1])  # the Hessian is indefinite along the way
  m = 2.0
  iterates, _ = _run(curvopt.lazy_newton(1.0, m, hessian_every=1, adaptive=False), _nonconvex, w, 6)
  x = np.asarray(w)
  for got in iterates[1:]:
    a = np.asarray(jax.hessian(_nonconvex)(x))
    g = np.asarray(jax.grad(_nonconvex)(x))
    assert np.linalg.eigvalsh(a)[0] < 0 or x is not w
    x = x + _reference_cubic_step(0.5 * (a + a.T), g, m)
    np.testing.assert_allclose(got, x, rtol=1e-8, atol=1e-10)


def test_hard_case_through_the_optimizer():
  value_fn = lambda w: 0.5 * (-(w[0] ** 2) + 2 * w[1] ** 2) + w[1]  # H = diag(-1, 2), g = (0, 1)
  opt = curvopt.lazy_newton(1.0, 1.0, hessian_every=1, adaptive=False)
  updates, _ = opt.update(
    jax.grad(value_fn)(jnp.zeros(2)), opt.init(jnp.zeros(2)), jnp.zeros(2), value_fn=value_fn
  )
  np.testing.assert_allclose(jnp.linalg.norm(updates), 2.0, rtol=1e-12)
  np.testing.assert_allclose(updates[1], -1 / 3, rtol=1e-12)


@pytest.mark.parametrize("every", [1, 2, 5])
def test_any_period_gives_the_same_iterates_on_a_quadratic(every):
  value_fn, _a = quadratic_with_spectrum([0.5, 1.0, 4.0, 9.0], 1)
  value_fn = lambda w, value_fn=value_fn: value_fn(w) + w[0]
  opt = curvopt.lazy_newton(1.0, 0.3, hessian_every=every, adaptive=False)
  reference = curvopt.lazy_newton(1.0, 0.3, hessian_every=1, adaptive=False)
  w = jnp.array([1.0, -1.0, 2.0, 0.5])
  got, _ = _run(opt, value_fn, w, 5)
  expected, _ = _run(reference, value_fn, w, 5)
  np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=1e-10, atol=1e-12)


def test_one_step_with_vanishing_regularization_minimizes_a_strongly_convex_quadratic():
  value_fn, a = quadratic_with_spectrum([0.1, 1.0, 30.0], 2)
  b = jnp.array([1.0, 2.0, -3.0])
  f = lambda w: value_fn(w) - b @ w
  opt = curvopt.lazy_newton(1.0, 1e-12, adaptive=False)
  w0 = jnp.array([5.0, -5.0, 5.0])
  (_, w1), _ = _run(opt, f, w0, 1)
  np.testing.assert_allclose(w1, np.linalg.solve(a, b), rtol=1e-8)


def test_hessians_are_computed_exactly_every_m_steps():
  calls = []

  def value_fn(w):
    # The dense Hessian is the only place value_fn is differentiated twice.
    return jnp.sum(jnp.logaddexp(0.0, w)) + 0.5 * jnp.sum(w**2)

  # A small learning rate keeps the iterates (so the Hessians) changing for ten steps.
  opt = curvopt.lazy_newton(0.1, 1.0, hessian_every=3, adaptive=False)
  w = jnp.linspace(-1.0, 1.0, 4)
  state = opt.init(w)

  @jax.jit
  def step(w, state):
    updates, state = opt.update(jax.grad(value_fn)(w), state, w, value_fn=value_fn)
    jax.debug.callback(lambda n: calls.append(int(n)), state.inner_state[0].hessians)
    return optax.apply_updates(w, updates), state

  snapshots = []
  for _ in range(10):
    w, state = step(w, state)
    snapshots.append(np.asarray(state.inner_state[0].eigenvalues))
  assert calls == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]  # steps 0, 3, 6, 9
  changed = [not np.array_equal(a, b) for a, b in itertools.pairwise(snapshots)]
  assert changed == [False, False, True, False, False, True, False, False, True]


def test_default_period_is_the_dimension():
  value_fn = lambda w: jnp.sum(jnp.logaddexp(0.0, w)) + 0.5 * jnp.sum(w**2)
  _, state = _run(curvopt.lazy_newton(), value_fn, jnp.ones(5), 11)
  assert int(state.inner_state[0].hessians) == 3  # steps 0, 5, 10


def _breast_cancer():
  from curvopt.bench.workloads import WORKLOADS

  workload = WORKLOADS["breast_cancer_logreg"]()
  batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), workload.train)
  params = jax.tree.map(lambda x: x.astype(jnp.float64), workload.init_params(jax.random.key(0)))
  return (lambda p: workload.value_fn(p, batch)), params


@pytest.mark.parametrize("every", [1, 6, None])  # m = 1, about sqrt(d), d = 31
def test_converges_on_regularized_logistic_regression_to_gradient_norm_1e_8(every):
  value_fn, params = _breast_cancer()
  opt = curvopt.lazy_newton(hessian_every=every)
  iterates, _ = _run(opt, value_fn, params, 80)  # measured: 9, 24 and 65 steps
  grad_norm = float(optax.tree.norm(jax.grad(value_fn)(iterates[-1])))
  assert grad_norm < 1e-8, grad_norm


def test_adaptive_search_keeps_sufficient_decrease():
  w = jnp.array([0.4, -0.3, 1.1])
  opt = curvopt.lazy_newton(1.0, 1e-4, hessian_every=3)  # far too small an M at first
  iterates, state = _run(opt, _nonconvex, w, 12)
  values = [float(_nonconvex(x)) for x in iterates]
  assert all(b <= a for a, b in itertools.pairwise(values))
  assert int(state.inner_state[0].function_values) > 12  # some steps needed more than one trial
  assert float(state.inner_state[0].regularization) > 1e-4


def test_quadratic_kind_is_gradient_regularized_newton():
  value_fn, a = quadratic_with_spectrum([1.0, 2.0, 3.0], 3)
  w = jnp.array([1.0, 0.0, -1.0])
  g = np.asarray(jax.grad(value_fn)(w))
  opt = curvopt.lazy_newton(1.0, 4.0, kind="quadratic", adaptive=False)
  (_, w1), _ = _run(opt, value_fn, w, 1)
  lam = np.sqrt(4.0 * np.linalg.norm(g))
  np.testing.assert_allclose(w1, w - np.linalg.solve(a + lam * np.eye(3), g), rtol=1e-10)


def test_matrix_free_mode_with_a_full_krylov_basis_equals_dense_mode():
  value_fn, _ = _breast_cancer()
  _, params = _breast_cancer()
  dense = curvopt.lazy_newton(1.0, 1.0, hessian_every=4, adaptive=False)
  krylov = curvopt.lazy_newton(
    1.0, 1.0, hessian_every=4, adaptive=False, mode="matrix_free", krylov_dim=31
  )
  got, _ = _run(krylov, value_fn, params, 6)
  expected, _ = _run(dense, value_fn, params, 6)
  for a, b in zip(got[1:], expected[1:], strict=True):
    np.testing.assert_allclose(optax.tree.norm(optax.tree.sub(a, b)), 0.0, atol=1e-8)


def test_matrix_free_mode_with_a_small_basis_converges():
  value_fn, params = _breast_cancer()
  opt = curvopt.lazy_newton(mode="matrix_free", krylov_dim=8)
  iterates, state = _run(opt, value_fn, params, 80)
  assert float(optax.tree.norm(jax.grad(value_fn)(iterates[-1]))) < 1e-6
  assert state.inner_state[0].eigenvectors.shape == (8, 31)  # no d x d state


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"regularization": 0.0}, "regularization must be a finite number > 0"),
    ({"mode": "sparse"}, "mode must be one of"),
    ({"kind": "quartic"}, "kind must be one of"),
    ({"hessian_every": 0}, "hessian_every must be a positive integer"),
    ({"krylov_dim": 1.5}, "krylov_dim must be a positive integer"),
  ],
)
def test_bad_arguments_are_named(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    curvopt.lazy_newton(**kwargs)


def test_missing_value_fn_fails_clearly():
  opt = curvopt.lazy_newton()
  w = jnp.ones(2)
  with pytest.raises(TypeError, match="lazy_newton needs the loss as an extra argument"):
    opt.update(w, opt.init(w), w)


@pytest.mark.parametrize(
  ("eigenvalue_dtype", "gradient_dtype", "expected"),
  [
    (jnp.float64, jnp.float32, jnp.float64),
    (jnp.float32, jnp.float64, jnp.float64),
    (jnp.bfloat16, jnp.bfloat16, jnp.float32),  # never below float32
    (jnp.float32, jnp.float32, jnp.float32),  # a Python float M or damping does not widen
  ],
)
def test_subproblems_work_in_the_wider_input_dtype_and_at_least_float32(
  eigenvalue_dtype, gradient_dtype, expected
):
  # 1/3 is not a float32 number: rounding the eigenvalues to the narrower type shows.
  eigenvalues = jnp.asarray([-0.5, 1.0 / 3.0, 3.0], eigenvalue_dtype)
  g = jnp.asarray([0.25, -1.0, 2.0], gradient_dtype)
  cubic = curvopt.cubic_subproblem(eigenvalues, g, 1.5)
  newton = curvopt.regularized_newton_step(eigenvalues, g, 1.0)
  assert cubic.dtype == expected and newton.dtype == expected
  exact = lambda x: np.asarray(x, np.float64)
  reference = curvopt.cubic_subproblem(jnp.asarray(exact(eigenvalues)), jnp.asarray(exact(g)), 1.5)
  tolerance = 1e-12 if expected == jnp.float64 else 1e-5
  np.testing.assert_allclose(exact(cubic), reference, rtol=tolerance)
  np.testing.assert_allclose(exact(newton), -exact(g) / (exact(eigenvalues) + 1.0), rtol=tolerance)


def test_float64_regularization_and_damping_do_not_widen_float32_subproblems():
  eigenvalues, g = jnp.asarray([-0.5, 1.0, 3.0], jnp.float32), jnp.asarray([0.25, -1.0, 2.0])
  g = g.astype(jnp.float32)
  wide = lambda x: jnp.asarray(x, jnp.float64)
  cubic = curvopt.cubic_subproblem(eigenvalues, g, wide(1.5))
  newton = curvopt.regularized_newton_step(eigenvalues, g, wide(1.0))
  assert cubic.dtype == newton.dtype == jnp.float32
  np.testing.assert_array_equal(cubic, curvopt.cubic_subproblem(eigenvalues, g, 1.5))
  np.testing.assert_array_equal(newton, curvopt.regularized_newton_step(eigenvalues, g, 1.0))


@pytest.mark.parametrize("dtype, size", [(jnp.float32, 1e-19), (jnp.float64, 1e-300)])
def test_tiny_gradients_give_the_exact_step(dtype, size):
  # A singular direction (lambda_0 = 0): h_0 = -g_0 / (M r / 2), r = ||h|| ~ sqrt(2 g_0 / M).
  # ||g||^2 underflows here; the bisection's bracket once collapsed to r = tiny, and the
  # step along the singular direction came out as -g_0 / (M tiny / 2) (-2e18 in float32).
  eigenvalues, g, m = jnp.asarray([0.0, 1.0, 4.0], dtype), jnp.full(3, size, dtype), 7.0
  h = np.asarray(curvopt.cubic_subproblem(eigenvalues, g, m), np.float64)
  r = np.linalg.norm(h)
  residual = (np.asarray(eigenvalues, np.float64) + 0.5 * m * r) * h + np.asarray(g, np.float64)
  eps = float(jnp.finfo(dtype).eps)
  assert np.all(np.abs(residual) <= 100 * eps * size)
  assert r == pytest.approx(np.sqrt(2.0 * float(g[0]) / m), rel=100 * eps)
  # Positive definite: the Newton step -g / lambda, whatever the gradient's size.
  pd = curvopt.cubic_subproblem(jnp.asarray([0.5, 1.0, 2.0], dtype), g.at[0].set(0.0), m)
  np.testing.assert_allclose(pd, [0.0, -size, -size / 2], rtol=100 * eps)


@pytest.mark.parametrize(
  "eigenvalues, g, m",
  [
    # The two lowest eigenvalues 8 float32 ulps apart, tiny g: nearly the hard case.
    ([-2.0, -2.0 + 2.0**-20, 1.0], [1e-4, 1e-4, 1e-4], 0.1),
    (
      [-0.46954712, -0.34600887, -0.04926791],
      [-3.5630414e-06, -2.2559948e-06, -1.5726506e-05],
      0.2377514,
    ),
  ],
)
def test_nearly_hard_float32_subproblems_reach_the_float64_minimum(eigenvalues, g, m):
  eigenvalues, g = jnp.asarray(eigenvalues, jnp.float32), jnp.asarray(g, jnp.float32)
  wide = lambda x: np.asarray(x, np.float64)

  def model(h):
    h = wide(h)
    return wide(g) @ h + 0.5 * np.sum(wide(eigenvalues) * h * h) + m / 6 * np.linalg.norm(h) ** 3

  best = model(curvopt.cubic_subproblem(jnp.asarray(wide(eigenvalues)), jnp.asarray(wide(g)), m))
  assert model(curvopt.cubic_subproblem(eigenvalues, g, m)) == pytest.approx(best, rel=1e-5)


def test_gradient_entries_equal_to_one_are_divided_like_any_other():
  h = curvopt.cubic_subproblem(jnp.asarray([1.0, 3.0]), jnp.asarray([1.0, 0.0]), 2.0)
  # 1-D closed form along the first axis: -2 g / (a + sqrt(a^2 + 2 M |g|)) = -2 / (1 + sqrt(5))
  np.testing.assert_allclose(h, [-2.0 / (1.0 + np.sqrt(5.0)), 0.0], rtol=1e-14)


@pytest.mark.parametrize(
  "eigenvalues, g, expected",
  [
    # r_low = -2 lambda_min / M = 3: the step's norm; off the lowest axis -g_j / gap_j.
    ([-1.5, 2.0], [0.0, 1.0], [np.sqrt(9.0 - (1.0 / 3.5) ** 2), -1.0 / 3.5]),
    # Most of the radius off the lowest axis: sqrt(4 - (5.5 / 3)^2) = 0.8 along it.
    ([-1.0, 2.0], [0.0, 5.5], [np.sqrt(4.0 - (5.5 / 3.0) ** 2), -5.5 / 3.0]),
    # The component along the lowest eigenvector opposes g there: - for a positive g_0.
    ([-1.0, 2.0], [1e-300, 1.0], [-np.sqrt(4.0 - 1.0 / 9.0), -1.0 / 3.0]),
  ],
)
def test_hard_case_step_has_norm_r_low_and_the_documented_sign(eigenvalues, g, expected):
  h = curvopt.cubic_subproblem(jnp.asarray(eigenvalues), jnp.asarray(g), 1.0)
  np.testing.assert_allclose(h, expected, rtol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("ulps", [20, 26])
def test_hard_case_counts_eigenvalues_within_eight_eps_of_the_lowest_as_its_eigenspace(dtype, ulps):
  # lambda_1 = lambda_0 + delta, g_1 tiny: within 8 eps max|lambda| (= 24 eps here) the two
  # share the lowest eigenspace and no step is taken along axis 1; beyond it, -g_1 / delta.
  eps = float(jnp.finfo(dtype).eps)
  delta, tiny = ulps * eps, 1e3 * eps**2
  eigenvalues = jnp.asarray([-2.0, -2.0 + delta, 3.0], dtype)
  assert float(eigenvalues[1] - eigenvalues[0]) == delta
  h = np.asarray(curvopt.cubic_subproblem(eigenvalues, jnp.asarray([0.0, tiny, 1.0], dtype), 1.0))
  off = 0.0 if ulps <= 24 else -tiny / delta
  np.testing.assert_allclose(h[1:], [off, -1.0 / 5.0], rtol=10 * eps)
  np.testing.assert_allclose(h[0], np.sqrt(16.0 - off**2 - 1.0 / 25.0), rtol=10 * eps)


def test_regularized_newton_step_floors_a_non_positive_denominator():
  eigenvalues = jnp.asarray([-2.0, 0.5, 4.0])
  step = curvopt.regularized_newton_step(eigenvalues, jnp.asarray([1.0, 1.0, 1.0]), 1.0)
  floor = np.finfo(np.float64).eps * 4.0  # eps times the largest |eigenvalue| (at least 1)
  np.testing.assert_allclose(step, [-1.0 / floor, -1.0 / 1.5, -1.0 / 5.0], rtol=1e-15)
  small = curvopt.regularized_newton_step(jnp.asarray([-0.5, 0.1]), jnp.asarray([1.0, 1.0]), 0.5)
  np.testing.assert_allclose(small, [-1.0 / np.finfo(np.float64).eps, -1.0 / 0.6], rtol=1e-15)


def test_the_named_optimizers_defaults_reach_its_state():
  """Defaults the adaptive trajectories do not show: Krylov size, dense limit, seed, cap, floor."""
  d = jax.ShapeDtypeStruct((4096,), jnp.float32)
  wide = jax.ShapeDtypeStruct((4097,), jnp.float32)
  shapes = lambda opt, p: jax.eval_shape(opt.init, p).inner_state[0].eigenvectors.shape
  assert shapes(curvopt.lazy_newton(), d) == (4096, 4096)  # dense up to 4,096 parameters
  assert shapes(curvopt.lazy_newton(), wide) == (20, 4097)  # then 20 Lanczos vectors
  assert shapes(curvopt.lazy_newton(max_dense_size=100), d) == (20, 4096)
  assert shapes(curvopt.lazy_newton(mode="matrix_free", krylov_dim=7), d) == (7, 4096)
  key = curvopt.lazy_newton().init(jnp.zeros(3)).inner_state[0].key
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(0)))
  key = curvopt.lazy_newton(seed=5).init(jnp.zeros(3)).inner_state[0].key
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(5)))
  # A loss that is NaN off its start point: every trial fails, the search stops at the cap.
  w = jnp.array([0.5, -1.0])
  start_only = lambda v: jnp.where(jnp.all(v == w), jnp.sum(v**2), jnp.nan)
  trials = {}
  for kwargs in ({}, {"max_doublings": 40}, {"max_doublings": 3}):
    _, state = _run(curvopt.lazy_newton(**kwargs), start_only, w, 1)
    inner = state.inner_state[0]
    assert int(inner.rejected_steps) == 1
    trials[kwargs.get("max_doublings")] = int(inner.function_values)
  assert trials[None] == trials[40] == trials[3] + 37
  # The adaptive M is divided by 4 at each snapshot down to its floor, 1e-10 by default.
  value_fn, _ = quadratic_with_spectrum([1.0, 2.0], 2)
  floors = {}
  for kwargs in ({}, {"min_regularization": 1e-10}, {"min_regularization": 1e-3}):
    opt = curvopt.lazy_newton(hessian_every=1, **kwargs)
    _, state = _run(opt, value_fn, jnp.array([1.0, -1.0]), 20)
    floors[kwargs.get("min_regularization")] = float(state.inner_state[0].regularization)
  assert floors[None] == floors[1e-10] == 1e-10 and floors[1e-3] == 1e-3


def test_the_named_optimizer_refuses_a_bad_learning_rate_by_name():
  with pytest.raises(ValueError, match=r"^learning_rate must be a finite number > 0"):
    curvopt.lazy_newton(0.0)
  # Without adaptation the documented M = 1 is the step's regularization.
  value_fn, _ = quadratic_with_spectrum([1.0, -0.5, 2.0], 3)
  w = jnp.array([0.3, 0.2, -0.1])
  run = lambda **kw: np.asarray(
    _run(curvopt.lazy_newton(adaptive=False, **kw), value_fn, w, 2)[0][-1]
  )
  np.testing.assert_array_equal(run(), run(regularization=1.0))
  assert not np.array_equal(run(), run(regularization=2.0))
