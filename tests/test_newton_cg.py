"""Hessian-free Newton-CG: exact on quadratics, negative curvature, Martens' damping rule."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt


def _quadratic(d=6):
  a = jax.random.normal(jax.random.key(0), (d, d), jnp.float64)
  a = a @ a.T + 0.5 * jnp.eye(d, dtype=jnp.float64)
  b = jax.random.normal(jax.random.key(1), (d,), jnp.float64)
  return a, b, lambda w: 0.5 * w @ a @ w - b @ w


@pytest.mark.parametrize("backtracking", [True, False])
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_one_undamped_step_with_enough_cg_iterations_solves_a_quadratic(curvature, backtracking):
  with jax.enable_x64(True):
    a, b, loss = _quadratic()
    root = jnp.linalg.cholesky(a)  # loss = 1/2 ||L^T w - L^-1 b||^2 + const
    model_fn = lambda w: root.T @ w - jax.scipy.linalg.solve_triangular(root, b, lower=True)
    loss_fn = lambda f: 0.5 * jnp.sum(f**2)
    opt = curvopt.newton_cg(
      damping=0.0,
      curvature=curvature,
      adaptive_damping=False,
      max_cg_iters=12,
      cg_tol=1e-14,
      backtracking=backtracking,
    )
    w = jnp.linspace(-1.0, 1.0, 6)
    extra = {"value_fn": loss, "model_fn": model_fn, "loss_fn": loss_fn}
    updates, state = jax.jit(lambda w, s: opt.update(jax.grad(loss)(w), s, w, **extra))(
      w, opt.init(w)
    )
    np.testing.assert_allclose(w + updates, np.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    inner = state.inner_state[0]
    assert int(inner.cg_iterations) <= 7 and int(inner.negative_curvature) == 0


def test_cg_on_an_indefinite_hessian_stops_at_negative_curvature():
  with jax.enable_x64(True):
    h = jnp.diag(jnp.array([2.0, 1.0, -1.0]))
    b = jnp.array([0.1, 0.0, 1.0])
    loss = lambda w: 0.5 * w @ h @ w - b @ w
    tx = curvopt.transforms.scale_by_newton_cg(0.0, curvature="hessian", max_cg_iters=10)
    w = jnp.zeros(3)
    g = jax.grad(loss)(w)
    updates, state = tx.update(g, tx.init(w), w, value_fn=loss)
    assert int(state.negative_curvature) == 1 and int(state.cg_iterations) == 1
    assert bool(jnp.all(jnp.isfinite(updates)))
    # A descent direction: the step -updates decreases the loss to first order.
    assert float(g @ -updates) < 0 and float(loss(w - updates)) < float(loss(w))
    # Positive definite: no early exit.
    spd = lambda w: 0.5 * w @ jnp.abs(h) @ w - b @ w
    _, state = tx.update(jax.grad(spd)(w), tx.init(w), w, value_fn=spd)
    assert int(state.negative_curvature) == 0


@pytest.mark.parametrize(
  "start, branch, factor",
  [
    (0.5, "unchanged", 1.0),  # rho = 0.44
    (0.1, "increase", 1.5),  # rho < 0: the step overshoots into r = 24
    (2.0, "decrease", 2.0 / 3.0),  # rho = 0.96
  ],
)
def test_martens_damping_rule_on_every_branch(start, branch, factor):
  """Gain ratio rho of the damped Gauss-Newton model: < 1/4 up 3/2, > 3/4 down 2/3."""
  with jax.enable_x64(True):
    model_fn = lambda w: w**2 - 1.0
    loss_fn = lambda f: 0.5 * jnp.sum(f**2)
    opt = curvopt.newton_cg(damping=1e-3, backtracking=False)
    w = jnp.array([start])
    g = jax.grad(lambda w: loss_fn(model_fn(w)))(w)
    _, state = opt.update(g, opt.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
    lm = state.inner_state
    rho = float(lm.gain_ratio)
    expected = {"unchanged": 0.25 <= rho <= 0.75, "increase": rho < 0.25, "decrease": rho > 0.75}
    assert bool(lm.measured) and expected[branch], rho
    np.testing.assert_allclose(float(lm.damping), 1e-3 * factor, rtol=1e-12)


def test_backtracking_never_returns_a_worse_iterate_than_the_last():
  with jax.enable_x64(True):
    x = jnp.linspace(-1.0, 1.0, 12)
    model_fn = lambda w: jnp.tanh(w[0] * x + w[1]) * w[2]
    loss_fn = lambda f: 0.5 * jnp.sum((f - jnp.sin(2 * x)) ** 2)
    objective = lambda w: loss_fn(model_fn(w))
    w = jnp.array([3.0, -1.0, 0.2])
    g = jax.grad(objective)(w)
    make = lambda bt: curvopt.transforms.scale_by_newton_cg(1e-4, max_cg_iters=8, backtracking=bt)
    with_bt, state = make(True).update(g, make(True).init(w), w, model_fn=model_fn, loss_fn=loss_fn)
    last, _ = make(False).update(g, make(False).init(w), w, model_fn=model_fn, loss_fn=loss_fn)
    assert float(objective(w - with_bt)) <= float(objective(w - last))
    chex.assert_trees_all_close(state.previous, -last, rtol=1e-12)  # the warm start is CG's own


def test_the_warm_start_carries_the_previous_solution():
  with jax.enable_x64(True):
    a, b, loss = _quadratic()
    tx = curvopt.transforms.scale_by_newton_cg(
      0.0, curvature="hessian", max_cg_iters=2, warm_start=1.0, backtracking=False
    )
    w = jnp.zeros(6)
    state = tx.init(w)
    residuals = []
    for _ in range(4):  # the same system each time: warm-started CG keeps improving
      updates, state = tx.update(jax.grad(loss)(w), state, w, value_fn=loss)
      residuals.append(float(jnp.linalg.norm(a @ (w - updates) - b)))
    assert all(later < earlier for earlier, later in itertools.pairwise(residuals))


@pytest.mark.parametrize(
  "make, error, message",
  [
    (lambda: curvopt.newton_cg(curvature="newton"), ValueError, "curvature must be one of"),
    (lambda: curvopt.newton_cg(curvature="hessian"), ValueError, "adaptive_damping=False"),
    (lambda: curvopt.newton_cg(damping=-1.0), ValueError, "damping must be in"),
    (lambda: curvopt.newton_cg(max_cg_iters=0), ValueError, "max_cg_iters"),
    (lambda: curvopt.newton_cg(-1.0), ValueError, "learning_rate must be in"),
    (lambda: curvopt.newton_cg(backtracking="yes"), TypeError, "backtracking must be True or"),
    (lambda: curvopt.newton_cg(adaptive_damping=1), TypeError, "adaptive_damping must be True"),
  ],
)
def test_bad_arguments_are_named(make, error, message):
  with pytest.raises(error, match=message):
    make()


def test_missing_extra_arguments_are_named():
  w = jnp.zeros(2)
  opt = curvopt.newton_cg()
  with pytest.raises(TypeError, match="model_fn and loss_fn"):
    opt.update(w, opt.init(w), w)
  hessian = curvopt.newton_cg(curvature="hessian", adaptive_damping=False)
  with pytest.raises(TypeError, match="value_fn"):
    hessian.update(w, hessian.init(w), w)


def test_a_jitted_step_compiles_once():
  from helpers import count_compilations

  loss = _quadratic()[2]
  opt = curvopt.newton_cg(curvature="hessian", adaptive_damping=False, damping=0.1)
  step = jax.jit(lambda w, s: opt.update(jax.grad(loss)(w), s, w, value_fn=loss))
  w = jnp.zeros(6, jnp.float32)
  u, state = step(w, opt.init(w))
  w = optax.apply_updates(w, u)
  with count_compilations() as compiled:
    step(w, state)
  assert not compiled


@pytest.mark.parametrize("max_iters", [3, 7, 20])
def test_the_last_snapshot_is_the_final_iterate_so_backtracking_needs_no_extra_candidate(
  max_iters,
):
  from curvopt.transforms.gauss_newton._newton_cg import _truncated_cg, snapshot_iterations

  assert snapshot_iterations(max_iters)[-1] == max_iters
  a = jnp.diag(jnp.arange(1.0, 11.0))
  b = jnp.ones(10)
  # tol 0: runs to max_iters (or converges exactly at 10); tol 0.5: stops early.
  for tol in (0.0, 0.5):
    out = _truncated_cg(lambda v: a @ v, b, jnp.zeros(10), max_iters, tol)
    np.testing.assert_array_equal(out.snapshots[-1], out.x)


def _ill_conditioned(d=80):
  """A quartic with a Hessian of condition 1e6 at 0.1: CG needs more than 50 iterations."""
  scales = jnp.logspace(-3.0, 3.0, d)
  target = jax.random.normal(jax.random.key(2), (d,))
  return lambda w: 0.5 * jnp.sum(scales * (w - target) ** 2) + 0.1 * jnp.sum(w**4)


def test_the_transform_defaults_are_its_documented_values():
  from curvopt.transforms import scale_by_newton_cg

  loss = _ill_conditioned()
  w = jnp.full(80, 0.1)

  def step(tx):
    updates, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, value_fn=loss)
    return np.asarray(updates)

  documented = {"damping": 1.0, "max_cg_iters": 50, "cg_tol": 1e-4, "backtracking": True}
  kwargs = {"curvature": "hessian", **documented}
  default = step(scale_by_newton_cg(curvature="hessian"))
  np.testing.assert_array_equal(default, step(scale_by_newton_cg(**kwargs)))
  # Each documented value matters here: another one gives another step.
  for changed in ({"damping": 2.0}, {"cg_tol": 1e-3}):
    assert not np.array_equal(default, step(scale_by_newton_cg(**{**kwargs, **changed})))
  # Backtracking by default: on a loss whose quartic the model misses, the first CG iterate
  # (loss 0.86) beats the final one (8.6).
  quartic = lambda v: 0.5 * v[0] ** 2 - v[0] + 5e-4 * v[1] ** 2 - v[1] + 10.0 * v[1] ** 4
  tx = scale_by_newton_cg(curvature="hessian")
  w2 = jnp.zeros(2)
  updates, _ = tx.update(jax.grad(quartic)(w2), tx.init(w2), w2, value_fn=quartic)
  np.testing.assert_allclose(updates, -2.0 / 3.001 * np.ones(2), rtol=1e-12)
  # At a tolerance CG does not reach, the 50 products are what stops it.
  strict = step(scale_by_newton_cg(curvature="hessian", cg_tol=1e-14))
  np.testing.assert_array_equal(strict, step(scale_by_newton_cg(**{**kwargs, "cg_tol": 1e-14})))
  longer = scale_by_newton_cg(**{**kwargs, "cg_tol": 1e-14, "max_cg_iters": 51})
  assert not np.array_equal(strict, step(longer))


def test_a_step_that_raises_a_finite_loss_is_taken_as_martens_does():
  """Only non-finite losses are rejected; a step with a negative gain ratio raises the damping."""
  model_fn = lambda w: jnp.stack([jnp.sin(3 * w[0]) + w[1] ** 2, w[0] * w[1] - 0.5])
  loss_fn = lambda f: 0.5 * jnp.sum(f**2)
  loss = lambda w: loss_fn(model_fn(w))
  w = jnp.array([-0.54, 0.875])
  opt = curvopt.newton_cg(damping=1e-3)
  updates, state = opt.update(jax.grad(loss)(w), opt.init(w), w, model_fn=model_fn, loss_fn=loss_fn)
  assert float(loss(w + updates)) > 1.5 * float(loss(w))  # 0.50 -> 0.80, and taken
  lm = state.inner_state
  assert int(lm.rejected) == 0 and float(lm.gain_ratio) < 0
  assert float(lm.damping) == pytest.approx(1.5e-3)  # rho < 1/4: lambda *= 3/2


def test_the_named_optimizers_messages_name_it_and_the_argument():
  with pytest.raises(ValueError) as caught:
    curvopt.newton_cg(curvature="hessian")
  assert str(caught.value) == (
    "newton_cg: adaptive_damping needs curvature='gauss_newton' (the gain ratio uses the "
    "Gauss-Newton model); pass adaptive_damping=False for a fixed damping with the Hessian."
  )
  with pytest.raises(ValueError) as caught:
    curvopt.newton_cg(damping=0.0)
  assert str(caught.value) == (
    "damping must be a finite number > 0 (the adaptive rule multiplies it), got 0.0."
  )
  curvopt.newton_cg(damping=0.0, adaptive_damping=False)  # a fixed damping may be zero
  opt, w = curvopt.newton_cg(), jnp.ones(2)
  with pytest.raises(TypeError, match=r"^newton_cg needs the model and the loss apart"):
    opt.update(w, opt.init(w), w)


@pytest.mark.parametrize(
  "changed",
  [{"warm_start": 0.0}, {"cg_tol": 0.3}, {"backtracking": False}, {"max_cg_iters": 2}],
)
def test_the_named_optimizer_passes_each_cg_argument_on(changed):
  """Three steps of the named optimizer move elsewhere when one CG argument changes."""
  loss = _ill_conditioned(12)
  w0 = jnp.full(12, 0.1)

  def run(**kwargs):
    opt = curvopt.newton_cg(0.5, 1e-2, curvature="hessian", adaptive_damping=False, **kwargs)
    w, state = w0, opt.init(w0)
    for _ in range(3):
      updates, state = opt.update(jax.grad(loss)(w), state, w, value_fn=loss)
      w = w + updates
    return np.asarray(w)

  assert not np.array_equal(run(), run(**changed))


def test_the_named_optimizer_stops_cg_at_50_products_by_default():
  loss = _ill_conditioned()
  w = jnp.full(80, 0.1)

  def step(**kwargs):
    opt = curvopt.newton_cg(curvature="hessian", adaptive_damping=False, cg_tol=1e-14, **kwargs)
    updates, _ = opt.update(jax.grad(loss)(w), opt.init(w), w, value_fn=loss)
    return np.asarray(updates)

  default = step()
  np.testing.assert_array_equal(default, step(max_cg_iters=50))
  assert not np.array_equal(default, step(max_cg_iters=51))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"curvature": "newton"}, r"^curvature must be one of"),
    ({"damping": -1.0}, r"^damping must be in \[0.0, inf\)"),
    ({"max_cg_iters": 0}, r"^max_cg_iters must be a positive integer"),
    ({"cg_tol": 0.0}, r"^cg_tol must be a finite number > 0"),
    ({"warm_start": 1.5}, r"^warm_start must be in \[0.0, 1.0\]"),
  ],
)
def test_the_transform_names_its_bad_arguments(kwargs, message):
  from curvopt.transforms import scale_by_newton_cg

  with pytest.raises(ValueError, match=message):
    scale_by_newton_cg(**kwargs)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_masked_parameters_and_missing_losses_are_refused_by_name(curvature):
  from curvopt.transforms import scale_by_newton_cg

  tx = scale_by_newton_cg(curvature=curvature)
  params = {"a": jnp.ones(2), "b": optax.MaskedNode()}
  loss = lambda p: jnp.sum(p["a"] ** 2)
  extra = {"value_fn": loss} if curvature == "hessian" else {"model_fn": lambda p: p["a"]}
  extra["loss_fn"] = jnp.sum
  with pytest.raises(TypeError, match=r"^newton_cg evaluates the loss"):
    tx.update(params, tx.init(params), params, **extra)
  w = jnp.ones(2)
  with pytest.raises(TypeError, match=r"^newton_cg needs"):
    tx.update(w, tx.init(w), w)


def test_float32_parameters_solve_in_float32():
  from curvopt.transforms import scale_by_newton_cg

  loss = _quadratic()[2]
  tx = scale_by_newton_cg(0.1, curvature="hessian")
  w = jnp.zeros(6, jnp.float32)
  single = lambda v: loss(v.astype(jnp.float64)).astype(jnp.float32)
  grads = jax.grad(single)(w)
  state = tx.init(w)
  assert state.cg_iterations.dtype == state.negative_curvature.dtype == jnp.int32
  updates, state = tx.update(grads, state, w, value_fn=single)
  assert updates.dtype == state.previous.dtype == jnp.float32
  # A float64 damping (from levenberg_marquardt's float64 state, say) does not widen CG.
  read = scale_by_newton_cg(None, curvature="hessian")
  _, state = read.update(grads, read.init(w), w, value_fn=single, damping=np.float64(0.1))
  assert state.previous.dtype == jnp.float32
