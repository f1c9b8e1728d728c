"""Optimizer state stored in a low precision (`state_dtype`), computed in float32."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt.transforms import with_state_dtype

WITH_STATE_DTYPE = [
  "adahessian",
  "sophia_h",
  "soap",
  "shampoo",
  "psgd_kron",
  "psgd_lra",
  "psgd_dense",
  "psgd_muon",
]


# Statistics a named optimizer keeps as computed under state_dtype, by state field.
KEPT_FLOAT32 = {"shampoo": ("statistics",)}


def _kept_as_computed(state, fields):
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return [x for path, x in leaves if any(getattr(entry, "name", None) in fields for entry in path)]


def _problem():
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (64, 12), jnp.float32)
  target = jnp.tanh(x @ jax.random.normal(key_w, (12, 6), jnp.float32))
  params = {"w": jnp.zeros((12, 6), jnp.float32), "b": jnp.zeros(6, jnp.float32)}
  value_fn = lambda p: jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - target) ** 2)
  return params, value_fn


def _train(opt, steps=40):
  params, value_fn = _problem()
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn)
    return optax.apply_updates(p, updates), s, updates

  for _ in range(steps):
    params, state, updates = step(params, state)
  return float(value_fn(params)), state, updates


@pytest.mark.parametrize("name", WITH_STATE_DTYPE)
def test_bfloat16_state_halves_the_bytes_and_trains_like_float32(name):
  factory = getattr(curvopt, name)
  params, value_fn = _problem()
  start = float(value_fn(params))
  f32_loss, _, _ = _train(factory(0.02))
  bf16_loss, state, updates = _train(factory(0.02, state_dtype=jnp.bfloat16))
  kept = _kept_as_computed(state, KEPT_FLOAT32.get(name, ()))
  low = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert low and all(x.dtype == jnp.bfloat16 for x in low if not any(x is k for k in kept))
  assert all(k.dtype == jnp.float32 for k in kept)
  chex.assert_trees_all_equal_dtypes(updates, params)  # updates in the parameters' dtype
  assert int(state.skipped) == 0
  # Both descend, and bfloat16 storage ends near float32 (relative to the descent).
  assert math.isfinite(bf16_loss) and f32_loss < 0.9 * start
  assert abs(bf16_loss - f32_loss) < 0.1 * (start - f32_loss)
  f32_bytes = curvopt.state_size(factory(0.02), params).total_bytes
  bf16_bytes = curvopt.state_size(factory(0.02, state_dtype=jnp.bfloat16), params).total_bytes
  kept_bytes = sum(k.nbytes for k in kept)  # the same in both precisions
  assert bf16_bytes - kept_bytes <= 0.55 * (f32_bytes - kept_bytes)


def test_stochastic_rounding_keeps_a_slow_ema_moving():
  # b2 = 0.999 moves nu by 0.1% a step; a bfloat16 step is 0.8%: rounded to nearest nu
  # never leaves its first value.
  exact = 4 - (4 - 0.001) * 0.999**2000
  got = {}
  for rounding in (True, False):
    tx = with_state_dtype(optax.scale_by_adam(b2=0.999), jnp.bfloat16, stochastic_rounding=rounding)
    state = tx.init(jnp.zeros(1000, jnp.float32))
    _, state = tx.update(jnp.ones(1000, jnp.float32), state)
    update = jax.jit(tx.update)
    for _ in range(2000):
      _, state = update(jnp.full(1000, 2.0, jnp.float32), state)
    got[rounding] = float(jnp.mean(state.inner_state.nu.astype(jnp.float32)))
  assert got[True] == pytest.approx(exact, rel=5e-3)
  assert got[False] == pytest.approx(1.0, rel=1e-2)


def test_stochastic_rounding_is_unbiased_and_within_one_bfloat16_step():
  x = jnp.full(100_000, 1.0 + 2**-10, jnp.float32)  # a quarter of the way to the next step
  rounded = curvopt.transforms._precision._stochastic_round_to_bfloat16(x, jax.random.key(0))
  values = np.unique(np.asarray(rounded.astype(jnp.float32)))
  np.testing.assert_array_equal(values, [1.0, 1.0 + 2**-7])
  assert float(jnp.mean(rounded.astype(jnp.float32))) == pytest.approx(1.0 + 2**-10, rel=1e-4)
  special = jnp.array([jnp.inf, -jnp.inf, 0.0, -0.0], jnp.float32)
  out = curvopt.transforms._precision._stochastic_round_to_bfloat16(special, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(special))
  # Above bfloat16's largest finite value the next one up is infinity: never NaN.
  near_max = jnp.full(10_000, 3.4e38, jnp.float32)
  out = curvopt.transforms._precision._stochastic_round_to_bfloat16(near_max, jax.random.key(2))
  largest = float(jnp.finfo(jnp.bfloat16).max)
  assert set(np.unique(np.asarray(out.astype(jnp.float32)))) == {largest, np.inf}


def test_counts_and_keys_are_never_cast():
  tx = with_state_dtype(curvopt.sophia_h(0.1), jnp.bfloat16)
  state = tx.init(jnp.ones(3, jnp.float32))
  ints = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.integer)]
  assert ints and all(x.dtype in (jnp.int32, jnp.uint32) for x in ints)
  keys = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]
  assert keys  # Sophia-H's probe key survives as a key


@pytest.mark.parametrize("bad", ["int8", jnp.int32, "not_a_dtype", 3, math.nan, math.inf])
def test_a_state_dtype_that_is_not_floating_is_named(bad):
  with pytest.raises(TypeError, match="state_dtype must be a floating-point dtype"):
    curvopt.soap(0.1, state_dtype=bad)


def test_bfloat16_state_checkpoints_and_is_structural_under_inject_hyperparams(tmp_path):
  assert "state_dtype" in curvopt.structural_args(curvopt.soap)
  opt = curvopt.inject_hyperparams(curvopt.soap)(learning_rate=0.01, state_dtype=jnp.bfloat16)
  params, value_fn = _problem()
  state = opt.init(params)
  _, state = opt.update(jax.grad(value_fn)(params), state, params)
  curvopt.checkpoint.save(tmp_path / "c", state)
  restored = curvopt.checkpoint.restore(tmp_path / "c", jax.eval_shape(lambda: state))
  chex.assert_trees_all_equal(restored, state)


def test_field_dtypes_keep_a_named_statistic_exact():
  # Adam's nu depends on the gradients alone, so kept as computed it equals plain Adam's
  # exactly while mu beside it is stored in bfloat16.
  grads = [jax.random.normal(jax.random.key(i), (5,), jnp.float32) for i in range(6)]
  kept = with_state_dtype(optax.scale_by_adam(), jnp.bfloat16, field_dtypes={"nu": None})
  plain = optax.scale_by_adam()
  ones = jnp.ones(5, jnp.float32)
  kept_state, plain_state = kept.init(ones), plain.init(ones)
  for g in grads:
    _, kept_state = jax.jit(kept.update)(g, kept_state)
    _, plain_state = jax.jit(plain.update)(g, plain_state)
  assert kept_state.inner_state.mu.dtype == jnp.bfloat16
  assert kept_state.inner_state.nu.dtype == jnp.float32
  np.testing.assert_array_equal(kept_state.inner_state.nu, plain_state.nu)
  assert not np.array_equal(kept_state.inner_state.mu.astype(jnp.float32), plain_state.mu)


def test_field_dtypes_alone_lower_only_their_fields_and_float64_stays_float64():
  # The suite runs with float64 enabled (conftest).
  tx = with_state_dtype(optax.scale_by_adam(), None, field_dtypes={"mu": jnp.float16})
  state = tx.init(jnp.ones(3, jnp.float64))
  assert (state.inner_state.mu.dtype, state.inner_state.nu.dtype) == (jnp.float16, jnp.float64)
  updates, state = tx.update(jnp.ones(3, jnp.float64), state)
  assert updates.dtype == jnp.float64
  assert (state.inner_state.mu.dtype, state.inner_state.nu.dtype) == (jnp.float16, jnp.float64)


def _shampoo_core(state):
  """`scale_by_shampoo`'s state inside the named optimizer's wrappers."""
  found = []
  jax.tree.map(
    lambda x: found.append(x) if hasattr(x, "roots") else None,
    state,
    is_leaf=lambda x: hasattr(x, "roots"),
  )
  (core,) = found
  return core


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


@pytest.mark.parametrize(
  "kwargs, statistics, roots",
  [
    # state_dtype leaves the statistics as computed: bfloat16 ones cost 3% on a GPT.
    ({"state_dtype": jnp.bfloat16}, "float32", "bfloat16"),
    ({"state_dtype": jnp.bfloat16, "statistics_dtype": "bfloat16"}, "bfloat16", "bfloat16"),
    ({"state_dtype": jnp.bfloat16, "root_dtype": jnp.float32}, "float32", "float32"),
    ({"root_dtype": "bfloat16"}, "float32", "bfloat16"),
    ({"statistics_dtype": "bfloat16"}, "bfloat16", "float32"),
    ({}, "float32", "float32"),
  ],
)
def test_shampoo_stores_its_statistics_and_roots_in_their_own_dtypes(kwargs, statistics, roots):
  params, value_fn = _problem()
  loss, state, _ = _train(curvopt.shampoo(0.02, **kwargs), steps=12)
  core = _shampoo_core(state)
  assert (_dtypes(core.statistics), _dtypes(core.roots)) == ({statistics}, {roots})
  kept = _kept_as_computed(state, ("statistics", "roots"))
  floats = {
    str(x.dtype)
    for x in jax.tree.leaves(state)
    if jnp.issubdtype(x.dtype, jnp.floating) and not any(x is k for k in kept)
  }
  assert floats == {"bfloat16" if "state_dtype" in kwargs else "float32"}
  assert math.isfinite(loss) and loss < float(value_fn(params))
  assert {"root_dtype", "statistics_dtype"} <= set(curvopt.structural_args(curvopt.shampoo))


@pytest.mark.parametrize("argument", ["root_dtype", "statistics_dtype"])
@pytest.mark.parametrize("bad", ["int8", "flaot32", 3, math.nan, math.inf])
def test_a_per_statistic_dtype_that_is_not_floating_is_named(argument, bad):
  with pytest.raises(TypeError, match=f"{argument} must be a floating-point dtype"):
    curvopt.shampoo(0.1, state_dtype=jnp.bfloat16, **{argument: bad})


@pytest.mark.parametrize("bad", [["nu"], {1: jnp.float16}, "nu"])
def test_field_dtypes_that_are_not_a_mapping_of_names_are_named(bad):
  with pytest.raises(TypeError, match="field_dtypes must map state field names"):
    with_state_dtype(optax.scale_by_adam(), jnp.bfloat16, field_dtypes=bad)


@pytest.mark.parametrize("bad", ["int8", "flaot32", math.nan])
def test_a_field_dtype_that_is_not_floating_is_named_with_its_field(bad):
  with pytest.raises(TypeError, match=r"field_dtypes\['nu'\] must be a floating-point dtype"):
    with_state_dtype(optax.scale_by_adam(), None, field_dtypes={"nu": bad})


def _adam_states(tx, steps=3):
  grads = [jax.random.normal(jax.random.key(i), (64,), jnp.float32) for i in range(steps)]
  state = tx.init(jnp.zeros(64, jnp.float32))
  for g in grads:
    _, state = jax.jit(tx.update)(g, state)
  return state


def test_the_defaults_round_stochastically_from_seed_zero_and_count_steps():
  default = _adam_states(with_state_dtype(optax.scale_by_adam(), jnp.bfloat16))
  spelled = _adam_states(
    with_state_dtype(optax.scale_by_adam(), jnp.bfloat16, stochastic_rounding=True, seed=0)
  )
  chex.assert_trees_all_equal(default, spelled)
  assert default.count.dtype == jnp.uint32 and int(default.count) == 3  # steps taken
  for other in ({"seed": 1}, {"stochastic_rounding": False}):
    changed = _adam_states(with_state_dtype(optax.scale_by_adam(), jnp.bfloat16, **other))
    assert not np.array_equal(changed.inner_state.nu, default.inner_state.nu), other


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"stochastic_rounding": "yes"}, r"^stochastic_rounding must be True or False"),
    ({"seed": 1.5}, r"^seed must be an integer seed"),
  ],
)
def test_with_state_dtype_arguments_are_refused_by_name(kwargs, message):
  with pytest.raises(TypeError, match=message):
    with_state_dtype(optax.scale_by_adam(), jnp.bfloat16, **kwargs)


def _mixed_state_transform():
  """A state of a float32 moment, a bfloat16 buffer, a float64 sum and a Python number."""

  def init(params):
    return {
      "m": jnp.zeros_like(params),
      "buffer": jnp.zeros_like(params, jnp.bfloat16),
      "total": jnp.zeros((), jnp.float64),
      "scale": 0.5,
    }

  def update(updates, state, params=None):
    new = {
      "m": state["m"] + updates,
      "buffer": (state["buffer"] + 1).astype(state["buffer"].dtype),
      "total": state["total"] + 1e-9,
      "scale": state["scale"],
    }
    return updates * state["scale"], new

  return optax.GradientTransformation(init, update)


def test_only_wider_floats_are_lowered_and_a_kept_field_keeps_its_own_dtype():
  """float16 storage lowers the float32 moment, leaves the bfloat16 buffer (as narrow, not
  wider), the Python number, and a float64 sum kept by `field_dtypes` (dict keys as names)."""
  tx = with_state_dtype(_mixed_state_transform(), jnp.float16, field_dtypes={"total": None})
  g = jnp.array([1.0, 2.5], jnp.float32)
  state = tx.init(g)
  for _ in range(4):
    updates, state = tx.update(g, state)
  inner = state.inner_state
  assert inner["m"].dtype == jnp.float16 and inner["buffer"].dtype == jnp.bfloat16
  assert inner["scale"] == 0.5 and updates.dtype == jnp.float32
  assert inner["total"].dtype == jnp.float64 and float(inner["total"]) == 1e-9 + 1e-9 + 1e-9 + 1e-9
  np.testing.assert_array_equal(inner["m"], np.array([4.0, 10.0], np.float16))


def test_the_inner_transform_runs_in_the_working_dtype_with_its_extra_arguments():
  """float32 parameters under float64-enabled JAX: the state comes back as float32, not the
  default float, and Sophia-H receives its `value_fn`."""
  params, value_fn = _problem()
  tx = with_state_dtype(curvopt.sophia_h(0.1), jnp.bfloat16)
  state = tx.init(params)
  seen = []
  inner = optax.stateless(lambda u, p: seen.append(jax.tree.leaves(u)[0].dtype) or u)
  probe = with_state_dtype(optax.chain(optax.scale_by_adam(), inner), jnp.bfloat16)
  probe_state = probe.init(params)
  updates, probe_state = probe.update(params, probe_state)
  assert seen == [jnp.float32]  # Adam's moments were widened to float32, not float64
  assert jax.tree.leaves(updates)[0].dtype == jnp.float32
  updates, state = tx.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # The state arrives in the updates' working dtype: float64 ones get a float64 state.
  arrived = []
  recording = optax.GradientTransformation(
    lambda p: jnp.zeros_like(p), lambda u, m, p=None: (u, arrived.append(m.dtype) or m + u)
  )
  for dtype in (jnp.float32, jnp.float64):
    tx = with_state_dtype(recording, jnp.bfloat16)
    tx.update(jnp.ones(3, dtype), tx.init(jnp.ones(3, dtype)))
  assert arrived == [jnp.float32, jnp.float64]


def test_with_float32_statistics_keeps_float32_state_for_low_precision_parameters():
  """bfloat16 in: Adam (and weight decay, which reads the parameters) in float32, updates
  back in bfloat16; float64 stays float64; extra arguments reach the inner transform."""
  tx = curvopt.transforms.with_float32_statistics(
    optax.chain(optax.add_decayed_weights(0.1), optax.scale_by_adam())
  )
  reference = optax.chain(optax.add_decayed_weights(0.1), optax.scale_by_adam())
  params = jnp.array([0.3, -1.7, 2.2], jnp.bfloat16)
  grads = jnp.array([1e-3, 0.5, -2.0], jnp.bfloat16)
  state, ref_state = tx.init(params), reference.init(params.astype(jnp.float32))
  assert state[1].nu.dtype == jnp.float32
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, ref_state = reference.update(
      grads.astype(jnp.float32), ref_state, params.astype(jnp.float32)
    )
    assert updates.dtype == jnp.bfloat16
    np.testing.assert_array_equal(updates, expected.astype(jnp.bfloat16))
  chex.assert_trees_all_equal(state, ref_state)
  wide = tx.init(jnp.ones(2, jnp.float64))
  assert wide[1].nu.dtype == jnp.float64
  plain = curvopt.transforms.with_float32_statistics(optax.scale_by_adam())
  u, _ = plain.update(grads, plain.init(params))  # no parameters: none needed
  assert u.dtype == jnp.bfloat16
  sophia = curvopt.transforms.with_float32_statistics(curvopt.sophia_h(0.1))
  value_fn = lambda p: jnp.sum(p.astype(jnp.float32) ** 2)
  u, _ = sophia.update(grads, sophia.init(params), params, value_fn=value_fn)
  assert u.dtype == jnp.bfloat16
