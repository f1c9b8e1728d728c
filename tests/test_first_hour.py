"""Cases a new user meets in the first hour: each failed (silently or deep inside JAX)
before its fix. Silent wrong results first, then refusals, then frictions."""

from __future__ import annotations

import json
import math
import pathlib
import tomllib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt

# --- eps = 0 where eps keeps a denominator off zero --------------------------------


@pytest.mark.parametrize("factory", [curvopt.adahessian, curvopt.sophia_h, curvopt.soap])
@pytest.mark.parametrize("eps", [0.0, 0, np.float32(0.0), jnp.asarray(0.0)], ids=repr)
def test_eps_zero_is_refused_where_it_is_a_denominator_floor(factory, eps):
  # With eps = 0 a parameter the loss does not use got 0/0 and every step was skipped.
  with pytest.raises(ValueError, match=r"eps must be a finite number > 0 .*0/0"):
    factory(0.1, eps=eps)


@pytest.mark.parametrize("factory", [curvopt.adahessian, curvopt.sophia_h, curvopt.soap])
def test_a_parameter_the_loss_does_not_use_gets_zero_updates_at_the_default_eps(factory):
  params = {"used": jnp.array([1.0, -2.0]), "unused": jnp.array([0.5, 0.5])}
  value_fn = lambda p: jnp.sum(p["used"] ** 2)
  opt = factory(0.1, weight_decay=0.0)
  state = opt.init(params)
  for _ in range(3):
    grads = jax.grad(value_fn)(params)
    updates, state = opt.update(grads, state, params, value_fn=value_fn)
    params = optax.apply_updates(params, updates)
  assert int(state.skipped) == 0
  chex.assert_trees_all_equal(params["unused"], jnp.array([0.5, 0.5]))


# --- A NaN from a schedule is a skipped step, counted ------------------------------


def _least_squares():
  x = jax.random.normal(jax.random.key(0), (20, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5])
  return jnp.zeros(3), (lambda p: x @ p), (lambda out: jnp.mean((out - y) ** 2))


@pytest.mark.parametrize("adaptive_damping", [True, False])
def test_newton_cg_counts_a_step_its_schedule_made_nan(adaptive_damping):
  # The adaptive damping rejected the NaN step itself (and raised its damping), so the
  # step vanished without a mark in `skipped`.
  params, model_fn, loss_fn = _least_squares()
  schedule = lambda count: jnp.where(count == 2, jnp.nan, 0.5)
  opt = curvopt.newton_cg(schedule, adaptive_damping=adaptive_damping)
  state = opt.init(params)
  value_fn = lambda p: loss_fn(model_fn(p))
  for _ in range(3):
    before = state
    grads = jax.grad(value_fn)(params)
    updates, state = opt.update(grads, state, params, model_fn=model_fn, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
  assert int(state.skipped) == 1
  chex.assert_trees_all_equal(updates, jnp.zeros(3))
  chex.assert_trees_all_equal(state.inner_state, before.inner_state)  # damping untouched


# --- Damaged checkpoints name the file -------------------------------------------


def _saved(tmp_path):
  opt = curvopt.sophia_h(0.1)
  state = opt.init(jnp.ones(3))
  path = tmp_path / "step_3"
  curvopt.checkpoint.save(path, state)
  return path, state


@pytest.mark.parametrize("name", ["_METADATA", "_CHECKPOINT_METADATA", "curvopt_tree.json"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_file_is_named(tmp_path, name, damage):
  path, state = _saved(tmp_path)
  file = path / name
  data = file.read_bytes()
  if damage == "truncate":
    file.write_bytes(data[: len(data) // 2])
  else:
    file.write_bytes(b"\xff\xfe" + data[2:])
  with pytest.raises(curvopt.checkpoint.DamagedCheckpointError, match=f"damaged: {name}"):
    curvopt.checkpoint.restore(path, state)


def test_an_intact_checkpoint_still_restores(tmp_path):
  path, state = _saved(tmp_path)
  out = curvopt.checkpoint.restore(path, state)
  chex.assert_trees_all_equal(jax.tree.leaves(out), jax.tree.leaves(state))
  assert json.loads((path / "curvopt_tree.json").read_text())


def test_the_checkpoint_extra_names_orbax():
  project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
  extras = project["project"]["optional-dependencies"]
  assert any(d.startswith("orbax-checkpoint") for d in extras["checkpoint"])
  assert "curvopt[checkpoint]" in extras["test"]


# --- Integers that arrive as NumPy integers --------------------------------------


def test_psgd_lra_takes_a_numpy_integer_rank_like_a_python_one():
  params = jnp.linspace(-1.0, 1.0, 6)
  value_fn = lambda p: jnp.sum(p**4)
  runs = []
  for rank in (2, np.int64(2)):
    opt, p = curvopt.psgd_lra(0.05, rank=rank), params
    state = opt.init(p)
    for _ in range(3):
      updates, state = opt.update(jax.grad(value_fn)(p), state, p, value_fn=value_fn)
      p = optax.apply_updates(p, updates)
    runs.append(p)
  chex.assert_trees_all_equal(*runs)
  with pytest.raises(ValueError, match=r"rank must be a non-negative integer, got -1"):
    curvopt.psgd_lra(0.05, rank=np.int64(-1))
  with pytest.raises(TypeError, match=r"rank must be a non-negative integer, got 2.0"):
    curvopt.psgd_lra(0.05, rank=2.0)


# --- inject_hyperparams in one call ------------------------------------------------

NAMED = [
  "adahessian",
  "sophia_h",
  "soap",
  "shampoo",
  "psgd_kron",
  "psgd_lra",
  "psgd_dense",
  "psgd_muon",
  "mfac",
]


@pytest.mark.parametrize("name", NAMED)
def test_inject_hyperparams_works_in_one_call_and_schedules_the_learning_rate(name):
  factory = getattr(curvopt, name)
  params = {"w": jnp.full((4, 3), 0.5), "b": jnp.ones(3)}
  value_fn = lambda p: jnp.sum((p["w"] - 1.0) ** 2) + jnp.sum(p["b"] ** 2)
  opt = curvopt.inject_hyperparams(factory)(learning_rate=0.01)
  state = opt.init(params)
  grads = jax.grad(value_fn)(params)
  _, state = opt.update(grads, state, params, value_fn=value_fn)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  updates, _ = opt.update(grads, state, params, value_fn=value_fn)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))


def test_optax_inject_hyperparams_error_points_to_curvopts():
  with pytest.raises(TypeError, match=r"curvopt.inject_hyperparams"):
    optax.inject_hyperparams(curvopt.soap)(learning_rate=3e-3).init({"w": jnp.ones((3, 4))})


def test_structural_args_are_the_non_numeric_arguments():
  assert curvopt.structural_args(curvopt.sophia_h) == ("refresh_every", "seed", "state_dtype")
  assert "block_size" in curvopt.structural_args(curvopt.soap)
  assert "learning_rate" not in curvopt.structural_args(curvopt.soap)
  assert "momentum" in curvopt.structural_args(curvopt.egn)  # 0 drops a transform
  assert "momentum" not in curvopt.structural_args(curvopt.mfac)
  assert "max_skew" in curvopt.structural_args(curvopt.psgd_kron)


def test_structural_args_of_functions_written_like_the_named_optimizers():
  """Unannotated arguments go by their default (optax's rule), evaluated annotations by name."""

  def unannotated(learning_rate, steps=10, decay=0.9, nesterov=False, name="x", fn=None, *a, **k):
    return optax.sgd(learning_rate)

  assert curvopt.structural_args(unannotated) == ("nesterov", "name", "fn")

  def annotated(learning_rate, count=3, mode="a", scale=None, every=None, sched=None):
    return optax.sgd(learning_rate)

  # As a module without `from __future__ import annotations` has them: types, not strings.
  annotated.__annotations__ = {
    "learning_rate": float,
    "count": int,
    "mode": str,
    "scale": float | None,
    "every": int | None,
    "sched": "optax.ScalarOrSchedule | float | None",  # every numeric annotation at once
  }
  assert curvopt.structural_args(annotated) == ("count", "mode", "every")


def test_inject_hyperparams_passes_the_hyperparameter_dtype_on():
  params = jnp.ones(3, jnp.float32)
  opt = curvopt.inject_hyperparams(curvopt.mfac)(learning_rate=0.1, num_grads=4)
  assert opt.init(params).hyperparams["learning_rate"].dtype == jnp.float32  # the params'
  wide = curvopt.inject_hyperparams(curvopt.mfac, hyperparam_dtype=jnp.float64)
  state = wide(learning_rate=0.1, num_grads=4).init(params)
  assert state.hyperparams["learning_rate"].dtype == jnp.float64


# --- SOAP under rounding of b2 -----------------------------------------------------


def test_soap_is_stable_under_rounding_of_b2_once_its_statistics_have_full_rank():
  # The documented limit (soap's docstring): with rank-deficient statistics the null
  # eigenvectors are arbitrary and a 3e-8 change of b2 moves the parameters by 1e-2;
  # with full-rank statistics a float32 rounding of b2 stays at rounding level.
  key_x, key_y = jax.random.split(jax.random.key(0))
  x, y = jax.random.normal(key_x, (64, 8)), jax.random.normal(key_y, (64, 6))
  loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)
  params = {"w": jnp.zeros((8, 6), jnp.float32)}

  def run(opt):
    p, state = params, opt.init(params)
    for _ in range(12):
      updates, state = opt.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    return p

  plain = run(curvopt.soap(0.05, b2=0.95))
  injected = run(curvopt.inject_hyperparams(curvopt.soap)(learning_rate=0.05, b2=0.95))
  chex.assert_trees_all_close(plain, injected, atol=2e-6)


# --- spectral_density's default probes -------------------------------------------


def test_spectral_density_default_trace_is_within_a_few_percent():
  # One probe (the old default) was 7% off on a small MLP's Hessian.
  d = 200
  key_q, key_e = jax.random.split(jax.random.key(3))
  q, _ = jnp.linalg.qr(jax.random.normal(key_q, (d, d), jnp.float64))
  eigenvalues = jnp.exp(2.0 * jax.random.normal(key_e, (d,), jnp.float64))
  matrix = (q * eigenvalues) @ q.T
  op = curvopt.linear_operator(lambda v: matrix @ v, jnp.zeros(d, jnp.float64))
  exact = float(jnp.sum(eigenvalues))

  def error(**kw):
    keys = jax.random.split(jax.random.key(0), 8)
    return np.median(
      [
        abs(float(curvopt.spectral_density(op, k, num_iterations=30, **kw).trace()) / exact - 1)
        for k in keys
      ]
    )

  default, single = error(), error(num_probes=1)
  assert math.isfinite(default) and default < 0.5 * single


# --- Memory before it is spent ---------------------------------------------------


@pytest.mark.parametrize(
  ("build", "params", "match"),
  [
    (lambda: curvopt.shampoo(0.1, precondition_1d=True), jnp.zeros(10**6), "block_size"),
    (lambda: curvopt.soap(0.1, precondition_1d=True), jnp.zeros(10**6), "precondition_1d"),
    (lambda: curvopt.mfac(0.1, num_grads=100_000), jnp.zeros(10_000), "num_grads"),
    (lambda: curvopt.psgd_kron(0.1, max_skew=math.inf), jnp.zeros(10**6), "max_skew"),
    (lambda: curvopt.psgd_muon(0.1, max_skew=math.inf), {"w": jnp.zeros((2, 10**6))}, "max_skew"),
  ],
  ids=["shampoo_1d", "soap_1d", "mfac_window", "psgd_kron_skew", "psgd_muon_skew"],
)
def test_a_state_out_of_proportion_is_refused_before_it_is_allocated(build, params, match):
  # Before: shampoo built 8.2 GB of state for 4 MB of parameters, mfac tried 40 GB
  # for 28 (11 MB since its d x d form for d < m); 4.4 GB for 10,000.
  with pytest.raises(ValueError, match=rf"GB for .* of parameters.*{match}"):
    build().init(params)


def test_state_size_equals_the_bytes_init_allocates():
  f32 = jnp.float32
  params = {"w": jnp.ones((6, 4), f32), "b": jnp.ones(4, f32), "s": jnp.ones((), f32)}
  for build in (
    lambda: optax.adam(0.1),
    lambda: curvopt.soap(0.1),
    lambda: curvopt.shampoo(0.1),
    lambda: curvopt.psgd_kron(0.1),
    lambda: curvopt.sophia_h(0.1),
    lambda: curvopt.mfac(0.1, num_grads=8),
  ):
    opt = build()
    size = curvopt.state_size(
      opt, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    )
    state = opt.init(params)
    is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    real = sum(
      jax.random.key_data(x).nbytes if is_key(x) else x.nbytes for x in jax.tree.leaves(state)
    )
    assert size.total_bytes == real
    assert size.num_parameters == 29 and size.parameter_bytes == 29 * 4
  adam = curvopt.state_size(optax.adam(0.1), params)
  assert adam.bytes_per_parameter == pytest.approx(8 + 4 / 29)  # mu, nu and the count
