"""AdaHessian and Sophia-H against their exact formulas and against optax's Sophia."""

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt.transforms import (
  flax_averaging_axes,
  hutchinson_diagonal_estimator,
  scale_by_adahessian,
  spatial_average,
)


def _indefinite(d=20, seed=0):
  a = np.random.default_rng(seed).normal(size=(d, d))
  return jnp.asarray((a + a.T) / 2)


def test_hutchinson_inside_adahessian_is_unbiased():
  h = _indefinite()
  value_fn = lambda w: 0.5 * w @ h @ w
  params = jnp.zeros(20)

  def first_diagonal(seed):
    tx = scale_by_adahessian(
      absolute=False,
      averaging_axes=None,
      refresh_every=2,  # so the state keeps the estimate
      hessian_diagonal_fn=hutchinson_diagonal_estimator(seed=seed),
    )
    _, state = tx.update(params, tx.init(params), params, value_fn=value_fn)
    return state.diagonal

  n = 20000
  estimates = jax.vmap(first_diagonal)(jnp.arange(n))
  bound = 5 * np.sqrt((np.sum(np.asarray(h) ** 2, axis=1) - np.diag(h) ** 2) / n)
  assert np.all(np.abs(np.mean(estimates, axis=0) - np.diag(h)) <= bound)
  assert estimates.dtype == jnp.float64


@pytest.mark.parametrize("learning_rate", [1.0, 0.3])
@pytest.mark.parametrize("b2", [0.0, 0.999])
def test_adahessian_takes_the_diagonal_newton_step_on_a_separable_quadratic(learning_rate, b2):
  a = jnp.array([0.5, 2.0, 10.0, 3.0])
  value_fn = lambda w: 0.5 * jnp.sum(a * w**2)
  params = jnp.array([1.0, -2.0, 0.5, 4.0])
  opt = curvopt.adahessian(
    learning_rate, b1=0.0, b2=b2, eps=1e-300, hessian_power=1.0, averaging_axes=None
  )
  updates, _ = opt.update(jax.grad(value_fn)(params), opt.init(params), params, value_fn=value_fn)
  # -lr * H^-1 g (eps = 0 is refused: 1e-300 is below every entry's round-off)
  np.testing.assert_allclose(updates, -learning_rate * params, rtol=1e-12)


@pytest.mark.parametrize("hessian_power", [0.5, 1.0])
def test_adahessian_divides_by_the_diagonal_to_the_hessian_power(hessian_power):
  a = jnp.array([0.5, 2.0, 10.0, 3.0])
  value_fn = lambda w: 0.5 * jnp.sum(a * w**2)
  params = jnp.array([1.0, -2.0, 0.5, 4.0])
  tx = scale_by_adahessian(0.0, 0.0, 0.0, hessian_power, averaging_axes=None)
  grads = jax.grad(value_fn)(params)
  updates, _ = tx.update(grads, tx.init(params), params, value_fn=value_fn)
  np.testing.assert_allclose(updates, grads / a**hessian_power, rtol=1e-12)


def test_adahessian_reuses_the_kept_diagonal_until_the_next_refresh():
  a = jnp.array([0.5, 2.0, 10.0])
  quadratic = lambda scale: lambda w: 0.5 * jnp.sum(scale * a * w**2)
  tx = scale_by_adahessian(0.0, 0.0, 0.0, refresh_every=2, averaging_axes=None)
  params, grads = jnp.ones(3), jnp.array([1.0, -1.0, 2.0])
  state = tx.init(params)
  # jit: the kept diagonal is in the state from init on (lax.cond needs it on both branches).
  step = jax.jit(lambda s, scale: tx.update(grads, s, params, value_fn=quadratic(scale)))
  # The curvature quadruples after the first step; only the refresh at step 2 sees it.
  for scale, seen in ((1.0, 1.0), (4.0, 1.0), (4.0, 4.0)):
    updates, state = step(state, scale)
    np.testing.assert_allclose(state.diagonal, seen * a, rtol=1e-12)
    np.testing.assert_allclose(updates, grads / (seen * a), rtol=1e-12)


def test_adahessian_gives_a_custom_estimator_the_parameters_and_the_gradients():
  # A stand-in estimator: |g| times a scale it builds from the parameters at init.
  init = lambda params: jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)

  def update(updates, state, params=None, **extra_args):
    return jax.tree.map(lambda g, s: s * jnp.abs(g), updates, state), state

  estimator = optax.GradientTransformationExtraArgs(init, update)
  tx = scale_by_adahessian(0.0, 0.0, 0.0, averaging_axes=None, hessian_diagonal_fn=estimator)
  params, grads = jnp.ones(2), jnp.array([1.0, -4.0])
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates, [0.5, -0.5], rtol=1e-15)
  with pytest.raises(TypeError, match=r"^absolute must be True or False, got 'yes'\.$"):
    scale_by_adahessian(absolute="yes")


def test_hessian_power_zero_is_momentum_sgd():
  value_fn = lambda w: jnp.sum(w**4)
  params = jnp.array([1.0, -0.5])
  opt = curvopt.adahessian(0.1, b1=0.0, hessian_power=0.0, eps=1e-4)
  updates, _ = opt.update(jax.grad(value_fn)(params), opt.init(params), params, value_fn=value_fn)
  np.testing.assert_allclose(updates, -0.1 * jax.grad(value_fn)(params) / (1 + 1e-4), rtol=1e-12)


def test_spatial_averaging_averages_exactly_the_documented_axes():
  key = jax.random.key(0)
  tree = {
    "conv1d": jax.random.normal(key, (5, 3, 4)),  # flax (width, in, out): axis 0
    "conv2d": jax.random.normal(key, (3, 3, 2, 4)),  # flax (h, w, in, out): axes (0, 1)
    "dense": jax.random.normal(key, (6, 4)),  # not averaged
    "bias": jax.random.normal(key, (4,)),  # not averaged
  }
  assert [flax_averaging_axes(tree[k]) for k in ("conv1d", "conv2d", "dense", "bias")] == [
    (0,),
    (0, 1),
    (),
    (),
  ]
  out = spatial_average(tree, flax_averaging_axes)
  np.testing.assert_allclose(out["conv1d"], np.broadcast_to(tree["conv1d"].mean(0), (5, 3, 4)))
  np.testing.assert_allclose(
    out["conv2d"], np.broadcast_to(tree["conv2d"].mean((0, 1)), (3, 3, 2, 4))
  )
  np.testing.assert_array_equal(out["dense"], tree["dense"])
  np.testing.assert_array_equal(out["bias"], tree["bias"])
  custom = spatial_average(tree, {"conv1d": (0, 1), "conv2d": (), "dense": (1,), "bias": (0,)})
  np.testing.assert_allclose(
    custom["dense"], np.broadcast_to(tree["dense"].mean(1, keepdims=True), (6, 4))
  )
  np.testing.assert_allclose(custom["bias"], np.full(4, tree["bias"].mean()))


def test_adahessian_averages_absolute_values_of_a_conv_kernel():
  kernel = jnp.ones((5, 2, 3))
  x = jax.random.normal(jax.random.key(1), (4, 16, 2))
  value_fn = lambda k: jnp.mean(
    jnp.tanh(
      jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    )
    ** 2
  )
  tx = scale_by_adahessian(
    refresh_every=2, hessian_diagonal_fn=hutchinson_diagonal_estimator(seed=3)
  )
  _, state = tx.update(jax.grad(value_fn)(kernel), tx.init(kernel), kernel, value_fn=value_fn)
  raw, _ = hutchinson_diagonal_estimator(seed=3).update(
    kernel, hutchinson_diagonal_estimator(seed=3).init(kernel), kernel, value_fn=value_fn
  )
  np.testing.assert_allclose(
    state.diagonal, np.broadcast_to(np.abs(raw).mean(0), (5, 2, 3)), rtol=1e-12
  )


def _optax_estimator_with_our_probe(seed):
  """optax's Sophia calls its estimator with `obj_fn`: adapt ours to it."""
  ours = hutchinson_diagonal_estimator(seed=seed)

  def update(updates, state, params=None, obj_fn=None, **extra):
    return ours.update(updates, state, params, value_fn=obj_fn)

  return optax.GradientTransformationExtraArgs(ours.init, update)


def test_sophia_h_matches_optax_contrib_sophia_update_for_update():
  h = _indefinite(6, seed=2) + 4 * jnp.eye(6)
  b = jnp.arange(6.0)
  value_fn = lambda w: 0.5 * w @ h @ w - b @ w
  kwargs = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-3, gamma=0.05, clip_threshold=1.0)
  ours = curvopt.sophia_h(0.05, refresh_every=3, seed=7, **kwargs)
  theirs = optax.contrib.sophia(
    0.05, update_interval=3, hessian_diagonal_fn=_optax_estimator_with_our_probe(7), **kwargs
  )
  params_a = params_b = jnp.ones(6)
  state_a, state_b = ours.init(params_a), theirs.init(params_b)
  for _ in range(12):
    ua, state_a = ours.update(jax.grad(value_fn)(params_a), state_a, params_a, value_fn=value_fn)
    ub, state_b = theirs.update(jax.grad(value_fn)(params_b), state_b, params_b, obj_fn=value_fn)
    chex.assert_trees_all_close(ua, ub, rtol=1e-12, atol=1e-15)
    params_a, params_b = optax.apply_updates(params_a, ua), optax.apply_updates(params_b, ub)


def test_sophia_h_step_is_scaled_newton_or_clipped():
  a = jnp.array([1.0, 100.0])
  value_fn = lambda w: 0.5 * jnp.sum(a * w**2)
  opt = curvopt.sophia_h(1.0, b1=0.0, b2=0.0, gamma=1.0, weight_decay=0.0, refresh_every=1)
  params = jnp.array([0.5, 3.0])
  state = opt.init(params)
  _, state = opt.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)  # learns h
  updates, _ = opt.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
  # coordinate 0: |g / h| = 0.5 < 1, a Newton step; coordinate 1: |g / h| = 3 > 1, clipped to lr.
  np.testing.assert_allclose(updates, [-0.5, -1.0], rtol=1e-12)


def test_refresh_every_counts_hessian_products():
  calls = []

  def counting_estimator():
    ours = hutchinson_diagonal_estimator()

    def update(updates, state, params=None, **extra):
      jax.debug.callback(lambda: calls.append(1))
      return ours.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(ours.init, update)

  value_fn = lambda w: jnp.sum(w**2)
  tx = scale_by_adahessian(refresh_every=4, hessian_diagonal_fn=counting_estimator())
  params, state = jnp.ones(3), tx.init(jnp.ones(3))
  step = jax.jit(lambda p, s: tx.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn))
  for _ in range(10):
    _, state = step(params, state)
  jax.effects_barrier()
  assert len(calls) == 3  # steps 0, 4 and 8


def test_bad_refresh_interval_is_named():
  with pytest.raises(ValueError, match="refresh_every must be a positive integer"):
    curvopt.adahessian(0.1, refresh_every=0)
  with pytest.raises(TypeError, match="refresh_every must be a positive integer"):
    curvopt.sophia_h(0.1, refresh_every=2.5)


def test_refresh_with_a_convolution_on_cpu_matches_the_plain_refresh():
  from curvopt.transforms._cadence import refresh_if_due

  kernel = jax.random.normal(jax.random.key(0), (5, 2, 3))
  x = jax.random.normal(jax.random.key(1), (4, 16, 2))
  value_fn = lambda k: jnp.mean(
    jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")) ** 2
  )
  est = hutchinson_diagonal_estimator(seed=5)

  def run(count, kernel):
    refresh = lambda: est.update(kernel, est.init(kernel), kernel, value_fn=value_fn)
    keep = lambda: (jnp.zeros_like(kernel), est.init(kernel))
    return refresh_if_due(count, 2, refresh, keep)

  due = jax.jit(run)(jnp.int32(4), kernel)
  expected = est.update(kernel, est.init(kernel), kernel, value_fn=value_fn)
  np.testing.assert_allclose(due[0], expected[0], rtol=1e-12)
  np.testing.assert_array_equal(
    jax.random.key_data(due[1].key), jax.random.key_data(expected[1].key)
  )
  not_due = jax.jit(run)(jnp.int32(3), kernel)
  np.testing.assert_array_equal(not_due[0], np.zeros_like(kernel))


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: curvopt.adahessian(-0.1), r"learning_rate must be in \[0.0, inf\), got -0.1"),
    (lambda: curvopt.adahessian(0.1, b2=1.0), r"b2 must be in \[0.0, 1.0\)"),
    (lambda: curvopt.adahessian(0.1, hessian_power=1.5), r"hessian_power must be in \[0.0, 1.0\]"),
    (lambda: curvopt.adahessian(0.1, eps=-1e-4), r"eps must be in"),
    (
      lambda: curvopt.adahessian(0.1, averaging_axes="torch"),
      r"averaging_axes must be one of 'flax'",
    ),
    (lambda: curvopt.sophia_h(-1e-3), r"learning_rate must be in"),
    (lambda: curvopt.sophia_h(1e-3, b1=1.2), r"b1 must be in"),
    (lambda: curvopt.sophia_h(1e-3, gamma=-0.01), r"gamma must be in"),
  ],
)
def test_bad_hyperparameters_are_named(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_schedules_and_injected_hyperparameters_are_not_checked_eagerly():
  curvopt.adahessian(optax.linear_schedule(0.1, 0.0, 100))
  optax.inject_hyperparams(curvopt.sophia_h, static_args=("refresh_every", "seed"))(
    learning_rate=1e-3
  )


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_diagonal_is_probe_times_hessian_probe_for_counter_t(distribution):
  h = _indefinite(d=6, seed=2)
  params = {"a": jnp.zeros((2, 2), jnp.float32), "b": jnp.zeros(2, jnp.bfloat16)}
  flat = lambda p: jnp.concatenate([p["a"].reshape(-1), p["b"]]).astype(jnp.float64)
  value_fn = lambda p: 0.5 * flat(p) @ h @ flat(p)
  est = hutchinson_diagonal_estimator(seed=7, distribution=distribution)
  state = est.init(params)
  assert int(state.count) == 0 and state.count.dtype == jnp.int32
  for t in range(3):
    diagonal, state = est.update(None, state, params, value_fn=value_fn)
    assert int(state.count) == t + 1
    z = curvopt.random_vector(jax.random.key(7), params, distribution, counter=t)
    z_flat = np.asarray(flat(z))
    expected = z_flat * (np.asarray(h) @ z_flat)
    # float32 and bfloat16 leaves: the estimate is float32 (no float64 leaf).
    assert diagonal["a"].dtype == jnp.float32 and diagonal["b"].dtype == jnp.float32
    np.testing.assert_allclose(diagonal["a"].reshape(-1), expected[:4], rtol=1e-6)
    # The bfloat16 leaf's product H z comes back in bfloat16.
    np.testing.assert_allclose(diagonal["b"], expected[4:], rtol=1e-2)


def test_hutchinson_diagonal_needs_params_and_a_known_distribution():
  # The missing value_fn and a bad seed: test_hutchinson_diagonal_defaults_and_messages.
  est = hutchinson_diagonal_estimator(name="probe")
  w = jnp.ones(2)
  with pytest.raises(ValueError, match=r"probe needs params in update\(updates, state, params"):
    est.update(w, est.init(w), None, value_fn=jnp.sum)
  with pytest.raises(ValueError, match="distribution must be one of"):
    hutchinson_diagonal_estimator(distribution="normal")


def test_spatial_average_takes_flax_none_a_function_or_a_tree_and_refuses_other_strings():
  tree = {"k": jnp.arange(12.0).reshape(2, 3, 2), "b": jnp.arange(2.0)}
  assert spatial_average(tree, None) is tree
  flax = spatial_average(tree, "flax")
  np.testing.assert_array_equal(
    flax["k"], np.broadcast_to(np.arange(12.0).reshape(2, 3, 2).mean(0), (2, 3, 2))
  )
  np.testing.assert_array_equal(flax["b"], tree["b"])
  assert flax_averaging_axes(jnp.zeros((2, 2, 2, 2, 3))) == (0, 1, 2)
  assert flax_averaging_axes(jnp.zeros(())) == ()
  by_function = spatial_average(tree, lambda leaf: (leaf.ndim - 1,))
  np.testing.assert_array_equal(by_function["b"], [0.5, 0.5])
  with pytest.raises(
    ValueError, match=r'averaging_axes must be "flax", None, a function or a pytree; got \'linen\''
  ):
    spatial_average(tree, "linen")


def test_hutchinson_diagonal_defaults_and_messages():
  h = _indefinite(d=5, seed=4)
  value_fn = lambda w: 0.5 * w @ h @ w
  w = jnp.ones(5)
  default, seeded = hutchinson_diagonal_estimator(), hutchinson_diagonal_estimator(seed=0)
  a, _ = default.update(w, default.init(w), w, value_fn=value_fn)
  b, _ = seeded.update(w, seeded.init(w), w, value_fn=value_fn)
  np.testing.assert_array_equal(a, b)  # seed 0 by default
  with pytest.raises(ValueError, match=r"^hutchinson needs params in update"):
    default.update(w, default.init(w), None, value_fn=value_fn)
  named = hutchinson_diagonal_estimator(name="probe")
  with pytest.raises(TypeError, match=r"^probe needs the loss as an extra argument"):
    named.update(w, named.init(w), w)
  with pytest.raises(ValueError, match=r"^probe's value_fn must return a scalar"):
    named.update(w, named.init(w), w, value_fn=lambda v: v)
  with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\*\*63\)"):
    hutchinson_diagonal_estimator(seed=-1)


@pytest.mark.parametrize("name", ["sophia_h", "adahessian"])
def test_diagonal_transforms_keep_dtypes_and_name_themselves(name):
  make = {"sophia_h": curvopt.transforms.scale_by_sophia_h, "adahessian": scale_by_adahessian}[name]
  tx = make()
  params = {"w": jnp.ones(3, jnp.bfloat16), "v": jnp.ones(2, jnp.float32)}
  value_fn = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2) + jnp.sum(p["v"] ** 4)
  state = tx.init(params)
  assert state.count.dtype == jnp.int32
  grads = jax.grad(value_fn)(params)
  updates, state = tx.update(grads, state, params, value_fn=value_fn)
  assert updates["w"].dtype == jnp.bfloat16 and updates["v"].dtype == jnp.float32
  assert state.mu["w"].dtype == jnp.float32 and state.nu["w"].dtype == jnp.float32
  assert state.count.dtype == jnp.int32 and int(state.count) == 1
  with pytest.raises(TypeError, match=rf"^{name} needs the loss as an extra argument"):
    tx.update(grads, tx.init(params), params)  # a refresh step


def test_sophia_h_refreshes_every_ten_steps_by_default():
  calls = []
  ours = hutchinson_diagonal_estimator()

  def update(updates, state, params=None, **extra):
    calls.append(1)
    return ours.update(updates, state, params, **extra)

  counting = optax.GradientTransformationExtraArgs(ours.init, update)
  tx = curvopt.transforms.scale_by_sophia_h(hessian_diagonal_fn=counting)
  value_fn = lambda w: jnp.sum(w**2)
  w = jnp.ones(2)
  state = tx.init(w)
  for _ in range(21):  # eager: the refresh is a Python branch, taken on steps 0, 10, 20
    _, state = tx.update(jax.grad(value_fn)(w), state, w, value_fn=value_fn)
  assert len(calls) == 3


def _jitted_trajectory(opt, loss, w0, steps):
  """The parameters after `steps` jitted steps of `opt` on `loss` from `w0`."""
  step = jax.jit(lambda w, s: opt.update(jax.grad(loss)(w), s, w, value_fn=loss))
  w, state = w0, opt.init(w0)
  for _ in range(steps):
    updates, state = step(w, state)
    w = w + updates
  return np.asarray(w)


def _stiff_quadratic():
  """Curvature large enough that Sophia's ratio m / (gamma h) stays inside the clip."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(6, 6))
  a = jnp.asarray(100.0 * q @ q.T + 1000.0 * np.eye(6))
  return (lambda w: 0.5 * w @ a @ w), jnp.asarray(1e-3 * rng.normal(size=6))


def test_sophia_h_named_defaults_and_arguments_move_a_curvature_bound_trajectory():
  """On a clipped trajectory (sign descent) the Hessian diagonal does not matter; here it does."""
  loss, w0 = _stiff_quadratic()

  def run(**kwargs):
    return _jitted_trajectory(curvopt.sophia_h(1e-3, **kwargs), loss, w0, 12)

  default = run()
  np.testing.assert_array_equal(default, run(refresh_every=10, seed=0, clip_threshold=1.0))
  for changed in ({"refresh_every": 11}, {"seed": 1}, {"clip_threshold": 0.05}):
    assert not np.array_equal(default, run(**changed)), changed


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"b2": 1.5}, r"^b2 must be in \[0.0, 1.0\), got 1.5"),
    ({"eps": -1.0}, r"^eps must be in \[0.0, inf\), got -1.0"),
    ({"weight_decay": -1.0}, r"^weight_decay must be in \[0.0, inf\), got -1.0"),
    (
      {"eps": 0.0},
      r"^eps must be a finite number > 0 \(it keeps the denominator away from zero: with "
      r"eps=0 a parameter the loss does not use gets 0/0 and every step is skipped\), got 0.0",
    ),
    (
      {"clip_threshold": 0.0},
      r"^clip_threshold must be a finite number > 0 \(0 would never move\)",
    ),
  ],
)
def test_sophia_h_refuses_bad_arguments_by_name(kwargs, message):
  with pytest.raises(ValueError, match=message):
    curvopt.sophia_h(0.1, **kwargs)


def test_adahessian_named_defaults_and_arguments_move_a_nonconvex_trajectory():
  """A 3 x 3 kernel (averaged over its spatial axes) with curvature of both signs, where
  `absolute` matters, and a coupled term, where the probes' seed does."""
  loss = lambda w: jnp.sum(jnp.cos(3 * w)) + 0.1 * jnp.sum(w**4) + w[0, 0, 0, 0] * w[1, 1, 0, 0]
  w0 = jnp.linspace(0.1, 0.8, 9).reshape(3, 3, 1, 1)

  def run(**kwargs):
    return _jitted_trajectory(curvopt.adahessian(0.05, **kwargs), loss, w0, 5)

  default = run()
  np.testing.assert_array_equal(default, run(absolute=True, seed=0, weight_decay=0.0))
  for changed in ({"absolute": False}, {"seed": 1}, {"weight_decay": 0.5}):
    assert not np.array_equal(default, run(**changed)), changed


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"b1": 1.5}, r"^b1 must be in \[0.0, 1.0\), got 1.5"),
    ({"weight_decay": -1.0}, r"^weight_decay must be in \[0.0, inf\), got -1.0"),
    (
      {"eps": 0.0},
      r"^eps must be a finite number > 0 \(it keeps the denominator away from zero: with "
      r"eps=0 a parameter the loss does not use gets 0/0 and every step is skipped\), got 0.0",
    ),
  ],
)
def test_adahessian_refuses_bad_arguments_by_name(kwargs, message):
  with pytest.raises(ValueError, match=message):
    curvopt.adahessian(0.1, **kwargs)


@pytest.mark.parametrize("name", ["sophia_h", "adahessian"])
def test_the_named_optimizer_names_itself_and_stores_its_state_in_state_dtype(name):
  opt = getattr(curvopt, name)(0.1, state_dtype=jnp.bfloat16)
  w = jnp.ones(2, jnp.float32)
  state = opt.init(w)
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
  with pytest.raises(TypeError, match=rf"^{name} needs the loss as an extra argument"):
    opt.update(w, state, w)
