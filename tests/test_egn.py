"""EGN: the batch-space direction against dense parameter-space solves (float64)."""

from __future__ import annotations

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import dense_ggn, mlp_problem, ravel

import curvopt
from curvopt.oracles import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError
from curvopt.transforms import levenberg_marquardt, scale_by_armijo_backtracking, scale_by_egn
from curvopt.transforms._momentum import EmaMomentumState

SOLVERS = ("cholesky", "parameter_cholesky", "cg")


def _direction(problem, damping, loss_fn=None, **kwargs):
  tx = scale_by_egn(damping, **kwargs)
  grads = jax.grad(problem.value_fn)(problem.params)
  direction, _ = tx.update(
    grads,
    tx.init(problem.params),
    problem.params,
    model_fn=problem.model_fn,
    loss_fn=loss_fn or problem.loss_fn,
  )
  return ravel(direction)


def _dense_direction(problem, damping, l2=0.0, mask=None):
  """`(J^T H J + l2 M + damping I)^{-1} (g + l2 M p)` from `jax.hessian` and `jax.jacfwd`."""
  flat = ravel(problem.params)
  m = np.ones_like(flat) if mask is None else mask
  ggn = dense_ggn(problem.model_fn, problem.loss_fn, problem.params)
  grad = ravel(jax.grad(problem.value_fn)(problem.params)) + l2 * m * flat
  return np.linalg.solve(ggn + np.diag(l2 * m + damping), grad)


def _relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _closed_form(problem, loss):
  return SoftmaxCrossEntropy(problem.targets) if loss == "xent" else SquaredError(problem.targets)


@pytest.mark.parametrize("loss", ["xent", "mse"])
@pytest.mark.parametrize("closed_form", [False, True])
@pytest.mark.parametrize("solver", ["cholesky", "parameter_cholesky"])
def test_batch_space_direction_equals_the_parameter_space_solve(loss, closed_form, solver):
  problem = mlp_problem(loss, n=6)  # 18 rows, 291 parameters
  loss_fn = _closed_form(problem, loss) if closed_form else None
  for damping in (1e-2, 1.0):
    expected = _dense_direction(problem, damping)
    got = _direction(problem, damping, loss_fn, solver=solver)
    assert _relative_error(got, expected) < 1e-8, (damping, _relative_error(got, expected))


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_cg_agrees_with_cholesky(loss):
  problem = mlp_problem(loss, n=6)
  cholesky = _direction(problem, 1e-2, solver="cholesky")
  cg = _direction(problem, 1e-2, solver="cg", cg_tol=1e-12, cg_maxiter=200)
  assert _relative_error(cg, cholesky) < 1e-6


def test_cg_with_the_default_budget_is_close_on_a_well_damped_problem():
  problem = mlp_problem("xent", n=16)
  cholesky = _direction(problem, 0.1, solver="cholesky")
  assert _relative_error(_direction(problem, 0.1, solver="cg"), cholesky) < 1e-4


def test_closed_form_output_curvature_matches_autodiff():
  problem = mlp_problem("xent", n=5)
  outputs = problem.model_fn(problem.params)
  for loss in (SoftmaxCrossEntropy(problem.targets), SquaredError(outputs * 0.3)):
    closed = curvopt.oracles.output_curvature(loss, outputs)
    auto = curvopt.oracles.output_curvature(lambda f, loss=loss: loss(f), outputs)
    blocks = lambda c: jnp.einsum("bik,bjk->bij", c.root, c.root)
    gradient = lambda c: (
      jnp.einsum("bck,bk->bc", c.root, c.coefficients)
      + (0.0 if c.null_gradient is None else c.null_gradient)
    )
    chex.assert_trees_all_close(blocks(closed), blocks(auto), atol=1e-12)
    chex.assert_trees_all_close(gradient(closed), gradient(auto), atol=1e-12)
    chex.assert_trees_all_close(gradient(closed), jax.grad(loss)(outputs), atol=1e-14)


def test_sigmoid_cross_entropy_closed_form_matches_autodiff_even_for_saturated_logits():
  logits = jnp.array([[-40.0], [-2.0], [0.0], [3.0], [40.0]])
  labels = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
  loss = SigmoidCrossEntropy(labels)
  curvature = curvopt.oracles.output_curvature(loss, logits)
  hessian = jax.hessian(lambda f: loss(f.reshape(5, 1)))(logits.ravel())
  # Autodiff's s (1 - s) rounds to 0 at logit 40; the closed form keeps 4e-18.
  chex.assert_trees_all_close(
    curvature.root[:, 0, 0] ** 2, jnp.diag(hessian), rtol=1e-10, atol=1e-17
  )
  gradient = curvature.root[:, 0, 0] * curvature.coefficients[:, 0]
  chex.assert_trees_all_close(gradient, jax.grad(loss)(logits)[:, 0], rtol=1e-10)
  assert bool(jnp.all(jnp.isfinite(curvature.coefficients)))


def test_a_loss_without_curvature_in_some_outputs_is_still_solved_exactly():
  # Output 1 enters linearly: zero curvature there, a nonzero gradient (the null part).
  problem = mlp_problem("mse", n=5)
  y = problem.targets
  loss_fn = lambda f: jnp.mean((f[:, 0] - y[:, 0]) ** 2 + f[:, 1] + 0.5 * f[:, 2] ** 2)
  problem = problem._replace(loss_fn=loss_fn, value_fn=lambda p: loss_fn(problem.model_fn(p)))
  curvature = curvopt.oracles.output_curvature(loss_fn, problem.model_fn(problem.params))
  assert float(jnp.max(jnp.abs(curvature.null_gradient[:, 1]))) > 0.1
  expected = _dense_direction(problem, 0.05)
  assert _relative_error(_direction(problem, 0.05, solver="cholesky"), expected) < 1e-8
  assert _relative_error(_direction(problem, 0.05, solver="cg", cg_tol=1e-12), expected) < 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_coupled_l2_enters_gradient_and_curvature_exactly(solver):
  problem = mlp_problem("xent", n=6)
  mask = {name: {"w": True, "b": False} for name in problem.params}
  flat_mask = ravel(jax.tree.map(lambda m, p: jnp.full(p.shape, float(m)), mask, problem.params))
  expected = _dense_direction(problem, 1e-2, l2=0.3, mask=np.asarray(flat_mask))
  got = _direction(
    problem, 1e-2, solver=solver, l2_regularization=0.3, l2_mask=mask, cg_tol=1e-12, cg_maxiter=300
  )
  assert _relative_error(got, expected) < (1e-6 if solver == "cg" else 1e-8)


def _least_squares(b=8, d=30, seed=0):
  rng = np.random.default_rng(seed)
  x, y = jnp.asarray(rng.normal(size=(b, d))), jnp.asarray(rng.normal(size=b))
  return x, y, (lambda w: x @ w), SquaredError(y)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])  # the batch space: b = 8 < d = 30
def test_one_undamped_step_reaches_the_minimum_norm_least_squares_solution(solver):
  x, y, model_fn, loss_fn = _least_squares()
  w0 = jnp.zeros(30)
  minimum_norm = np.linalg.pinv(np.asarray(x)) @ np.asarray(y)
  residuals = []
  for damping in (1e-2, 1e-6, 1e-10):
    opt = curvopt.egn(
      1.0, damping, adaptive_damping=False, line_search=False, solver=solver, cg_tol=1e-14
    )
    grads = jax.grad(lambda w: loss_fn(model_fn(w)))(w0)
    updates, _ = opt.update(grads, opt.init(w0), w0, model_fn=model_fn, loss_fn=loss_fn)
    w1 = w0 + updates
    residuals.append(float(jnp.linalg.norm(x @ w1 - y)))
    if damping == 1e-10:
      np.testing.assert_allclose(w1, minimum_norm, rtol=1e-7, atol=1e-9)
  # The residual is proportional to the damping (spec test 2), down to round-off.
  assert residuals[0] > 1e3 * residuals[1] > 1e6 * residuals[2] or residuals[2] < 1e-8, residuals


def test_linear_model_with_more_examples_than_parameters_takes_the_newton_step():
  rng = np.random.default_rng(1)
  x, y = jnp.asarray(rng.normal(size=(40, 5))), jnp.asarray(rng.normal(size=40))
  value_fn = lambda w: SquaredError(y)(x @ w)
  w0 = jnp.asarray(rng.normal(size=5))
  newton = w0 - jnp.linalg.solve(jax.hessian(value_fn)(w0), jax.grad(value_fn)(w0))
  for solver in ("parameter_cholesky", "auto"):  # b = 40 > d = 5: the parameter space
    opt = curvopt.egn(1.0, 1e-12, adaptive_damping=False, line_search=False, solver=solver)
    updates, _ = opt.update(
      jax.grad(value_fn)(w0), opt.init(w0), w0, model_fn=lambda w: x @ w, loss_fn=SquaredError(y)
    )
    np.testing.assert_allclose(w0 + updates, newton, rtol=1e-9)


def test_large_damping_gives_the_gradient_over_damping():
  problem = mlp_problem("xent", n=6)
  grad = ravel(jax.grad(problem.value_fn)(problem.params))
  got = _direction(problem, 1e8, solver="cholesky")
  assert _relative_error(got, grad / 1e8) < 1e-6


def test_identity_output_hessian_through_autodiff_equals_the_closed_form_mse():
  problem = mlp_problem("mse", n=6)
  closed = _direction(problem, 1e-2, SquaredError(problem.targets), solver="cholesky")
  auto = _direction(problem, 1e-2, solver="cholesky")
  assert _relative_error(auto, closed) < 1e-12


def _logistic_problem():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(20, 3)))
  labels = jnp.asarray(rng.integers(0, 2, size=20).astype(np.float64))
  model_fn, loss_fn = (lambda w: x @ w), SigmoidCrossEntropy(labels)
  return model_fn, loss_fn, jnp.asarray(rng.normal(size=3))


def _lm_rule(ratio, damping):
  if ratio < 0.25:
    return damping * 1.5
  return damping * 0.5 if ratio > 0.75 else damping


def test_damping_follows_the_gain_ratio_rule_on_every_branch():
  model_fn, loss_fn, w = _logistic_problem()
  value_fn = lambda w: loss_fn(model_fn(w))
  ggn, grad = dense_ggn(model_fn, loss_fn, w), jax.grad(value_fn)(w)
  damping = 0.1
  seen = set()
  for learning_rate in (0.3, 1.0, 1.4, 1.8, 3.0):  # rho 1.07, 0.68, 0.21, -1.1, unmeasured
    inner = optax.chain(scale_by_egn(), optax.scale_by_learning_rate(learning_rate))
    step = -learning_rate * np.linalg.solve(ggn + damping * np.eye(3), grad)
    actual = value_fn(w) - value_fn(w + step)
    predicted = -(grad @ step + 0.5 * (step @ ggn @ step + damping * step @ step))
    tx = levenberg_marquardt(inner, damping)
    updates, state = tx.update(grad, tx.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
    if predicted <= 1e-16:  # nothing to measure: rejected (and damped) if the loss rose
      assert not bool(state.measured)
      ratio = -np.inf if actual < 0 else 0.5
    else:
      ratio = float(actual / predicted)
      np.testing.assert_allclose(state.gain_ratio, ratio, rtol=1e-9)
    np.testing.assert_allclose(state.damping, _lm_rule(ratio, damping), rtol=1e-12)
    rejected = ratio <= 0
    assert int(state.rejected) == int(rejected)
    np.testing.assert_allclose(updates, 0.0 if rejected else step, rtol=1e-9)
    seen.add("rejected" if rejected else "up" if ratio < 0.25 else "down" if ratio > 0.75 else "=")
  assert {"rejected", "up", "=", "down"} <= seen, seen


def test_the_gain_ratio_counts_the_l2_penalty_in_both_losses_and_the_model():
  # f(p) = loss(model(p)) + l2/2 ||m p||^2, masked: the ratio is exact in float64 for
  # whatever step the inner transform takes.
  model_fn, loss_fn, w = _logistic_problem()
  l2, mask, damping = 0.7, jnp.array([True, False, True]), 0.1
  f = lambda p: loss_fn(model_fn(p)) + 0.5 * l2 * jnp.sum((mask * p) ** 2)
  inner = optax.chain(scale_by_egn(l2_regularization=l2), optax.scale_by_learning_rate(0.8))
  tx = levenberg_marquardt(inner, damping, l2_regularization=l2, l2_mask=mask, reject_below=None)
  grad = jax.grad(lambda p: loss_fn(model_fn(p)))(w)
  step, state = tx.update(grad, tx.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
  ggn = dense_ggn(model_fn, loss_fn, w) + l2 * jnp.diag(mask.astype(w.dtype))
  predicted = -(jax.grad(f)(w) @ step + 0.5 * (step @ ggn @ step + damping * step @ step))
  assert bool(state.measured)
  np.testing.assert_allclose(state.gain_ratio, (f(w) - f(w + step)) / predicted, rtol=1e-10)


def test_a_step_that_raises_the_loss_where_nothing_is_predicted_is_rejected():
  # On a quadratic, a step longer than twice Newton's has pred < 0 (not measurable).
  _x, _y, model_fn, loss_fn = _least_squares(b=8, d=5)
  inner = optax.chain(scale_by_egn(), optax.scale_by_learning_rate(3.0))
  tx = levenberg_marquardt(inner, 1e-6)
  w = jnp.zeros(5)
  updates, state = tx.update(w, tx.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
  assert not bool(state.measured) and int(state.rejected) == 1
  assert float(jnp.max(jnp.abs(updates))) == 0.0
  np.testing.assert_allclose(state.damping, 1.5e-6)


def test_damping_is_clamped_and_untouched_when_the_prediction_is_zero():
  _x, _y, model_fn, loss_fn = _least_squares(b=8, d=5)
  tx = levenberg_marquardt(optax.chain(scale_by_egn(), optax.scale(-1.0)), 1e-12, min_damping=1e-12)
  w = jnp.zeros(5)
  _, state = tx.update(w, tx.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
  assert float(state.damping) == 1e-12  # rho = 1 asks for 5e-13; clamped
  flat_loss = lambda f: 0.0 * jnp.sum(f)
  _, state = tx.update(w, tx.init(w), w, model_fn=model_fn, loss_fn=flat_loss)
  assert float(state.damping) == 1e-12 and not bool(state.measured)


def test_line_search_never_accepts_an_increase():
  value_fn = lambda w: jnp.sum(w**2) + jnp.sum(jnp.sin(5 * w))
  tx = scale_by_armijo_backtracking(max_learning_rate=10.0, max_steps=3)
  w = jnp.array([0.3, -1.2, 2.0])
  state = tx.init(w)
  for direction_sign in (-1.0, 1.0):  # a descent direction, then an ascent one
    for _ in range(20):
      u = direction_sign * jax.grad(value_fn)(w)
      step, state = tx.update(u, state, w, value_fn=value_fn)
      new_w = w + step
      assert float(value_fn(new_w)) <= float(value_fn(w))
      w = new_w
  assert int(state.failures) > 0  # the ascent direction was refused


def test_line_search_accepts_the_armijo_step_and_grows_the_next_first_trial():
  value_fn = lambda w: 0.5 * jnp.sum(w**2)
  tx = scale_by_armijo_backtracking(max_learning_rate=1.0)
  w = jnp.array([2.0, -1.0])
  state = tx.init(w)
  step, state = tx.update(-w, state, w, value_fn=value_fn)
  np.testing.assert_allclose(w + step, 0.0)  # the first trial (1.0) is exact
  assert float(state.learning_rate) == 1.0 and int(state.failures) == 0


def test_egn_with_line_search_and_momentum_trains_a_classifier():
  problem = mlp_problem("xent", n=32)
  loss_fn = SoftmaxCrossEntropy(problem.targets)
  opt = curvopt.egn(1.0, 1e-2, line_search=True, momentum=0.5)
  params, state = problem.params, opt.init(problem.params)
  losses = []

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(problem.value_fn)(params)
    updates, state = opt.update(grads, state, params, model_fn=problem.model_fn, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state, value

  for _ in range(15):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert losses[-1] < 0.05 * losses[0]
  assert all(b <= a + 1e-12 for a, b in itertools.pairwise(losses))


def test_momentum_is_a_bias_corrected_average_of_directions():
  tx = curvopt.transforms.ema_momentum(0.9, debias=True)
  state = tx.init(jnp.zeros(2))
  out, state = tx.update(jnp.array([1.0, 2.0]), state)
  np.testing.assert_allclose(out, [1.0, 2.0], rtol=1e-12)  # first step: the direction itself
  out, state = tx.update(jnp.array([3.0, 0.0]), state)
  np.testing.assert_allclose(out, (0.09 * np.array([1, 2]) + 0.1 * np.array([3, 0])) / 0.19)


def test_missing_model_or_loss_fails_clearly():
  problem = mlp_problem("xent", n=4)
  opt = curvopt.egn()
  grads = jax.grad(problem.value_fn)(problem.params)
  with pytest.raises(TypeError, match=r"model_fn and loss_fn.*loss_fn missing"):
    opt.update(grads, opt.init(problem.params), problem.params, model_fn=problem.model_fn)
  with pytest.raises(TypeError, match="model_fn and loss_fn missing"):
    opt.update(grads, opt.init(problem.params), problem.params, value_fn=problem.value_fn)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"damping": 0.0}, "damping must be a finite number > 0"),
    ({"damping": -1.0}, "damping must be a finite number > 0"),
    ({"solver": "lu"}, "solver must be one of"),
    ({"max_factor_size": 0}, "max_factor_size must be a positive integer"),
    ({"cg_maxiter": 2.5}, "cg_maxiter must be a positive integer"),
    ({"l2_regularization": -1.0}, "l2_regularization must be in"),
  ],
)
def test_bad_arguments_are_named(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    curvopt.egn(**kwargs)


def test_outputs_must_be_one_array_with_an_example_axis():
  opt = curvopt.egn()
  w = jnp.ones(3)
  with pytest.raises(ValueError, match="model_fn must return one array of outputs"):
    opt.update(w, opt.init(w), w, model_fn=lambda w: {"a": w}, loss_fn=lambda f: jnp.sum(f["a"]))
  with pytest.raises(ValueError, match="loss_fn must return a scalar"):
    opt.update(w, opt.init(w), w, model_fn=lambda w: w, loss_fn=lambda f: f)


def test_mismatched_l2_mask_is_named():
  problem = mlp_problem("mse", n=4)
  opt = curvopt.egn(l2_regularization=0.1, l2_mask={"w": True})
  grads = jax.grad(problem.value_fn)(problem.params)
  with pytest.raises(ValueError, match="l2_mask must be a pytree of booleans"):
    opt.update(
      grads,
      opt.init(problem.params),
      problem.params,
      model_fn=problem.model_fn,
      loss_fn=problem.loss_fn,
    )


def test_auto_solver_factors_the_smaller_space_then_falls_back_to_cg():
  choose = curvopt.transforms.gauss_newton._egn.choose_solver
  mlp = lambda d, b: 2.0 * d * b
  assert choose(30, 455, 1024, mlp(30, 455), 50) == "parameter_cholesky"
  assert choose(385, 64, 1024, mlp(385, 64), 50) == "cholesky"
  assert choose(5000, 1280, 1024, mlp(5000, 1280), 50) == "cg"  # above max_factor_size


def test_forward_flops_counts_matmuls_and_convolutions():
  flops = curvopt._jaxpr.forward_flops
  a, b = jnp.ones((8, 5)), jnp.ones((5, 3))
  assert flops(jnp.matmul, a, b) == 2 * 8 * 3 * 5
  x, kernel = jnp.ones((2, 1, 10, 10)), jnp.ones((4, 1, 3, 3))  # NCHW, OIHW
  conv = lambda x, k: jax.lax.conv(x, k, (1, 1), "VALID")
  assert flops(conv, x, kernel) == 2 * (2 * 4 * 8 * 8) * (1 * 3 * 3)


def test_auto_solver_picks_cg_on_a_conv_net_where_each_factor_row_is_a_full_pass():
  nn = pytest.importorskip("flax.linen")

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(16, (3, 3))(x))
      x = nn.relu(nn.Conv(16, (3, 3))(x))
      return nn.Dense(10)(x.mean((1, 2)))

  x = jnp.ones((64, 8, 8, 1))
  model = CNN()
  params = model.init(jax.random.key(0), x)
  d = ravel(params).size
  product = curvopt._jaxpr.forward_flops(lambda p: model.apply(p, x), params)
  # Measured: 0.65 s a step with CG, 1.5 s with the 640 x 640 Cholesky (2 CPU cores).
  assert curvopt.transforms.gauss_newton._egn.choose_solver(d, 640, 1024, product, 50) == "cg"


def test_bfloat16_parameters_get_bfloat16_updates_from_a_float32_solve():
  problem = mlp_problem("xent", n=6, dtype=jnp.float32)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), problem.params)
  model_fn = lambda p: problem.model_fn(jax.tree.map(lambda q: q.astype(jnp.float32), p))
  opt = curvopt.egn(1.0, 1e-2, adaptive_damping=True)
  grads = jax.grad(lambda p: problem.loss_fn(model_fn(p)))(params)
  updates, state = opt.update(
    grads, opt.init(params), params, model_fn=model_fn, loss_fn=problem.loss_fn
  )
  chex.assert_trees_all_equal_dtypes(updates, params)
  assert state.inner_state.damping.dtype == jnp.float32


def test_the_defaults_train_a_mini_batch_mlp_without_diverging():
  # At the old defaults (plain step, learning rate 1, damping 0.1) this went 1.71 -> 0.14
  # at step 20 -> 18.7 at step 50, finite, so the guard never fired.
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
    "w1": jax.random.normal(k1, (64, 64)) / 8,
    "b1": jnp.zeros(64),
    "w2": jax.random.normal(k2, (64, 10)) / 8,
    "b2": jnp.zeros(10),
  }
  model = lambda p, xb: jax.nn.relu(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  full_loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model(p, x), y).mean()
  opt = curvopt.egn()

  @jax.jit
  def step(p, state, xb, yb):
    model_fn = lambda q: model(q, xb)
    loss_fn = lambda out: optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()
    grads = jax.grad(lambda q: loss_fn(model_fn(q)))(p)
    updates, state = opt.update(grads, state, p, model_fn=model_fn, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), state

  state, rng, losses = opt.init(params), np.random.default_rng(0), []
  start = float(full_loss(params))
  for i in range(100):
    batch = rng.choice(x.shape[0], 64, replace=False)
    params, state = step(params, state, x[batch], y[batch])
    if i + 1 in (20, 50, 100):
      losses.append(float(full_loss(params)))
  assert all(math.isfinite(v) and v < 0.5 for v in losses), (start, losses)
  assert int(state.skipped) == 0


def _three_steps(problem, opt):
  """The parameters after three steps of `opt` on `problem` (model and loss apart)."""
  p, state = problem.params, opt.init(problem.params)
  for _ in range(3):
    grads = jax.grad(problem.value_fn)(p)
    updates, state = opt.update(grads, state, p, model_fn=problem.model_fn, loss_fn=problem.loss_fn)
    p = optax.apply_updates(p, updates)
  return p


@pytest.mark.parametrize(
  "base, changed",
  [
    ({}, {"max_factor_size": 1}),  # too small to factor: CG instead
    ({"solver": "cg"}, {"solver": "cg", "cg_tol": 0.5}),
    ({"solver": "cg"}, {"solver": "cg", "cg_maxiter": 1}),
    ({}, {"l2_regularization": 0.1}),
    (
      {"l2_regularization": 0.1},
      {
        "l2_regularization": 0.1,
        "l2_mask": {"layer0": {"w": True, "b": False}, "layer1": {"w": False, "b": False}},
      },
    ),
    ({}, {"momentum": 0.5}),
    ({"learning_rate": 3.0}, {"learning_rate": 3.0, "line_search": False}),  # Armijo halves
    ({}, {"adaptive_damping": True}),
    ({}, {"learning_rate": 0.25}),  # through Armijo's first trial
    ({"adaptive_damping": True}, {"adaptive_damping": True, "damping": 0.3}),
    (
      {"adaptive_damping": True, "line_search": False},
      {"adaptive_damping": True, "line_search": False, "l2_regularization": 0.1},
    ),
    (
      {"adaptive_damping": True, "line_search": False, "l2_regularization": 0.1},
      {
        "adaptive_damping": True,
        "line_search": False,
        "l2_regularization": 0.1,
        "l2_mask": {"layer0": {"w": True, "b": False}, "layer1": {"w": False, "b": False}},
      },
    ),
  ],
)
def test_the_named_optimizer_passes_each_argument_on(base, changed):
  """Three steps move elsewhere when one argument changes (the base otherwise the same)."""
  problem = mlp_problem("mse", n=6, sizes=(3, 5, 2))

  def run(**kwargs):
    return _three_steps(problem, curvopt.egn(**{"learning_rate": 0.5, "damping": 0.1, **kwargs}))

  before, after = run(**base), run(**changed)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
  ), changed


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"learning_rate": 0.0}, r"^learning_rate must be a finite number > 0, got 0.0"),
    ({"momentum": 1.0}, r"^momentum must be in \[0.0, 1.0\), got 1.0"),
    ({"adaptive_damping": "yes"}, r"^adaptive_damping must be True or False, got 'yes'"),
    ({"line_search": "yes"}, r"^line_search must be True or False, got 'yes'"),
  ],
)
def test_the_named_optimizers_own_arguments_are_refused_by_name(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    curvopt.egn(**kwargs)


def test_the_named_optimizers_solver_defaults_factor_up_to_1024_and_run_50_cg_steps():
  def uses_cholesky(features):
    x = jnp.ones((2048, features))  # the parameters are the smaller space
    model_fn, loss_fn = (lambda w: x @ w), (lambda f: 0.5 * jnp.mean(f**2))
    # A long CG budget makes factoring the cheaper choice wherever it is allowed.
    opt, w = curvopt.egn(cg_maxiter=5000), jnp.ones(features)
    update = lambda w: opt.update(w, opt.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
    return curvopt._jaxpr.contains_primitive(jax.make_jaxpr(update)(w).jaxpr, "cholesky")

  assert uses_cholesky(1024) and not uses_cholesky(1025)
  # 50 CG iterations where CG cannot reach its tolerance (a 128-row batch space).
  problem = mlp_problem("mse", n=64, sizes=(3, 6, 2))
  grads = jax.grad(problem.value_fn)(problem.params)

  def step(**kwargs):
    opt = curvopt.egn(damping=1e-3, solver="cg", cg_tol=1e-30, line_search=False, **kwargs)
    updates, _ = opt.update(
      grads,
      opt.init(problem.params),
      problem.params,
      model_fn=problem.model_fn,
      loss_fn=problem.loss_fn,
    )
    return jax.tree.leaves(updates)

  default = step()
  assert all(np.array_equal(a, b) for a, b in zip(default, step(cg_maxiter=50), strict=True))
  assert not all(np.array_equal(a, b) for a, b in zip(default, step(cg_maxiter=51), strict=True))


def test_the_named_optimizers_momentum_is_the_debiased_average_of_its_directions():
  """`momentum` averages EGN's directions with Adam's debiasing; at 0 there is no momentum state."""
  problem = mlp_problem("mse", n=6, sizes=(3, 5, 2))
  extra = {"model_fn": problem.model_fn, "loss_fn": problem.loss_fn}
  points = [problem.params, jax.tree.map(lambda x: 1.1 * x, problem.params)]
  direction = curvopt.transforms.scale_by_egn(0.1)
  opt = curvopt.egn(0.5, 0.1, momentum=0.5, line_search=False)
  direction_state, state = direction.init(points[0]), opt.init(points[0])
  average = jax.tree.map(jnp.zeros_like, points[0])
  for t, p in enumerate(points, start=1):
    grads = jax.grad(problem.value_fn)(p)
    u, direction_state = direction.update(grads, direction_state, p, **extra)
    updates, state = opt.update(grads, state, p, **extra)
    average = jax.tree.map(lambda m, x: 0.5 * m + 0.5 * x, average, u)
    debias = 1 - 0.5**t
    expected = jax.tree.map(lambda m, c=debias: -0.5 * m / c, average)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10, atol=1e-14)
  momentum_states = lambda s: [
    x
    for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, EmaMomentumState))
    if isinstance(x, EmaMomentumState)
  ]
  assert momentum_states(state)
  assert not momentum_states(curvopt.egn().init(points[0]))


@pytest.mark.parametrize("adaptive_damping", [False, True])
def test_a_fully_masked_penalty_is_no_penalty_for_the_direction_and_the_line_search(
  adaptive_damping,
):
  """Nor for the gain ratio's losses and model when the damping adapts."""
  problem = mlp_problem("mse", n=6, sizes=(3, 5, 2))
  nothing = jax.tree.map(lambda _: False, problem.params)

  def run(**kwargs):
    # A long first trial: Armijo backtracks.
    return _three_steps(problem, curvopt.egn(3.0, 0.1, adaptive_damping=adaptive_damping, **kwargs))

  chex.assert_trees_all_equal(run(), run(l2_regularization=100.0, l2_mask=nothing))


def test_adaptive_damping_measures_the_gain_ratio_of_the_penalized_objective():
  """The named EGN's Levenberg-Marquardt gets the L2 term and its mask, as the direction does."""
  problem = mlp_problem("mse", n=6, sizes=(3, 5, 2))
  mask = {"layer0": {"w": True, "b": False}, "layer1": {"w": True, "b": False}}
  l2 = {"l2_regularization": 0.5, "l2_mask": mask}
  named = curvopt.egn(0.5, 0.1, adaptive_damping=True, line_search=False, **l2)
  spelled = levenberg_marquardt(
    optax.chain(scale_by_egn(0.1, **l2), optax.scale_by_learning_rate(0.5)), 0.1, **l2
  )
  extra = {"model_fn": problem.model_fn, "loss_fn": problem.loss_fn}
  p, named_state, spelled_state = (
    problem.params,
    named.init(problem.params),
    spelled.init(problem.params),
  )
  for _ in range(3):
    grads = jax.grad(problem.value_fn)(p)
    updates, named_state = named.update(grads, named_state, p, **extra)
    expected, spelled_state = spelled.update(grads, spelled_state, p, **extra)
    chex.assert_trees_all_equal(updates, expected)
    # The gain ratio itself (not only the damping branch it picks) counts the penalty.
    chex.assert_trees_all_equal(named_state.inner_state, spelled_state)
    p = optax.apply_updates(p, updates)
  assert float(spelled_state.damping) != 0.1  # the rule moved it
