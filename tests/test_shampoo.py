"""Shampoo and SOAP against exact references (float64): roots, Kronecker structure, blocking."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt.transforms import scale_by_shampoo, scale_by_soap
from curvopt.transforms.kronecker._factors import pack_symmetric, unpack_symmetric


def _spd(d, condition, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return (q * np.logspace(0, -np.log10(condition), d)) @ q.T


def _reference_root(a, p, eps):
  w, u = np.linalg.eigh(a)
  return (u * (w + eps) ** (-1.0 / p)) @ u.T


def _relative_error(actual, expected):
  return np.linalg.norm(np.asarray(actual) - expected) / np.linalg.norm(expected)


# --- Inverse roots. ----------------------------------------------------------


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [2, 4])
def test_inverse_root_equals_the_eigh_reference_when_well_conditioned(method, p):
  a = _spd(24, 1e2)
  eps = 1e-6 * np.linalg.eigvalsh(a)[-1]
  root = curvopt.matrix_inverse_root(jnp.asarray(a), p, method=method)
  assert _relative_error(root.matrix, _reference_root(a, p, eps)) < 1e-6
  assert root.residual < 1e-10


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [2, 4])
def test_inverse_root_stays_accurate_at_condition_number_1e8(method, p):
  a = _spd(24, 1e8, seed=1)
  eps = 1e-6 * np.linalg.eigvalsh(a)[-1]
  root = curvopt.matrix_inverse_root(jnp.asarray(a), p, method=method)
  assert np.all(np.isfinite(root.matrix))
  assert _relative_error(root.matrix, _reference_root(a, p, eps)) < 1e-3


def test_absolute_epsilon_and_the_pseudo_inverse_root():
  v = np.random.default_rng(2).normal(size=(6, 3))
  a = v @ v.T  # rank 3
  absolute = curvopt.matrix_inverse_root(jnp.asarray(a), 4, epsilon=1e-3, relative_epsilon=False)
  np.testing.assert_allclose(absolute.matrix, _reference_root(a, 4, 1e-3), rtol=1e-9)
  pseudo = curvopt.matrix_inverse_root(jnp.asarray(a), 2, epsilon=0.0, rank_rtol=1e-10)
  w, u = np.linalg.eigh(a)
  kept = w > 1e-10 * w[-1]
  expected = (u[:, kept] * w[kept] ** -0.5) @ u[:, kept].T
  np.testing.assert_allclose(pseudo.matrix, expected, atol=1e-10)


def _power_iteration_reference(a, iterations):
  v = np.ones(len(a)) / np.sqrt(len(a))
  for _ in range(iterations):
    w = a @ v
    v = w / np.linalg.norm(w)
  return v @ a @ v


def _coupled_newton_reference(a, p, iterations):
  """Higham 2008 eq. 7.18 from M = zA, H = z^(1/p) I, z = (1 + p) / (2 ||A||_F)."""
  identity = np.eye(len(a))
  z = (1 + p) / (2 * np.linalg.norm(a))
  m, h = z * a, z ** (1 / p) * identity
  for _ in range(iterations):
    t = (1 + 1 / p) * identity - m / p
    m, h = np.linalg.matrix_power(t, p) @ m, h @ t
  return (h + h.T) / 2, np.max(np.abs(m - identity))


@pytest.mark.parametrize("iterations", [0, 1, 2, 32])
def test_newton_roots_power_iteration_is_32_steps_from_the_normalized_ones(iterations):
  from curvopt._matrix_roots import _largest_eigenvalue

  a = _spd(5, 1.05, seed=4)  # eigenvalues within 5%: each step still moves the estimate
  expected = _power_iteration_reference(a, iterations)
  np.testing.assert_allclose(_largest_eigenvalue(jnp.asarray(a), iterations), expected, rtol=1e-13)
  low = _largest_eigenvalue(jnp.asarray(a, jnp.float32), iterations)
  assert low.dtype == jnp.float32  # iterated in the matrix's precision
  np.testing.assert_allclose(low, expected, rtol=1e-5)
  if iterations == 32:  # the default
    np.testing.assert_allclose(_largest_eigenvalue(jnp.asarray(a)), expected, rtol=1e-13)
    assert abs(_power_iteration_reference(a, 33) - expected) > 1e-12 * expected


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("iterations", [0, 1, 2, 3])
def test_newton_root_is_the_coupled_iteration_step_by_step(p, iterations):
  a = _spd(6, 10.0, seed=5)
  root = curvopt.matrix_inverse_root(
    jnp.asarray(a),
    p,
    method="newton",
    epsilon=1e-3,
    relative_epsilon=False,
    max_iterations=iterations,
    tolerance=0.0,
  )
  matrix, residual = _coupled_newton_reference(a + 1e-3 * np.eye(6), p, iterations)
  np.testing.assert_allclose(root.matrix, matrix, rtol=1e-12)
  np.testing.assert_allclose(root.residual, residual, rtol=1e-12)


def test_newton_root_undoes_the_step_whose_residual_grew_by_1_2x():
  """An indefinite matrix (not a statistic) makes the iteration diverge: residuals 1.149,
  1.369 (x1.19, kept), 2.047 (x1.50: undone, the iterate before it returned)."""
  a = np.diag([1.0, -0.1])
  root = curvopt.matrix_inverse_root(
    jnp.asarray(a), 2, method="newton", epsilon=0.0, relative_epsilon=False
  )
  residuals = [_coupled_newton_reference(a, 2, k)[1] for k in range(3)]
  assert 1.0 < residuals[1] / residuals[0] < 1.2 < residuals[2] / residuals[1] < 2.2
  matrix, residual = _coupled_newton_reference(a, 2, 1)
  np.testing.assert_allclose(root.matrix, matrix, rtol=1e-12)
  np.testing.assert_allclose(root.residual, residual, rtol=1e-12)


def test_newton_root_stops_at_max_iterations_100_by_default():
  """Condition 1e40: the small eigenvalue's iterate grows 2.25x a step, for about 113 steps."""
  a = np.diag([1.0, 1e-40])
  root = curvopt.matrix_inverse_root(
    jnp.asarray(a), 2, method="newton", epsilon=0.0, relative_epsilon=False, tolerance=0.0
  )
  matrix, residual = _coupled_newton_reference(a, 2, 100)
  assert residual > 0.9  # still far from converged: the cap stopped it
  np.testing.assert_allclose(root.residual, residual, rtol=1e-12)
  np.testing.assert_allclose(root.matrix, matrix, rtol=1e-10)


def test_newton_root_runs_in_highest_matmul_precision():
  """On accelerators the default would multiply float32 in bfloat16 passes."""
  lowered = jax.jit(lambda a: curvopt.matrix_inverse_root(a, 4, method="newton")).lower(
    jnp.eye(3, dtype=jnp.float32)
  )
  assert "HIGHEST" in lowered.as_text()


def test_newton_root_stops_at_its_tolerance_with_float32_and_float64_defaults():
  a = _spd(8, 1e2, seed=6)
  loose = curvopt.matrix_inverse_root(jnp.asarray(a), 2, method="newton", tolerance=1e-2)
  assert 1e-10 < loose.residual <= 1e-2  # stopped there, not run to convergence
  for dtype, tolerance in ((jnp.float32, 1e-6), (jnp.float64, 1e-12)):
    a_typed = jnp.asarray(a, dtype)
    default = curvopt.matrix_inverse_root(a_typed, 4, method="newton")
    explicit = curvopt.matrix_inverse_root(a_typed, 4, method="newton", tolerance=tolerance)
    assert default.matrix.dtype == dtype and default.residual.dtype == dtype
    np.testing.assert_array_equal(default.matrix, explicit.matrix)
    assert 0 < default.residual <= tolerance


def test_a_zero_matrix_has_a_finite_root():
  for method in ("eigh", "newton"):
    root = curvopt.matrix_inverse_root(jnp.zeros((3, 3)), 4, method=method)
    np.testing.assert_allclose(root.matrix, 1e-6**-0.25 * np.eye(3), rtol=1e-6)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("scale", [0.5, 1e4])
def test_relative_epsilon_root_follows_the_statistics_scale(method, scale):
  """The default epsilon is 1e-6 lambda_max: (cA)^(-1/p) = c^(-1/p) A^(-1/p) exactly."""
  a = scale * _spd(12, 1e2, seed=7)
  root = curvopt.matrix_inverse_root(jnp.asarray(a), 4, method=method)
  expected = _reference_root(a, 4, 1e-6 * np.linalg.eigvalsh(a)[-1])
  assert _relative_error(root.matrix, expected) < 1e-8


def test_root_dtypes_follow_a_float32_matrix():
  a = jnp.asarray(_spd(6, 1e2, seed=8), jnp.float32)
  for method in ("eigh", "newton"):
    root = curvopt.matrix_inverse_root(a, 2, method=method)
    assert (root.matrix.dtype, root.residual.dtype) == (jnp.float32, jnp.float32), method


def test_pseudo_inverse_root_drops_eigenvalues_at_or_below_rank_rtol_times_the_largest():
  a = np.diag([100.0, 1.0, 25.0, 1e-3])
  root = curvopt.matrix_inverse_root(jnp.asarray(a), 2, epsilon=0.0, rank_rtol=0.25)
  np.testing.assert_allclose(np.diag(root.matrix), [0.1, 0.0, 0.0, 0.0], rtol=1e-12)  # 25: at
  root = curvopt.matrix_inverse_root(jnp.asarray(a), 2, epsilon=0.0, rank_rtol=1e-4)
  np.testing.assert_allclose(np.diag(root.matrix), [0.1, 1.0, 0.2, 0.0], rtol=1e-12)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"a": jnp.zeros((2, 3)), "p": 2}, "square matrix"),
    ({"a": jnp.eye(2), "p": 0}, "p must be a positive integer"),
    ({"a": jnp.eye(2), "p": 2, "method": "cholesky"}, "method must be one of"),
    (
      {"a": jnp.eye(2), "p": 2, "method": "newton", "rank_rtol": 1e-6},
      r'^rank_rtol \(a pseudo-inverse root\) needs method="eigh"',
    ),
    ({"a": jnp.eye(2), "p": 2, "epsilon": -1e-6}, "epsilon must be in"),
    ({"a": jnp.eye(2, dtype=jnp.int32), "p": 2}, "a must be a floating-point matrix, got int32"),
  ],
)
def test_bad_root_arguments_fail_clearly(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    curvopt.matrix_inverse_root(**kwargs)


# --- Shampoo's preconditioner. -----------------------------------------------


def _unvec(x, shape):
  return np.asarray(x).reshape(shape[::-1]).T  # column-major, as in the spec


def _precondition_with_statistics(g, left, right, **kwargs):
  """One Shampoo step whose statistics after accumulating `g` are exactly (left, right)."""
  tx = scale_by_shampoo(
    precondition_frequency=1,
    start_preconditioning_step=0,
    grafting=None,
    one_sided=False,
    **kwargs,
  )
  state = tx.init(g)
  statistics = ((jnp.asarray(left - g @ g.T)[None], jnp.asarray(right - g.T @ g)[None]),)
  updates, state = tx.update(g, state._replace(statistics=statistics))
  return np.asarray(updates), state


@pytest.mark.parametrize("p", [2, 4])
def test_kronecker_statistics_give_the_analytic_preconditioner(p):
  """Spec 2.7.2: L = tr(B) A, R = tr(A) B; p = 2 is full-matrix AdaGrad on B kron A."""
  m, n = 5, 7
  a, b = _spd(m, 30, seed=3), _spd(n, 30, seed=4)
  g = np.random.default_rng(5).normal(size=(m, n))
  updates, _ = _precondition_with_statistics(
    jnp.asarray(g), np.trace(b) * a, np.trace(a) * b, epsilon=0.0, exponent_override=p
  )
  scale = (np.trace(a) * np.trace(b)) ** (-1.0 / p)
  if p == 4:
    expected = scale * _reference_root(a, 4, 0) @ g @ _reference_root(b, 4, 0)
  else:
    full = _reference_root(np.kron(b, a), 2, 0)  # (B kron A)^(-1/2) vec(G)
    expected = scale * _unvec(full @ g.T.reshape(-1), (m, n))
  np.testing.assert_allclose(updates, expected, rtol=1e-9)


def test_converged_statistics_of_kronecker_gradient_noise_match_the_analytic_factors():
  """Gradients G = A^1/2 Z B^1/2 (the noise of a quadratic with a Kronecker Hessian)."""
  m, n, steps = 4, 3, 4000
  a, b = _spd(m, 10, seed=6), _spd(n, 10, seed=7)
  half = lambda s: _reference_root(s, -2, 0)  # s^(1/2)
  z = np.random.default_rng(8).normal(size=(steps, m, n))
  grads = jnp.asarray(half(a) @ z @ half(b))
  tx = scale_by_shampoo(beta2=1.0, precondition_frequency=steps, grafting=None, one_sided=False)

  def body(state, g):
    return tx.update(g, state)[1], None

  state, _ = jax.lax.scan(body, tx.init(grads[0]), grads)
  ((left, right),) = state.statistics
  scale = np.sqrt(np.trace(a) * np.trace(b))  # entries' typical size
  np.testing.assert_allclose(left[0] / steps, np.trace(b) * a, atol=0.1 * scale)
  np.testing.assert_allclose(right[0] / steps, np.trace(a) * b, atol=0.1 * scale)
  # The constant-gradient case of spec 2.7.1 checks the roots themselves exactly.


def test_constant_gradient_gives_the_polar_factor():
  g = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7)))
  tx = scale_by_shampoo(
    precondition_frequency=1,
    start_preconditioning_step=0,
    grafting=None,
    epsilon=0.0,
    rank_rtol=1e-10,
    one_sided=False,
  )
  state = tx.init(g)
  for _ in range(10):
    updates, state = tx.update(g, state)
  u, _, vt = np.linalg.svd(np.asarray(g), full_matrices=False)
  np.testing.assert_allclose(updates, u @ vt / np.sqrt(10), atol=1e-12)


def test_one_sided_blocks_are_preconditioned_by_their_short_factor_alone():
  g = jnp.asarray(np.random.default_rng(3).normal(size=(12, 3)))  # 12^2 > 36: no left factor
  tx = scale_by_shampoo(
    precondition_frequency=1, start_preconditioning_step=0, grafting=None, epsilon=0.0
  )
  state = tx.init(g)
  assert [f.shape for f in state.statistics[0]] == [(1, 3, 3)]
  updates, _ = tx.update(g, state)
  right = np.asarray(g.T @ g)
  np.testing.assert_allclose(updates, np.asarray(g) @ _reference_root(right, 2, 0), rtol=1e-10)


def _run(tx, params, grads_list):
  state, outs = tx.init(params), []
  for g in grads_list:
    u, state = tx.update(g, state, params)
    outs.append(u)
  return outs, state


def _random_grads(structure, steps=4, seed=0):
  keys = jax.random.split(jax.random.key(seed), steps)
  return [
    jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape, x.dtype), structure) for k in keys
  ]


def test_a_block_larger_than_every_dim_equals_no_blocking():
  params = {"w": jnp.zeros((5, 7)), "k": jnp.zeros((3, 3, 4, 6)), "b": jnp.zeros(6)}
  grads = _random_grads(params)
  big, _ = _run(scale_by_shampoo(block_size=64, precondition_frequency=2), params, grads)
  huge, _ = _run(scale_by_shampoo(block_size=10**6, precondition_frequency=2), params, grads)
  for a, b in zip(big, huge, strict=True):
    chex.assert_trees_all_close(a, b, rtol=1e-12)


def test_blocks_are_preconditioned_like_separate_parameters():
  whole = {"w": jnp.zeros((6, 8))}
  grads = _random_grads(whole)
  blocked, _ = _run(scale_by_shampoo(block_size=4, precondition_frequency=1), whole, grads)
  cut = lambda w: {
    f"{i}{j}": w[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] for i in (0, 1) for j in (0, 1)
  }
  separate, _ = _run(
    scale_by_shampoo(block_size=4, precondition_frequency=1),
    cut(whole["w"]),
    [cut(g["w"]) for g in grads],
  )
  for a, b in zip(blocked, separate, strict=True):
    chex.assert_trees_all_close(cut(a["w"]), b, rtol=1e-10)


def test_matrix_axes_make_the_other_axes_a_batch_of_blocks():
  whole = {"w": jnp.zeros((3, 4, 5))}
  grads = _random_grads(whole)
  tx = lambda **kw: scale_by_shampoo(precondition_frequency=1, **kw)
  batched, _ = _run(tx(matrix_axes=lambda shape: ((1,), (2,))), whole, grads)
  cut = lambda w: {str(i): w[i] for i in range(3)}
  separate, _ = _run(tx(), cut(whole["w"]), [cut(g["w"]) for g in grads])
  for a, b in zip(batched, separate, strict=True):
    chex.assert_trees_all_close(cut(a["w"]), b, rtol=1e-10)


def test_before_start_preconditioning_step_the_update_is_the_grafts_exactly():
  params = {"w": jnp.zeros((5, 7)), "b": jnp.zeros(7)}
  grads = _random_grads(params, steps=6)
  shampoo, _ = _run(
    scale_by_shampoo(precondition_frequency=2, start_preconditioning_step=4), params, grads
  )
  graft, _ = _run(
    optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True),
    params,
    grads,
  )
  for step in range(4):
    chex.assert_trees_all_equal(shampoo[step], graft[step])
  assert not np.allclose(shampoo[4]["w"], graft[4]["w"])  # then Shampoo takes over
  chex.assert_trees_all_equal(shampoo[5]["b"], graft[5]["b"])  # vectors stay grafted


def test_grafting_gives_each_block_the_grafts_norm():
  params = {"w": jnp.zeros((6, 8))}
  grads = _random_grads(params, steps=3)
  outs, _ = _run(
    scale_by_shampoo(block_size=4, precondition_frequency=1, start_preconditioning_step=0),
    params,
    grads,
  )
  graft, _ = _run(
    optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True),
    params,
    grads,
  )
  for out, u in zip(outs, graft, strict=True):
    for i in (0, 4):
      for j in (0, 4):
        norm = lambda x, i=i, j=j: np.linalg.norm(np.asarray(x["w"][i : i + 4, j : j + 4]))
        assert norm(out) == pytest.approx(norm(u), rel=1e-12)


def test_one_factor_at_a_time_equals_the_batched_call():
  from curvopt.transforms.kronecker._factors import _one_at_a_time

  stacked = jnp.asarray(np.stack([_spd(4, 10.0, seed) for seed in range(3)]))
  fn = lambda key, m: (jnp.linalg.eigvalsh(m), jnp.sum(m, axis=(1, 2)) + key)
  one, batched = _one_at_a_time(fn)(1.0, stacked), fn(1.0, stacked)
  chex.assert_trees_all_close(one, batched, rtol=1e-13)
  assert "eigh[" in str(jax.make_jaxpr(_one_at_a_time(fn), static_argnums=0)(1.0, stacked))


def test_shard_count_multiplies_the_mesh_axes_of_the_leading_dimension():
  from types import SimpleNamespace

  from jax.sharding import PartitionSpec

  from curvopt.transforms.kronecker._factors import _shard_count

  mesh = SimpleNamespace(shape={"data": 4, "model": 2})
  count = lambda spec: _shard_count(SimpleNamespace(spec=spec, mesh=mesh))
  assert count(PartitionSpec("data")) == 4
  assert count(PartitionSpec(("data", "model"))) == 8
  assert count(PartitionSpec(None, "data")) == 1  # the leading axis is not sharded
  assert count(PartitionSpec()) == 1


def test_distributed_pads_the_stack_with_identities_to_a_multiple_of_the_shards(monkeypatch):
  from curvopt.transforms.kronecker import _factors

  monkeypatch.setattr(_factors, "_shard_count", lambda sharding: 4)
  constrained = []
  monkeypatch.setattr(
    jax.lax, "with_sharding_constraint", lambda x, s: (constrained.append(s), x)[1]
  )
  seen = []

  def fn(key, stacked):
    seen.append(np.asarray(stacked))
    return stacked * key, jnp.sum(stacked, axis=(1, 2))

  stacked = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3, 3)), jnp.float32)
  out = _factors._distributed(fn, sharding="the sharding")(2.0, stacked)
  assert constrained == ["the sharding"]
  (padded,) = seen
  assert padded.shape == (8, 3, 3) and padded.dtype == np.float32  # identities in its dtype
  np.testing.assert_array_equal(padded[:5], stacked)
  np.testing.assert_array_equal(padded[5:], np.broadcast_to(np.eye(3), (3, 3, 3)))
  chex.assert_trees_all_equal(out, (stacked * 2.0, jnp.sum(stacked, axis=(1, 2))))


def test_map_factors_groups_by_key_and_cuts_the_results_back_per_factor(monkeypatch):
  from curvopt.transforms.kronecker import _factors

  rng = np.random.default_rng(1)
  factors = [  # three stacks of size 3 (offsets 0, 2, 5 in their concatenation), float32
    [jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)],
    [jnp.asarray(rng.normal(size=(3, 3, 3)), jnp.float32)],
    [jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)],
  ]
  factors[0].append(jnp.asarray(rng.normal(size=(1, 4, 4)), jnp.float32))
  calls = []

  def fn(key, stacked):
    calls.append((key, stacked.shape[0]))
    return stacked * 2.0 + key

  for one_at_a_time in (False, True):
    monkeypatch.setattr(_factors._xla_cpu, "lapack_one_at_a_time", lambda v=one_at_a_time: v)
    calls.clear()
    out = _factors.map_factors(fn, factors)
    for group, group_out in zip(factors, out, strict=True):
      for f, o in zip(group, group_out, strict=True):
        chex.assert_trees_all_equal(o, f * 2.0 + f.shape[-1])
    # One traced call per size: the whole stack, or (lax.map's body) one factor.
    assert sorted(calls) == ([(3, 1), (4, 1)] if one_at_a_time else [(3, 7), (4, 1)])
  monkeypatch.setattr(_factors._xla_cpu, "lapack_one_at_a_time", lambda: False)
  keys = []
  by_group = lambda key, stacked: (keys.append((key, stacked.shape[0])), stacked - 1.0)[1]
  out = _factors.map_factors(by_group, factors, key=lambda g, a: (factors[g][a].shape[-1], g))
  assert keys == [((3, 0), 2), ((4, 0), 1), ((3, 1), 3), ((3, 2), 2)]  # first appearance
  chex.assert_trees_all_equal(out, [[f - 1.0 for f in group] for group in factors])


def test_map_factors_spreads_each_stack_over_the_shards_it_is_given(monkeypatch):
  from types import SimpleNamespace

  from curvopt.transforms.kronecker import _factors

  monkeypatch.setattr(_factors, "_shard_count", lambda sharding: sharding.count)
  monkeypatch.setattr(jax.lax, "with_sharding_constraint", lambda x, sharding: x)
  factors = [[jnp.ones((3, 2, 2)), jnp.ones((1, 5, 5))]]
  seen = []
  fn = lambda key, stacked: (seen.append(stacked.shape), stacked * 3.0)[1]
  out = _factors.map_factors(fn, factors, sharding=SimpleNamespace(count=4))
  assert seen == [(4, 2, 2), (4, 5, 5)]  # each padded to a multiple of four shards
  chex.assert_trees_all_equal(out, [[jnp.full((3, 2, 2), 3.0), jnp.full((1, 5, 5), 3.0)]])


def test_kronecker_products_run_in_highest_matmul_precision():
  """On accelerators the default would multiply float32 in bfloat16 passes (TF32 on GPUs)."""
  from curvopt.transforms.kronecker._factors import factor_statistics, mode_product

  blocks = jnp.ones((2, 3, 4), jnp.float32)
  for fn in (
    lambda b: factor_statistics(b, (0, 1)),
    lambda b: mode_product(b, [jnp.ones((2, 3, 3)), jnp.ones((2, 4, 4))], (0, 1)),
  ):
    text = jax.jit(fn).lower(blocks).as_text()
    assert text.count("dot_general") == text.count("precision = [HIGHEST, HIGHEST]") == 2, text


def test_same_shaped_blocks_share_one_batched_root_call():
  layers = {f"layer{i}": jnp.zeros((16, 16)) for i in range(6)}
  tx = scale_by_shampoo(precondition_frequency=1)
  jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s))(layers, tx.init(layers))
  assert str(jaxpr).count("eigh[") == 1  # six layers, twelve factors, one call


def test_poisoned_statistics_keep_the_previous_roots_and_count_the_failure():
  params = {"w": jnp.zeros((4, 4))}
  grads = _random_grads(params, steps=4)
  tx = scale_by_shampoo(precondition_frequency=1, start_preconditioning_step=0)
  state = tx.init(params)
  for g in grads[:2]:
    _, state = tx.update(g, state)
  good_roots = state.roots
  ((left, right),) = state.statistics
  poisoned = state._replace(statistics=((left.at[0, 0, 0].set(jnp.nan), right),))
  updates, state = tx.update(grads[2], poisoned)
  assert int(state.failures) == 1
  chex.assert_trees_all_equal(state.roots[0][0], good_roots[0][0])  # kept
  assert not np.array_equal(state.roots[0][1], good_roots[0][1])  # the clean factor refreshed
  assert np.all(np.isfinite(updates["w"]))
  chex.assert_trees_all_equal(state.statistics[0][0], jnp.zeros_like(left))  # restarted
  g = np.asarray(grads[2]["w"])
  np.testing.assert_allclose(state.statistics[0][1][0], right[0] + g.T @ g, rtol=1e-12)
  updates, state = tx.update(grads[3], state)  # training continues
  assert np.all(np.isfinite(updates["w"])) and int(state.failures) == 1
  g = np.asarray(grads[3]["w"])
  np.testing.assert_allclose(state.statistics[0][0][0], g @ g.T, rtol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 20, 128])
def test_packed_statistics_are_the_upper_triangle_by_rows_and_unpack_exactly(d):
  a = np.random.default_rng(d).normal(size=(3, d, d))
  symmetric = jnp.asarray(a + np.swapaxes(a, 1, 2))
  packed = pack_symmetric(symmetric)
  dense = np.asarray(symmetric)
  rows = [dense[:, i, j] for i in range(d) for j in range(i, d)]  # LAPACK's "U" by rows
  np.testing.assert_array_equal(packed, np.stack(rows, axis=-1))
  chex.assert_trees_all_equal(unpack_symmetric(packed), symmetric)
  assert unpack_symmetric(packed.astype(jnp.float32)).dtype == jnp.float32
  single = symmetric[0]  # any leading axes, none included
  assert pack_symmetric(single).shape == (d * (d + 1) // 2,)
  chex.assert_trees_all_equal(unpack_symmetric(pack_symmetric(single)), single)


@pytest.mark.parametrize("size", [2, 4, 5])
def test_unpacking_a_length_that_is_no_triangle_is_refused(size):
  with pytest.raises(ValueError, match=f"{size} entries are not the upper triangle"):
    unpack_symmetric(jnp.zeros((1, size)))


@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_packed_statistics_give_the_unpacked_updates(beta2):
  # Matrices, a 4-d tensor (four factors, exponent 8), two blocks of one shape, a vector.
  params = {
    "w": jnp.zeros((6, 5)),
    "k": jnp.zeros((3, 2, 4, 2)),
    "b": jnp.zeros((10, 3)),
    "v": jnp.zeros(4),
  }
  grads = _random_grads(params, steps=5)
  make = lambda packed: scale_by_shampoo(
    block_size=5,
    beta2=beta2,
    precondition_frequency=2,
    start_preconditioning_step=0,
    one_sided=False,
    packed_statistics=packed,
  )
  full_updates, full = _run(make(False), params, grads)
  packed_updates, packed = _run(make(True), params, grads)
  # The products' two triangles differ in the last bit, and packing keeps the upper one.
  chex.assert_trees_all_equal(packed.statistics, jax.tree.map(pack_symmetric, full.statistics))
  chex.assert_trees_all_close(packed.roots, full.roots, rtol=1e-12, atol=1e-14)
  chex.assert_trees_all_close(packed_updates, full_updates, rtol=1e-12, atol=1e-14)
  for p, f in zip(
    jax.tree.leaves(packed.statistics), jax.tree.leaves(full.statistics), strict=True
  ):
    n, d, _ = f.shape
    assert p.shape == (n, d * (d + 1) // 2)


def test_a_poisoned_packed_statistic_restarts_from_zero_alone():
  params = {"w": jnp.zeros((4, 3))}
  grads = _random_grads(params, steps=3)
  tx = scale_by_shampoo(
    precondition_frequency=1, start_preconditioning_step=0, one_sided=False, packed_statistics=True
  )
  _, state = _run(tx, params, grads[:2])
  ((left, right),) = state.statistics
  poisoned = state._replace(statistics=((left.at[0, 1].set(jnp.inf), right),))
  updates, state = tx.update(grads[2], poisoned)
  assert int(state.failures) == 1 and np.all(np.isfinite(updates["w"]))
  chex.assert_trees_all_equal(state.statistics[0][0], jnp.zeros_like(left))
  g = np.asarray(grads[2]["w"])
  np.testing.assert_allclose(
    unpack_symmetric(state.statistics[0][1])[0], unpack_symmetric(right)[0] + g.T @ g, rtol=1e-12
  )


def test_shampoo_packs_its_statistics_exactly_when_a_state_dtype_is_given():
  params = {"w": jax.ShapeDtypeStruct((128, 512), jnp.float32)}

  def statistics_entries(**kwargs):
    leaves = curvopt.state_size(curvopt.shampoo(0.1, **kwargs), params).leaves
    return [b for name, b in leaves.items() if ".statistics" in name]

  assert statistics_entries() == [128 * 128 * 4]
  assert statistics_entries(state_dtype=jnp.bfloat16) == [128 * 129 // 2 * 4]  # float32, packed
  assert statistics_entries(state_dtype=jnp.float32) == [128 * 129 // 2 * 4]
  assert statistics_entries(state_dtype=jnp.bfloat16, packed_statistics=False) == [128 * 128 * 4]
  assert statistics_entries(packed_statistics=True) == [128 * 129 // 2 * 4]
  bf16 = curvopt.state_size(curvopt.shampoo(0.1, state_dtype=jnp.bfloat16), params).total_bytes
  f32 = curvopt.state_size(curvopt.shampoo(0.1), params).total_bytes
  assert bf16 / f32 < 0.51  # the rest of the state halves; the statistics take bfloat16's bytes
  # optax's map_params hands init a leafless placeholder: the packed state keeps its structure.
  opt, real = curvopt.shampoo(0.1, state_dtype=jnp.bfloat16), {"w": jnp.ones((4, 3))}
  state = opt.init(real)
  mapped = optax.tree.map_params(
    opt.init, lambda v: v + 1.0, state, transform_non_params=lambda v: v
  )
  assert jax.tree.structure(mapped) == jax.tree.structure(state)


def test_newton_and_eigh_roots_give_the_same_updates():
  params = {"w": jnp.zeros((6, 5))}
  grads = _random_grads(params, steps=5)
  run = lambda method: _run(
    scale_by_shampoo(precondition_frequency=1, start_preconditioning_step=0, root_method=method),
    params,
    grads,
  )[0]
  for a, b in zip(run("eigh"), run("newton"), strict=True):
    chex.assert_trees_all_close(a, b, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"grafting": "adamw"}, "grafting must be one of"),
    ({"root_method": "svd"}, "root_method must be one of"),
    ({"beta2": 1.5}, r"beta2 must be in \[0.0, 1.0\]"),
    ({"start_preconditioning_step": -1}, "start_preconditioning_step must be"),
    ({"grafting_b2": 1.0}, r"grafting_b2 must be in"),
    ({"rank_rtol": -1e-3}, r"rank_rtol must be in"),
    ({"packed_statistics": "yes"}, "packed_statistics must be"),
    ({"packed_statistics": float("nan")}, "packed_statistics must be True or False"),
  ],
)
def test_bad_shampoo_arguments_fail_clearly(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    curvopt.shampoo(0.1, **kwargs)


@pytest.mark.parametrize(
  "matrix_axes, message",
  [
    (lambda shape: ((0,), (5,)), "out of range"),
    (lambda shape: ((0, 1), (1,)), "must be distinct"),
    (lambda shape: (0, 1), "two tuples of ints"),
  ],
)
def test_bad_matrix_axes_fail_clearly_when_the_layout_is_built(matrix_axes, message):
  tx = curvopt.shampoo(0.1, matrix_axes=matrix_axes)
  with pytest.raises((ValueError, TypeError), match=message):
    tx.init({"w": jnp.zeros((3, 4, 5))})


# --- SOAP. -------------------------------------------------------------------


def test_soap_with_the_identity_basis_is_adamw():
  params = {"w": jnp.ones((5, 4)), "b": jnp.ones(4)}
  grads = _random_grads(params, steps=8)
  kwargs = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
  ours, _ = _run(curvopt.soap(0.1, start_preconditioning_step=10**9, **kwargs), params, grads)
  adamw, _ = _run(optax.adamw(0.1, **kwargs), params, grads)
  for a, b in zip(ours, adamw, strict=True):
    chex.assert_trees_all_close(a, b, rtol=1e-12, atol=1e-15)


def test_soap_is_adam_in_the_eigenbasis_of_the_factors():
  """A fixed basis Q_L, Q_R: SOAP equals Adam run on Q_L^T G Q_R, rotated back."""
  g0 = jnp.asarray(np.random.default_rng(9).normal(size=(4, 3)))
  grads = _random_grads(g0, steps=5, seed=1)
  tx = scale_by_soap(precondition_frequency=10**6, one_sided=False)  # refreshed once, after step 0
  _, state = _run(tx, g0, [g0])
  ((q_left, q_right),) = state.eigenbases
  q_left, q_right = np.asarray(q_left[0]), np.asarray(q_right[0])
  left, right = np.asarray(g0 @ g0.T), np.asarray(g0.T @ g0)
  # The basis is the eigenbasis of the first step's factors (largest first).
  np.testing.assert_allclose(
    q_left.T @ left @ q_left, np.diag(np.linalg.eigvalsh(left)[::-1]), atol=1e-10
  )
  np.testing.assert_allclose(
    q_right.T @ right @ q_right, np.diag(np.linalg.eigvalsh(right)[::-1]), atol=1e-10
  )
  adam = optax.scale_by_adam(b1=0.95, b2=0.95, eps=1e-8)
  rotate = lambda g: q_left.T @ np.asarray(g) @ q_right
  # Both start afresh in that basis, held fixed (no refresh is ever applied).
  fixed = scale_by_soap(start_preconditioning_step=10**9, one_sided=False)
  state_adam = adam.init(g0)
  soap_state = fixed.init(g0)._replace(eigenbases=state.eigenbases)
  for g in grads:
    ours, soap_state = fixed.update(g, soap_state)
    theirs, state_adam = adam.update(jnp.asarray(rotate(g)), state_adam)
    np.testing.assert_allclose(ours, q_left @ np.asarray(theirs) @ q_right.T, rtol=1e-9)


def test_soap_carries_its_second_moments_into_a_new_basis_exactly():
  """Diagonal `v` in the old Kronecker basis -> diag(R diag(v) R^T) in the new one."""
  from curvopt.transforms.kronecker._blocks import block_layout
  from curvopt.transforms.kronecker._soap import _carry_second_moments

  rng = np.random.default_rng(3)
  nu = jnp.asarray(rng.random((4, 3)))
  orthogonal = lambda n: np.linalg.qr(rng.normal(size=(n, n)))[0]
  old = tuple(jnp.asarray(orthogonal(n))[None] for n in (4, 3))
  new = tuple(jnp.asarray(orthogonal(n))[None] for n in (4, 3))
  layout = block_layout(
    nu, block_size=1024, merge_dims=True, precondition_1d=False, matrix_axes=None, one_sided=False
  )
  carried = _carry_second_moments(layout, nu, (old,), (new,))
  rotation = np.kron(new[0][0].T @ old[0][0], new[1][0].T @ old[1][0])
  dense = np.diag(rotation @ np.diag(np.asarray(nu).ravel()) @ rotation.T).reshape(4, 3)
  np.testing.assert_allclose(carried, dense, rtol=1e-10)


def test_soap_trains_on_sparse_gradients_like_adam():
  """About 12% of the gradient entries non-zero per step (the old SOAP reached 1e8-1e10)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 16)))
  y = x @ jnp.asarray(rng.normal(size=(16, 8)))
  loss = lambda w, i: 0.5 * jnp.mean((x[i] @ w - y[i]) ** 2)
  masks = jnp.asarray(rng.random((200, 16, 8)) < 0.12, jnp.float64)
  batches = jnp.asarray(rng.integers(0, 256, (200, 32)))

  def train(tx):
    def step(carry, inputs):
      w, state = carry
      i, mask = inputs
      updates, state = tx.update(jax.grad(loss)(w, i) * mask, state, w)
      return (optax.apply_updates(w, updates), state), jnp.max(jnp.abs(updates))

    w = jnp.zeros((16, 8))
    (w, _), sizes = jax.lax.scan(step, (w, tx.init(w)), (batches, masks))
    return float(loss(w, jnp.arange(256))), float(jnp.max(sizes))

  initial = float(loss(jnp.zeros((16, 8)), jnp.arange(256)))
  adam_loss, _ = train(optax.adam(0.03))
  soap_loss, largest = train(curvopt.soap(0.03))
  assert largest / 0.03 < 5  # Adam-like steps: 2.4 at most with dense gradients
  assert soap_loss < 0.2 * initial and soap_loss < 2 * adam_loss


_REFRESH_LOOP = """
import jax, jax.numpy as jnp, optax, curvopt
from curvopt.bench.workloads import WORKLOADS
workload = WORKLOADS["mnist1d_cnn"]()
params = workload.init_params(jax.random.key(0))
batch = jax.tree.map(jnp.asarray, workload.batch(0, 0))
opt = curvopt.shampoo(1e-3, block_size=128, precondition_frequency=2, one_sided=False)

@jax.jit
def step(p, s):
  u, s = opt.update(jax.grad(lambda q: workload.value_fn(q, batch))(p), s, p)
  return optax.apply_updates(p, u), s

p, s = params, opt.init(params)
for _ in range(80):
  p, s = step(p, s)
print(int(jax.block_until_ready(s.inner_state[0].failures)))
"""


@pytest.mark.slow  # a deadlock regression: many concurrent LAPACK calls
def test_batched_root_calls_do_not_deadlock_the_cpu_thread_pool():
  """Forty refreshes of four factor sizes beside convolutions (3 of 4 runs hung unordered)."""
  pytest.importorskip("mnist1d")
  try:
    done = subprocess.run(
      [sys.executable, "-c", _REFRESH_LOOP], capture_output=True, text=True, timeout=150
    )
  except subprocess.TimeoutExpired:
    pytest.fail("the refresh loop deadlocked: batched eigh calls ran concurrently")
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "0"


def test_soap_power_qr_refresh_converges_to_the_eigenbasis():
  """Repeated `Q <- qr(S Q)` (columns ordered by diag(Q^T S Q)) reaches eigh's basis."""
  from curvopt.transforms.kronecker._soap import _power_qr_bases

  with jax.enable_x64(True):
    rotation = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (5, 5), jnp.float64))[0]
    eigenvalues = jnp.array([5.0, 3.0, 2.0, 1.0, 0.5])
    s = (rotation * eigenvalues) @ rotation.T
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (5, 5), jnp.float64))[0]
    statistics, bases = ((s[None],),), ((q[None],),)
    for _ in range(80):
      bases = _power_qr_bases(statistics, bases)
    overlap = jnp.abs(bases[0][0][0].T @ rotation)  # columns in descending eigenvalue order
    np.testing.assert_allclose(overlap, np.eye(5), atol=1e-8)


def test_soap_power_qr_takes_eigh_first_and_stays_close_to_it():
  gradients = jax.random.normal(jax.random.key(0), (12, 6, 4))
  runs = {}
  for method in ("eigh", "power_qr"):
    tx = scale_by_soap(precondition_frequency=2, eigenbasis_method=method, one_sided=False)
    state = tx.init(gradients[0])
    bases = []
    for g in gradients:
      _, state = tx.update(g, state)
      bases.append(state.eigenbases)
    runs[method] = bases
  # The first refresh (step 0) is eigh in both; later ones differ but stay orthogonal.
  chex.assert_trees_all_close(runs["power_qr"][0], runs["eigh"][0], atol=1e-6)
  assert not np.allclose(runs["power_qr"][-1][0][0], runs["eigh"][-1][0][0], atol=1e-3)
  for q in jax.tree.leaves(runs["power_qr"][-1]):
    np.testing.assert_allclose(q[0].T @ q[0], np.eye(q.shape[-1]), atol=1e-5)
  with pytest.raises(ValueError, match="eigenbasis_method must be one of"):
    curvopt.soap(0.1, eigenbasis_method="qr")


@pytest.mark.parametrize("beta2", [0.9, 0.5])
def test_an_ema_of_a_constant_gradient_debiased_gives_the_polar_factor_every_step(beta2):
  # With beta2 < 1 the statistics are debiased by 1 - beta2**t at step t (count + 1): for
  # a constant G the debiased factors are G G^T and G^T G exactly, so every step, the
  # first included, returns U V^T. A debias by 1 - beta2**(t - 1) divides by zero first.
  g = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)))
  tx = scale_by_shampoo(
    beta2=beta2,
    precondition_frequency=1,
    start_preconditioning_step=0,
    grafting=None,
    epsilon=0.0,
    rank_rtol=1e-10,
    one_sided=False,
  )
  u, _, vt = np.linalg.svd(np.asarray(g), full_matrices=False)
  state = tx.init(g)
  for _ in range(4):
    updates, state = tx.update(g, state)
    np.testing.assert_allclose(updates, u @ vt, atol=1e-10)


def test_nesterov_momentum_uses_the_updated_momentum():
  # m_t = b m_{t-1} + (1 - b) u_t; Nesterov outputs b m_t + (1 - b) u_t (not b m_{t-1} + ...,
  # which is plain momentum again).
  tx = curvopt.transforms.ema_momentum(0.5, nesterov=True)
  state = tx.init(jnp.zeros(1))
  out1, state = tx.update(jnp.array([1.0]), state)
  out2, state = tx.update(jnp.array([3.0]), state)
  np.testing.assert_allclose(out1, [0.5 * 0.5 + 0.5 * 1.0], rtol=1e-15)  # m1 = 0.5
  np.testing.assert_allclose(out2, [0.5 * 1.75 + 0.5 * 3.0], rtol=1e-15)  # m2 = 1.75
  plain = curvopt.transforms.ema_momentum(0.5)
  state = plain.init(jnp.zeros(1))
  _, state = plain.update(jnp.array([1.0]), state)
  np.testing.assert_allclose(plain.update(jnp.array([3.0]), state)[0], [1.75], rtol=1e-15)
  # Through curvopt.shampoo: its nesterov switch reaches the momentum.
  g = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3)))
  outs = []
  for nesterov in (False, True):
    opt = curvopt.shampoo(1.0, b1=0.5, nesterov=nesterov, grafting=None)
    s = opt.init(g)
    _, s = opt.update(g, s, g)
    outs.append(opt.update(2 * g, s, g)[0])
  assert not np.allclose(outs[0], outs[1])
