"""Reliability: fault injection, exact checkpoints, resumable runs, bad input named."""

from __future__ import annotations

import inspect
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_conformance import OPTIMIZERS, _parabola, extra_args, registry

import curvopt
from curvopt.bench import config, runner


def _poisoned(extra, value):
  """The extra arguments with every curvature source returning `value` (NaN or inf)."""
  return {
    "value_fn": lambda p: extra["value_fn"](p) * value,
    "model_fn": lambda p: extra["model_fn"](p) * value,
    "loss_fn": extra["loss_fn"],
  }


def _poison_a_statistic(state, value):
  """`value` written into the largest floating-point leaf of the optimizer's own state."""
  leaves, treedef = jax.tree.flatten(state.inner_state)
  floats = [
    i
    for i, x in enumerate(leaves)
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.size > 0
  ]
  if not floats:
    return state, False
  target = max(floats, key=lambda i: leaves[i].size)
  leaves[target] = jnp.full_like(leaves[target], value)
  return state._replace(inner_state=jax.tree.unflatten(treedef, leaves)), True


# Infinity takes the same finiteness checks as NaN: the slow tier.
@pytest.mark.parametrize("value", [jnp.nan, pytest.param(jnp.inf, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", registry())
def test_injected_faults_never_reach_the_parameters_and_training_continues(name, value):
  with jax.enable_x64(False):
    params, model_fn, _ = _parabola()
    extra = extra_args(model_fn)
    opt = OPTIMIZERS[name].make()
    state = opt.init(params)
    healthy = jax.jit(lambda p, s, g: _step(opt, p, s, g, extra))
    poisoned = jax.jit(lambda p, s, g: _step(opt, p, s, g, _poisoned(extra, value)))
    loss = lambda p: float(extra["value_fn"](p))
    start = loss(params)
    poisoned_statistic = False
    for t in range(60):
      grads = jax.grad(extra["value_fn"])(params)
      if t == 5:  # a non-finite gradient
        grads = jax.tree.map(lambda g: g.at[0].set(value), grads)
      if t == 15:  # a corrupted statistic in the state
        state, poisoned_statistic = _poison_a_statistic(state, value)
      # t == 10: non-finite Hessian products, Gauss-Newton outputs and losses
      params, state = (poisoned if t == 10 else healthy)(params, state, grads)
      assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params)), (name, t)
    if OPTIMIZERS[name].reads_gradient:
      assert int(state.skipped) >= 1, name  # at least the non-finite gradient
    assert int(state.resets) == int(poisoned_statistic), name
    assert loss(params) < 0.5 * start, (name, loss(params), start)


def _step(opt, params, state, grads, extra):
  updates, state = opt.update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("name", registry())
def test_states_save_and_restore_exactly_against_an_abstract_target(name, tmp_path):
  params, model_fn, _ = _parabola()
  extra = extra_args(model_fn)
  opt = OPTIMIZERS[name].make()
  state = opt.init(params)
  for _ in range(3):
    updates, state = opt.update(jax.grad(extra["value_fn"])(params), state, params, **extra)
    params = optax.apply_updates(params, updates)
  curvopt.checkpoint.save(tmp_path / "ckpt", {"params": params, "state": state})
  like = jax.eval_shape(lambda p: {"params": p, "state": opt.init(p)}, params)
  restored = curvopt.checkpoint.restore(tmp_path / "ckpt", like)
  unwrap = lambda t: jax.tree.map(
    lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, t
  )
  chex.assert_trees_all_equal(unwrap(restored), unwrap({"params": params, "state": state}))
  chex.assert_trees_all_equal_dtypes(unwrap(restored), unwrap({"params": params, "state": state}))
  # The restored state continues exactly as the original.
  grads = jax.grad(extra["value_fn"])(params)
  a, _ = opt.update(grads, state, params, **extra)
  b, _ = opt.update(grads, restored["state"], restored["params"], **extra)
  chex.assert_trees_all_equal(a, b)


def _run_spec(optimizer: str, **hyperparameters) -> config.RunSpec:
  return config.RunSpec(
    workload="digits_mlp",
    workload_options=(),
    optimizer=optimizer,
    trial=0,
    learning_rate=0.01,
    hyperparameters=tuple(hyperparameters.items()),
    tuned=("learning_rate",),
    schedule="warmup_cosine",
    warmup_fraction=0.1,
    seed=0,
    steps=60,
    max_seconds=None,
    eval_every=10,
    checkpoint_every=20,
    sharpness_every=0,
    target=0.05,
  )


class _Interrupt(Exception):
  pass


@pytest.mark.parametrize(
  ("optimizer", "hyperparameters"),
  [
    ("shampoo", {}),
    # The resume logic is the runner's: one optimizer by default, the others slow.
    pytest.param("psgd_kron", {"update_probability": 0.5}, marks=pytest.mark.slow),
    pytest.param("adahessian", {}, marks=pytest.mark.slow),
  ],
)
def test_an_interrupted_run_resumes_to_bit_identical_losses(optimizer, hyperparameters, tmp_path):
  spec = _run_spec(optimizer, **hyperparameters)
  interrupted, clean = tmp_path / "interrupted", tmp_path / "clean"
  done = [0]

  def crash_after_50(n):
    done[0] += n
    if done[0] >= 50:
      raise _Interrupt

  with pytest.raises(_Interrupt):
    runner.run(spec, interrupted, crash_after_50)
  assert (interrupted / "runs" / f"{spec.run_id}.ckpt.npz").exists()
  runner.run(spec, interrupted)
  runner.run(spec, clean)
  read = lambda out: [
    r for r in config_records(out / "runs" / f"{spec.run_id}.jsonl") if "train_loss" in r
  ]
  resumed, reference = read(interrupted), read(clean)
  assert [r["step"] for r in resumed] == list(range(0, 61, 10))
  assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in reference]


def config_records(path: pathlib.Path) -> list[dict]:
  from curvopt.bench import results

  return [r for r in results.read_records(path) if "event" not in r]


# --- The guard itself. -----------------------------------------------------


@pytest.mark.parametrize("large", [False, True], ids=["one_vector", "leaf_by_leaf"])
def test_all_finite_reads_every_float_leaf_and_nothing_else(large, monkeypatch):
  if large:  # the path taken above ONE_VECTOR_LIMIT scalars
    monkeypatch.setattr(curvopt._tree, "ONE_VECTOR_LIMIT", 4)
    jax.clear_caches()  # traced again with the limit: the other case may be cached
  all_finite = jax.jit(curvopt.transforms.all_finite)
  with jax.enable_x64(True):
    big = {"w": jnp.full(3, 1e300, jnp.float64), "h": jnp.ones((2, 2), jnp.bfloat16)}
    assert bool(all_finite(big))  # finite float64 beyond float32's range is finite
    big["z"] = jnp.full(2, 1e300 + 1e300j, jnp.complex128)
    assert bool(all_finite(big))
    bad_entries = [("w", jnp.inf), ("w", -jnp.inf), ("w", jnp.nan), ("h", jnp.nan)]
    big["c"] = jnp.ones(2, jnp.complex64)  # float32's width: read as is, imaginary part too
    assert bool(all_finite(big))
    infinite_imaginary = complex(1.0, float("inf"))  # 1 + 1j * inf would be nan + inf j
    bad_entries += [("z", infinite_imaginary), ("z", jnp.nan + 0j), ("c", infinite_imaginary)]
    for leaf, value in bad_entries:
      bad = dict(big, **{leaf: big[leaf].at[-1].set(value)})
      assert not bool(all_finite(bad)), (leaf, value)
  others = {"n": jnp.int32(7), "k": jax.random.key(0), "empty": jnp.zeros(0), "x": jnp.ones(5)}
  assert bool(all_finite(others))
  assert bool(all_finite({}))


def _key_and_count_transform(impl):
  """A PRNG key advanced, a count changing dtype (int32 -> float32), a total changing shape."""

  def init(params):
    del params
    return {
      "key": jax.random.key(0, impl=impl),
      "count": jnp.zeros((), jnp.int32),
      "total": jnp.zeros(1),
    }

  def update(updates, state, params=None):
    del params
    key = jax.random.split(state["key"])[0]
    return updates, {"key": key, "count": state["count"] + 1.0, "total": jnp.sum(updates)}

  return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_the_guard_keeps_the_key_of_a_skipped_step_and_advances_an_applied_one(impl):
  opt = curvopt.transforms.skip_nonfinite(_key_and_count_transform(impl))
  params = jnp.ones(2)
  state = opt.init(params)
  step = jax.jit(opt.update)
  _, skipped = step(jnp.array([1.0, jnp.nan]), state, params)
  assert skipped.inner_state["key"].dtype == state.inner_state["key"].dtype
  np.testing.assert_array_equal(
    jax.random.key_data(skipped.inner_state["key"]), jax.random.key_data(state.inner_state["key"])
  )
  _, applied = step(jnp.ones(2), state, params)
  advanced = jax.random.split(state.inner_state["key"])[0]
  np.testing.assert_array_equal(
    jax.random.key_data(applied.inner_state["key"]), jax.random.key_data(advanced)
  )
  # The count changed dtype and the total shape in the step: selected all the same
  # (promoted, broadcast), not an error.
  assert (float(skipped.inner_state["count"]), float(applied.inner_state["count"])) == (0.0, 1.0)
  assert (skipped.inner_state["total"].tolist(), applied.inner_state["total"].tolist()) == (
    [0.0],
    [2.0],
  )
  assert (int(skipped.skipped), int(applied.skipped)) == (1, 0)


def test_the_guard_names_integer_parameters_and_passes_leaves_without_a_dtype():
  opt = curvopt.transforms.skip_nonfinite(optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"params\['n'\] must have a floating-point dtype .*int"):
    opt.init({"w": jnp.ones(2), "n": jnp.arange(3)})
  opt.init({"w": jnp.ones(2), "python_float": 1.0})  # no dtype attribute: left to optax
  # optax's map_params hands init a placeholder standing for the parameters.
  optax.tree.map_params(opt, lambda x: x, opt.init({"w": jnp.ones(2)}))


def test_the_guard_on_empty_params_a_stateless_inner_and_no_params():
  opt = curvopt.transforms.skip_nonfinite(optax.scale(-0.1))  # EmptyState inner state
  empty = opt.init({})
  assert empty == curvopt.transforms.SkipNonFiniteState(optax.EmptyState(), 0, 0)
  assert opt.update({}, empty, {}) == ({}, empty)
  state = opt.init({"w": jnp.ones(2)})
  bad = {"w": jnp.array([1.0, jnp.nan])}
  for params in ({"w": jnp.ones(2)}, None):  # the updates checked when params are not given
    updates, after = opt.update(bad, state, params)
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros(2)})
    assert int(after.skipped) == 1
  with pytest.raises(ValueError, match=r"^updates must have the same pytree structure as params"):
    opt.update({"v": jnp.ones(2)}, state, {"w": jnp.ones(2)})


def test_a_corrupted_incoming_state_skips_the_step_and_restarts_keeping_the_key():
  params = {"w": jnp.ones(3)}
  opt = curvopt.transforms.skip_nonfinite(curvopt.transforms.scale_by_sophia_h())
  value_fn = lambda p: jnp.sum(p["w"] ** 2)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=value_fn))
  state = opt.init(params)
  for _ in range(3):
    _, state = step(jax.grad(value_fn)(params), state, params)
  inner = state.inner_state
  other_key = jax.random.key(123)  # not the one init would draw: a restart must keep it
  inner = inner._replace(
    mu={"w": inner.mu["w"].at[1].set(jnp.nan)},
    estimator=inner.estimator._replace(key=other_key),
  )
  updates, after = step(jax.grad(value_fn)(params), state._replace(inner_state=inner), params)
  chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3)})
  fresh = opt.init(params).inner_state
  chex.assert_trees_all_equal(after.inner_state.mu, fresh.mu)
  chex.assert_trees_all_equal(after.inner_state.count, fresh.count)
  assert (int(after.skipped), int(after.resets)) == (int(state.skipped) + 1, 1)
  chex.assert_trees_all_equal(
    jax.random.key_data(after.inner_state.estimator.key), jax.random.key_data(other_key)
  )


def test_the_restart_is_fused_only_when_init_is_cheap():
  """Zeros, identities and seeded keys are rebuilt every step; random draws are not."""
  from curvopt import _jaxpr
  from curvopt.transforms._safety import _CHEAP_INIT

  params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
  cheap = lambda opt: _jaxpr.uses_only(
    jax.make_jaxpr(lambda: opt.init(params))().jaxpr, _CHEAP_INIT
  )
  assert cheap(optax.adam(0.1))
  assert cheap(curvopt.shampoo(0.1))
  assert cheap(curvopt.psgd_kron(0.1))  # Kronecker factors: identities and a seeded key
  assert not cheap(curvopt.psgd_lra(0.1))  # Gaussian U and V
  draws = optax.GradientTransformation(lambda p: jax.random.normal(jax.random.key(0), (3,)), None)
  assert not cheap(draws)
  loop = lambda p: jax.lax.fori_loop(0, 3, lambda i, x: x + 1, jnp.zeros(3))
  assert not cheap(optax.GradientTransformation(loop, None))  # a loop of cheap steps is a loop


def test_a_corrupted_state_with_a_random_init_restarts_to_that_init():
  """PSGD-LRA draws its U and V at init: the restart runs that draw, not zeros."""
  params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
  opt = curvopt.psgd_lra(0.1)
  grads = jax.tree.map(jnp.cos, params)
  step = jax.jit(opt.update)
  state = opt.init(params)
  _, state = step(grads, state, params)
  corrupted = jax.tree.map(
    lambda x: x.at[..., 0].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
  )
  updates, after = step(grads, corrupted, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  fresh = opt.init(params)
  floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  restarted = floats(after)
  assert any(float(jnp.max(jnp.abs(x))) > 0 for x in floats(fresh))  # a draw, not zeros
  for got, want in zip(restarted, floats(fresh), strict=True):
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-15)  # jitted vs eager init


def test_the_guard_changes_no_healthy_step():
  """Guarded Adam = optax.adam bit for bit, state and updates, over several steps."""
  params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2)), "c": jnp.zeros(())}
  plain, guarded = optax.adam(0.1), curvopt.transforms.skip_nonfinite(optax.adam(0.1))
  s_plain, s_guarded = plain.init(params), guarded.init(params)
  for t in range(4):
    grads = jax.tree.map(lambda x, t=t: jnp.sin(x + t), params)
    u_plain, s_plain = jax.jit(plain.update)(grads, s_plain, params)
    u_guarded, s_guarded = jax.jit(guarded.update)(grads, s_guarded, params)
    chex.assert_trees_all_equal(u_plain, u_guarded)
    chex.assert_trees_all_equal(s_plain, s_guarded.inner_state)
  assert (int(s_guarded.skipped), int(s_guarded.resets)) == (0, 0)


# --- Bad input, named. -----------------------------------------------------


@pytest.mark.parametrize("name", registry())
def test_mismatched_gradients_and_integer_parameters_are_named(name):
  params, model_fn, _ = _parabola()
  opt = OPTIMIZERS[name].make()
  state = opt.init(params)
  with pytest.raises(ValueError, match="updates must have the same pytree structure as params"):
    opt.update({"v": jnp.ones(3)}, state, params, **extra_args(model_fn))
  with pytest.raises(ValueError, match=r"updates\['w'\] must have shape \(3,\)"):
    opt.update({"w": jnp.ones(4)}, state, params, **extra_args(model_fn))
  with pytest.raises(TypeError, match=r"params\['w'\] must have a floating-point dtype"):
    opt.init({"w": jnp.arange(3)})


@pytest.mark.parametrize(
  ("factory", "kwargs", "match"),
  [
    (curvopt.adahessian, {"learning_rate": -0.1}, "learning_rate"),
    (curvopt.sophia_h, {"learning_rate": 0.1, "b2": 1.0}, "b2"),
    (curvopt.shampoo, {"learning_rate": 0.1, "block_size": 0}, "block_size"),
    (curvopt.soap, {"learning_rate": 0.1, "precondition_frequency": 0}, "precondition_frequency"),
    (curvopt.psgd_kron, {"learning_rate": 0.1, "update_probability": 1.5}, "update_probability"),
    (curvopt.psgd_lra, {"learning_rate": 0.1, "update_probability": -0.1}, "update_probability"),
    (curvopt.egn, {"damping": 0.0}, "damping"),
    (curvopt.lazy_newton, {"regularization": -1.0}, "regularization"),
    (curvopt.lazy_newton, {"hessian_every": 0}, "hessian_every"),
  ],
)
def test_hyperparameters_out_of_range_are_named(factory, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    factory(**kwargs)


def test_a_typo_in_a_hyperparameter_name_is_a_type_error_naming_it():
  with pytest.raises(TypeError, match="block_sise"):
    curvopt.shampoo(0.1, block_sise=64)


# --- Every numeric hyperparameter is checked when the optimizer is built. ----

_FACTORIES = {
  "adahessian": curvopt.adahessian,
  "sophia_h": curvopt.sophia_h,
  "shampoo": curvopt.shampoo,
  "soap": curvopt.soap,
  "psgd_kron": curvopt.psgd_kron,
  "psgd_lra": curvopt.psgd_lra,
  "psgd_dense": curvopt.psgd_dense,
  "psgd_muon": curvopt.psgd_muon,
  "egn": curvopt.egn,
  "lazy_newton": curvopt.lazy_newton,
  "sam": lambda **kw: curvopt.sam(optax.sgd(0.1), **kw),
  "gam": lambda **kw: curvopt.gam(optax.sgd(0.1), **kw),
}
# Where infinity is a meaningful setting ("no limit"), not a mistake.
_INFINITY_ALLOWED = {("psgd_kron", "max_skew"), ("psgd_muon", "max_skew")}


def _numeric_hyperparameters():
  for name, factory in _FACTORIES.items():
    target = {"sam": curvopt.sam, "gam": curvopt.gam}.get(name, factory)
    parameters = inspect.signature(target).parameters
    for p in parameters.values():
      if p.name in ("base_optimizer", "seed") or isinstance(p.default, bool):
        continue
      if isinstance(p.default, int | float) or (
        p.default is inspect.Parameter.empty and p.name == "learning_rate"
      ):
        yield name, p.name


@pytest.mark.parametrize(("name", "argument"), list(_numeric_hyperparameters()))
@pytest.mark.parametrize(
  "bad",
  [math.nan, math.inf, "0.1", np.array(math.nan), jnp.asarray(math.inf)],
  ids=["nan", "inf", "string", "numpy-nan", "jax-inf"],
)
def test_every_numeric_hyperparameter_rejects_nan_inf_and_strings(name, argument, bad):
  """Concrete arrays are checked like numbers (only tracers under inject_hyperparams are not)."""
  if not isinstance(bad, str) and np.isinf(bad) and (name, argument) in _INFINITY_ALLOWED:
    pytest.skip("infinity means no limit here")
  kwargs = {argument: bad}
  if argument != "learning_rate" and name not in ("sam", "gam", "egn", "lazy_newton"):
    kwargs["learning_rate"] = 0.1
  with pytest.raises((ValueError, TypeError), match=argument):
    _FACTORIES[name](**kwargs)


@pytest.mark.parametrize("name", sorted(set(_FACTORIES) - {"sam", "gam"}))
@pytest.mark.parametrize(
  "bad",
  [None, [0.05], np.array(-0.05), jnp.asarray(0.1 + 0.5j)],
  ids=["none", "list", "negative-array", "complex"],
)
def test_a_learning_rate_that_is_not_a_positive_real_number_is_refused(name, bad):
  """None would be optax's "no scaling": the raw direction applied without its minus sign."""
  with pytest.raises((ValueError, TypeError), match="learning_rate"):
    _FACTORIES[name](learning_rate=bad)


@pytest.mark.parametrize(
  ("factory", "kwargs", "match"),
  [
    (curvopt.adahessian, {"learning_rate": 0.1, "b1": jnp.asarray(1.5)}, "b1"),
    (curvopt.soap, {"learning_rate": 0.1, "b2": jnp.asarray(1.0)}, "b2"),
    (curvopt.egn, {"damping": jnp.asarray(-1.0)}, "damping"),
    (curvopt.newton_cg, {"learning_rate": 1.0, "damping": None}, "damping"),
    (lambda **kw: curvopt.sam(optax.sgd(0.1), **kw), {"rho": jnp.asarray(math.nan)}, "rho"),
    (curvopt.psgd_kron, {"learning_rate": 0.1, "max_update_rms": 0.0}, "max_update_rms"),
    (curvopt.sophia_h, {"learning_rate": 0.1, "clip_threshold": 0.0}, "clip_threshold"),
    (curvopt.egn, {"momentum": 1.5}, "momentum"),
    (curvopt.egn, {"learning_rate": math.inf}, "learning_rate"),
    (curvopt.lazy_newton, {"learning_rate": math.inf}, "learning_rate"),
    (curvopt.shampoo, {"learning_rate": 0.1, "epsilon": math.nan}, "epsilon"),
  ],
)
def test_values_that_make_an_optimizer_a_no_op_or_unstable_are_named(factory, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    factory(**kwargs)


@pytest.mark.parametrize("seed", ["abc", 1.5, 2**70, -1, True], ids=repr)
@pytest.mark.parametrize(
  "factory",
  [curvopt.adahessian, curvopt.sophia_h, curvopt.psgd_kron, curvopt.psgd_lra, curvopt.lazy_newton],
  ids=lambda f: f.__name__,
)
def test_a_bad_seed_is_named_when_the_optimizer_is_built(factory, seed):
  kwargs = {} if factory is curvopt.lazy_newton else {"learning_rate": 0.1}
  with pytest.raises((ValueError, TypeError), match="seed"):
    factory(seed=seed, **kwargs)


@pytest.mark.parametrize(
  "factory", [curvopt.adahessian, curvopt.psgd_kron, curvopt.lazy_newton], ids=lambda f: f.__name__
)
def test_a_prng_key_is_a_seed_too(factory):
  kwargs = {} if factory is curvopt.lazy_newton else {"learning_rate": 0.1}
  w = jnp.array([1.0, -2.0, 0.5])
  value_fn = lambda p: jnp.sum(p**2 + p**4)
  outputs = []
  for seed in (3, jax.random.key(3), jax.random.PRNGKey(3)):
    opt = factory(seed=seed, **kwargs)
    updates, _ = opt.update(jax.grad(value_fn)(w), opt.init(w), w, value_fn=value_fn)
    outputs.append(updates)
  chex.assert_trees_all_equal(outputs[0], outputs[1])
  chex.assert_trees_all_equal(outputs[0], outputs[2])


_VALUE_FN_OPTIMIZERS = {
  "adahessian": lambda: curvopt.adahessian(0.1),
  "sophia_h": lambda: curvopt.sophia_h(0.1),
  "sam": lambda: curvopt.sam(optax.sgd(0.1)),
  "gam": lambda: curvopt.gam(optax.sgd(0.1)),
  "psgd_kron_newton": lambda: curvopt.psgd_kron(0.1, fit="newton"),
  "lazy_newton": lambda: curvopt.lazy_newton(),
}


@pytest.mark.parametrize("name", sorted(_VALUE_FN_OPTIMIZERS))
@pytest.mark.parametrize(
  ("value_fn", "match"),
  [
    (lambda p: p**2, r"value_fn must return a scalar \(the mean loss\), got an array of shape"),
    (lambda p: jnp.sum(p**2).astype(jnp.int32), r"value_fn must return a floating-point scalar"),
    (lambda p: (jnp.sum(p**2), 1.0), r"value_fn must return a scalar array, got a tuple"),
  ],
  ids=["vector", "int", "loss_and_aux"],
)
def test_a_value_fn_that_is_not_a_scalar_loss_is_named(name, value_fn, match):
  opt, w = _VALUE_FN_OPTIMIZERS[name](), jnp.ones(3)
  with pytest.raises((ValueError, TypeError), match=match):
    opt.update(w, opt.init(w), w, value_fn=value_fn)


@pytest.mark.parametrize("factory", [curvopt.sam, curvopt.gam], ids=lambda f: f.__name__)
@pytest.mark.parametrize("base", [0.1, None])
def test_sam_and_gam_say_their_first_argument_is_the_base_optimizer(factory, base):
  with pytest.raises(TypeError, match="first argument is the base optax optimizer"):
    factory(base)


def test_the_guard_checks_the_parameters_it_would_produce_not_only_the_updates():
  """Finite updates that overflow float16 parameters are skipped (and counted)."""
  params = jnp.array([65000.0, 1.0], jnp.float16)
  opt = curvopt.sam(optax.sgd(2000.0))
  value_fn = lambda w: -jnp.sum(w.astype(jnp.float32))
  updates, state = opt.update(
    jnp.array([-1.0, 1.0], jnp.float16), opt.init(params), params, value_fn=value_fn
  )
  assert bool(jnp.all(jnp.isfinite(optax.apply_updates(params, updates))))
  assert int(state.skipped) == 1
  # Within range the same step is applied.
  small = jnp.array([1.0, 1.0], jnp.float16)
  updates, state = opt.update(
    jnp.array([-1.0, 1.0], jnp.float16), opt.init(small), small, value_fn=value_fn
  )
  assert int(state.skipped) == 0 and float(jnp.abs(updates).max()) > 0


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_not_finite"])
def test_multisteps_needs_skip_not_finite_to_survive_one_nan_gradient(skip):
  """optax.MultiSteps accumulates outside the guard: one NaN poisons its accumulator
  unless `should_skip_update_fn=optax.skip_not_finite` drops that gradient."""
  a, b = jnp.diag(jnp.array([1.0, 3.0, 10.0])), jnp.array([1.0, -2.0, 0.5])
  loss = lambda w: 0.5 * w @ a @ w - b @ w
  kwargs = {"should_skip_update_fn": optax.skip_not_finite} if skip else {}
  opt = optax.MultiSteps(curvopt.adahessian(0.1), 4, **kwargs)

  def step(carry, t):
    w, state = carry
    g = jax.grad(loss)(w)
    g = jnp.where(t == 5, g.at[0].set(jnp.nan), g)
    updates, state = opt.update(g, state, w, value_fn=loss)
    return (optax.apply_updates(w, updates), state), None

  w = jnp.zeros(3)
  (w, _), _ = jax.lax.scan(step, (w, opt.init(w)), jnp.arange(200))
  optimum = float(loss(jnp.linalg.solve(a, b)))
  assert bool(jnp.all(jnp.isfinite(w)))
  if skip:
    assert float(loss(w)) == pytest.approx(optimum, abs=1e-3)
  else:  # documented failure mode: stuck far from the optimum
    assert float(loss(w)) > optimum + 0.5


@pytest.mark.parametrize("name", registry())
def test_every_state_is_savable_by_plain_orbax(name, tmp_path):
  """How users checkpoint params and state together; orbax refuses zero-size arrays."""
  ocp = pytest.importorskip("orbax.checkpoint")
  params, model_fn, _ = _parabola()
  extra = extra_args(model_fn)
  opt = OPTIMIZERS[name].make()
  state = opt.init(params)
  _, state = opt.update(jax.grad(extra["value_fn"])(params), state, params, **extra)
  assert all(x.size > 0 for x in jax.tree.leaves(state)), "a zero-size leaf"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", state)
  raw = lambda t: jax.tree.map(
    lambda x: jax.random.key_data(x) if curvopt._tree.is_key(x) else x, t
  )
  chex.assert_trees_all_equal(raw(restored), raw(state))


@pytest.mark.parametrize(
  ("factory", "kwargs"),
  [
    (curvopt.shampoo, {"learning_rate": 0.1}),
    (curvopt.soap, {"learning_rate": 0.1}),
    (curvopt.adahessian, {"learning_rate": 0.1, "refresh_every": 2}),
    (curvopt.psgd_kron, {"learning_rate": 0.1, "max_skew": 2.0}),
  ],
  ids=["shampoo", "soap", "adahessian", "psgd_kron"],
)
def test_inject_hyperparams_names_the_static_args_a_structural_argument_needs(factory, kwargs):
  """optax.inject_hyperparams turns every numeric argument, defaults included, into an array:
  one that sets shapes or loop counts must be static, and the error says so by name."""
  with pytest.raises(
    TypeError, match=r"curvopt.inject_hyperparams\(optimizer\).*static_args=\('\w+', \.\.\.\)"
  ):
    optax.inject_hyperparams(factory)(**kwargs).init({"w": jnp.ones((3, 4))})


# --- Checkpoints refuse what they cannot restore faithfully. ---------------


@pytest.mark.parametrize(
  ("saved", "target"),
  [
    (lambda: curvopt.sam(optax.sgd(0.1)), lambda: curvopt.gam(optax.sgd(0.1))),
    (lambda: curvopt.psgd_kron(0.1), lambda: curvopt.psgd_kron(0.1, fit="newton")),
    (lambda: curvopt.adahessian(0.1), lambda: curvopt.sophia_h(0.1)),
  ],
  ids=["sam_into_gam", "psgd_whitening_into_newton", "adahessian_into_sophia"],
)
def test_a_checkpoint_of_another_optimizer_is_refused(saved, target, tmp_path):
  w = jnp.ones(3)
  curvopt.checkpoint.save(tmp_path / "ckpt", saved().init(w))
  with pytest.raises(ValueError, match="different trees"):
    curvopt.checkpoint.restore(tmp_path / "ckpt", jax.eval_shape(target().init, w))
  curvopt.checkpoint.restore(tmp_path / "ckpt", jax.eval_shape(saved().init, w))  # its own: fine


@pytest.mark.parametrize(
  ("saved", "target", "match"),
  [
    (
      {"a": jnp.float32(3e9)},
      {"a": jnp.int32(0)},
      r"leaf \['a'\] has dtype float32, the target int32",
    ),
    ({"a": jnp.ones(5)}, {"a": jnp.ones(4)}, r"leaf \['a'\] has shape \[5\], the target \[4\]"),
  ],
  ids=["dtype", "shape"],
)
def test_restore_names_the_leaf_and_both_shapes_or_dtypes(saved, target, match, tmp_path):
  curvopt.checkpoint.save(tmp_path / "ckpt", saved)
  with pytest.raises(ValueError, match=match):
    curvopt.checkpoint.restore(tmp_path / "ckpt", target)


def test_saves_from_several_threads_all_finish(tmp_path):
  import threading

  trees = [{"x": jnp.full(3, float(i))} for i in range(8)]
  threads = [
    threading.Thread(target=curvopt.checkpoint.save, args=(tmp_path / f"c{i}", tree))
    for i, tree in enumerate(trees)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in threads)
  for i, tree in enumerate(trees):
    chex.assert_trees_all_equal(curvopt.checkpoint.restore(tmp_path / f"c{i}", tree), tree)


def test_psgd_dense_refuses_a_model_too_large_for_a_dense_preconditioner():
  big = {"w": jax.ShapeDtypeStruct((100_000,), jnp.float32)}
  with pytest.raises(ValueError, match=r"100000 x 100000 preconditioner \(37.3 GiB"):
    jax.eval_shape(curvopt.psgd_dense(0.1).init, big)
  jax.eval_shape(curvopt.psgd_dense(0.1, max_dimension=200_000).init, big)  # when meant


@pytest.mark.parametrize("name", registry())
@pytest.mark.parametrize("empty", [{}, {"a": {}}, ()], ids=["dict", "nested", "tuple"])
def test_empty_parameters_give_empty_updates(name, empty):
  """Legal in optax (a frozen model, a masked-out group): nothing to do, no error."""
  params, model_fn, _ = _parabola()
  opt = OPTIMIZERS[name].make()
  extra = extra_args(model_fn)
  state = opt.init(empty)
  updates, _ = jax.jit(lambda s: opt.update(empty, s, empty, **extra))(state)
  assert updates == empty
  # optax.tree.map_params still sees the parameter-shaped parts of a real state.
  optax.tree.map_params(opt, lambda x: x, opt.init(params))


def _two_leaf_problem():
  k = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k[0], (4, 3)), "b": jax.random.normal(k[1], (3,))}
  x = jax.random.normal(k[2], (16, 4))

  def model_fn(p):
    return jnp.tanh(x @ p["w"] + p["b"])

  def loss_fn(outputs):
    return jnp.mean(outputs**2)

  return params, model_fn, loss_fn


_LOSS_OPTIMIZERS = {
  **_VALUE_FN_OPTIMIZERS,
  "egn": lambda: curvopt.egn(0.5, damping=1e-2),
}


@pytest.mark.parametrize("name", sorted(_LOSS_OPTIMIZERS))
def test_masked_equals_the_same_optimizer_on_the_sub_tree(name):
  params, model_fn, loss_fn = _two_leaf_problem()
  mask = {"w": True, "b": False}
  tx, ref = curvopt.masked(_LOSS_OPTIMIZERS[name](), mask), _LOSS_OPTIMIZERS[name]()
  state, ref_state = tx.init(params), ref.init(params["w"])

  def on_w(fn, p):
    return lambda w: fn({"w": w, "b": p["b"]})

  p = params
  for _ in range(3):
    loss = lambda q: loss_fn(model_fn(q))
    grads = jax.grad(loss)(p)
    updates, state = tx.update(grads, state, p, value_fn=loss, model_fn=model_fn, loss_fn=loss_fn)
    ref_updates, ref_state = ref.update(
      grads["w"],
      ref_state,
      p["w"],
      value_fn=on_w(loss, p),
      model_fn=on_w(model_fn, p),
      loss_fn=loss_fn,
    )
    chex.assert_trees_all_close(updates["w"], ref_updates, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_equal(updates["b"], grads["b"])  # masked-out leaves pass through
    p = optax.apply_updates(p, updates)


@pytest.mark.parametrize("name", ["adahessian", "sophia_h", "egn"])
def test_multi_transform_gives_each_group_the_full_parameters(name):
  params, model_fn, loss_fn = _two_leaf_problem()
  loss = lambda q: loss_fn(model_fn(q))
  labels = {"w": "curved", "b": "plain"}
  tx = curvopt.multi_transform(
    {"curved": _LOSS_OPTIMIZERS[name](), "plain": optax.adam(0.1)}, labels
  )
  alone = curvopt.masked(_LOSS_OPTIMIZERS[name](), {"w": True, "b": False})
  grads = jax.grad(loss)(params)
  extra = {"value_fn": loss, "model_fn": model_fn, "loss_fn": loss_fn}
  updates, _ = tx.update(grads, tx.init(params), params, **extra)
  expected, _ = alone.update(grads, alone.init(params), params, **extra)
  adam, _ = optax.adam(0.1).update(grads["b"], optax.adam(0.1).init(params["b"]))
  chex.assert_trees_all_close(updates["w"], expected["w"])
  chex.assert_trees_all_close(updates["b"], adam)


@pytest.mark.parametrize("name", sorted(_LOSS_OPTIMIZERS))
@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_plain_optax_masking_of_a_loss_optimizer_says_to_use_curvopts(name, wrapper):
  params, model_fn, loss_fn = _two_leaf_problem()
  if wrapper == "masked":
    tx = optax.masked(_LOSS_OPTIMIZERS[name](), {"w": True, "b": False})
  else:
    tx = optax.multi_transform(
      {"a": _LOSS_OPTIMIZERS[name](), "b": optax.sgd(0.1)}, {"w": "a", "b": "b"}
    )
  loss = lambda q: loss_fn(model_fn(q))
  with pytest.raises(TypeError, match=r"use curvopt\.masked or curvopt\.multi_transform"):
    tx.update(
      jax.grad(loss)(params),
      tx.init(params),
      params,
      value_fn=loss,
      model_fn=model_fn,
      loss_fn=loss_fn,
    )


@pytest.mark.parametrize(
  "name",
  # The helper is optimizer-independent: a Hessian-product and a perturbation method by
  # default, the rest in the slow tier.
  [
    n if n in ("adahessian", "sam") else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(_VALUE_FN_OPTIMIZERS)
  ],
)
def test_nnx_value_fn_helper_on_a_model_with_batchnorm_and_dropout(name):
  nnx = pytest.importorskip("flax.nnx")
  import curvopt.nnx

  model = nnx.Sequential(
    nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
    nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)),
    nnx.Linear(8, 3, rngs=nnx.Rngs(2)),
  )
  optimizer = nnx.Optimizer(model, _VALUE_FN_OPTIMIZERS[name](), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(3), (16, 4))
  labels = jnp.arange(16) % 3

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

  @nnx.jit
  def train_step(model, optimizer):
    value_fn = curvopt.nnx.value_fn(model, loss_fn)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    stats = nnx.state(model, nnx.BatchStat)
    same_loss = value_fn(nnx.state(model, nnx.Param))  # the gradient pass's dropout mask
    optimizer.update(model, grads, value_fn=value_fn)
    return loss, same_loss, stats, nnx.state(model, nnx.BatchStat)

  for _ in range(2):
    loss, same_loss, stats_before, stats_after = train_step(model, optimizer)
    assert math.isfinite(float(loss))
    assert float(same_loss) == pytest.approx(float(loss), rel=1e-6)
    # The optimizer's own loss evaluations never move the running averages.
    chex.assert_trees_all_equal(stats_before, stats_after)


def test_linen_apply_gradients_forwards_value_fn():
  nn = pytest.importorskip("flax.linen")
  from flax.training import train_state

  import curvopt.linen

  model, x = nn.Dense(2), jnp.ones((4, 3))
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=model.init(jax.random.key(0), x)["params"],
    tx=curvopt.adahessian(0.1),
  )

  def loss(p):
    return jnp.mean((state.apply_fn({"params": p}, x) - 1.0) ** 2)

  grads = jax.grad(loss)(state.params)
  with pytest.raises(TypeError, match=r"curvopt\.linen\.apply_gradients"):
    state.apply_gradients(grads=grads)
  new = curvopt.linen.apply_gradients(state, grads=grads, value_fn=loss)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value_fn=loss)
  chex.assert_trees_all_close(new.params, optax.apply_updates(state.params, updates))
  # The optimizer's state moves on (AdaHessian's moments and counter), not kept or dropped.
  chex.assert_trees_all_equal(new.opt_state, opt_state)
  assert int(new.step) == 1


def test_nnx_value_fn_refuses_a_non_module_and_a_non_callable_loss_by_name():
  nnx = pytest.importorskip("flax.nnx")
  import curvopt.nnx

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError) as caught:
    curvopt.nnx.value_fn({"w": jnp.ones(2)}, lambda m: 0.0)
  assert str(caught.value) == "model must be a flax.nnx.Module, got dict."
  with pytest.raises(TypeError) as caught:
    curvopt.nnx.value_fn(model, "loss")
  assert str(caught.value) == "loss_fn must be a callable loss_fn(model), got 'loss'."


@pytest.mark.parametrize(
  "factory",
  [
    pytest.param(lambda: curvopt.psgd_kron(0.1), id="kron"),
    pytest.param(lambda: curvopt.psgd_kron(0.1, fit="newton"), id="kron_newton"),
    # The damping rule is the driver's, shared by every family: one family by default.
    pytest.param(lambda: curvopt.psgd_lra(0.1), id="lra", marks=pytest.mark.slow),
    pytest.param(lambda: curvopt.psgd_dense(0.1), id="dense", marks=pytest.mark.slow),
  ],
)
def test_psgd_is_invariant_to_the_loss_scale(factory):
  w0 = {"a": jnp.ones((4, 3), jnp.float32), "b": jnp.ones(3, jnp.float32)}

  def run(scale):
    def loss(w):
      return scale * sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(w))

    opt = factory()

    def step(carry, _):
      w, state = carry
      updates, state = opt.update(jax.grad(loss)(w), state, w, value_fn=loss)
      return (optax.apply_updates(w, updates), state), None

    (w, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=30))((w0, opt.init(w0)))
    return float(loss(w) / scale), int(state.skipped)

  small, skipped = run(1e-30)
  unit, _ = run(1.0)
  assert skipped == 0
  assert small == pytest.approx(unit, rel=1e-3)
  assert small < 0.1 * 3.75  # it trains: the loss starts at 3.75


@pytest.mark.parametrize("mode", ["dense", "matrix_free"])
@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_lazy_newton_steps_at_any_loss_scale(mode, scale):
  w = jnp.array([1.0, -2.0, 0.5], jnp.float32)

  def loss(w):
    return jnp.sum((w - 1.5) ** 2) + 0.1 * jnp.sum(w**4)

  def scaled(w):
    return scale * loss(w)

  opt = curvopt.lazy_newton(mode=mode, krylov_dim=3)
  step, state = opt.update(jax.grad(scaled)(w), opt.init(w), w, value_fn=scaled)
  # At a large scale M = 1 is negligible: the step is Newton's.
  newton = -jnp.linalg.solve(jax.hessian(loss)(w), jax.grad(loss)(w))
  chex.assert_trees_all_close(step, newton, rtol=1e-3)
  assert int(state.inner_state[0].rejected_steps) == 0


def test_lazy_newton_counts_the_steps_it_rejects():
  w = jnp.ones(3, jnp.float32)
  opt = curvopt.lazy_newton(max_doublings=1)
  # A loss whose value rises whatever the step: every search runs out.
  value_fn = lambda p: jnp.sum(p**2) + 1e3 * jnp.sum(jnp.abs(p - 1.0))
  step, state = opt.update(jnp.ones(3), opt.init(w), w, value_fn=value_fn)
  chex.assert_trees_all_equal(step, jnp.zeros(3))
  assert int(state.inner_state[0].rejected_steps) == 1


@pytest.mark.slow  # two 60-step training runs of the dense preconditioner
def test_psgd_dense_default_clip_keeps_a_large_learning_rate_finite():
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (64, 4))
  y = jnp.sin(x @ jax.random.normal(k[1], (4, 1)))
  p0 = {"w1": jax.random.normal(k[2], (4, 16)), "w2": 0.1 * jax.random.normal(k[3], (16, 1))}

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

  def run(opt):
    def step(carry, _):
      p, s = carry
      u, s = opt.update(jax.grad(loss)(p), s, p, value_fn=loss)
      rms = jnp.stack([jnp.sqrt(jnp.mean(v**2)) for v in jax.tree.leaves(u)])
      return (optax.apply_updates(p, u), s), (loss(p), jnp.max(rms))

    (p, s), (losses, rms) = jax.jit(lambda c: jax.lax.scan(step, c, length=60))((p0, opt.init(p0)))
    return p, s, losses, rms

  # psgd_torch's DenseNewton does not clip: its updates grow until they overflow.
  _, unclipped, losses, _ = run(curvopt.psgd_dense(1.0, max_update_rms=None))
  assert not float(losses.max()) < 1e6 or int(unclipped.skipped) > 0  # NaN counts too
  _, state, losses, rms = run(curvopt.psgd_dense(1.0))
  assert all(math.isfinite(float(v)) for v in losses)
  assert int(state.skipped) == 0
  assert float(rms.max()) <= 1.1 * (1 + 1e-5)
  # Where the clip does not bind, it changes nothing.
  _, _, clipped, _ = run(curvopt.psgd_dense(0.3))
  _, _, free, _ = run(curvopt.psgd_dense(0.3, max_update_rms=None))
  chex.assert_trees_all_close(clipped, free)


def _boolean_switches():
  for name in sorted(n for n in dir(curvopt.alias) if not n.startswith("_")):
    for argument, parameter in inspect.signature(getattr(curvopt, name)).parameters.items():
      if isinstance(parameter.default, bool):
        yield name, argument


@pytest.mark.parametrize(("name", "argument"), list(_boolean_switches()))
@pytest.mark.parametrize("bad", ["no", 1, None], ids=repr)
def test_every_boolean_switch_takes_only_true_or_false(name, argument, bad):
  """A truthy string or 1 would silently pick a branch; `None` would silently mean False."""
  base = (optax.sgd(0.1),) if name in ("sam", "gam") else (0.1,)
  with pytest.raises(TypeError, match=f"{argument} must be True or False"):
    getattr(curvopt, name)(*base, **{argument: bad})
