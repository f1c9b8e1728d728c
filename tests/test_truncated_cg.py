"""Newton-CG's truncated conjugate gradients and backtracking against a numpy replica."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvopt
from curvopt.transforms.gauss_newton._newton_cg import (
  _truncated_cg,
  scale_by_newton_cg,
  snapshot_iterations,
)


def _replica(a, b, x0, max_iters, tol):
  """Truncated CG in numpy: (x, iterations, negative, snapshots)."""
  stops = [min(max_iters, math.ceil(1.3**k)) for k in range(64)]
  stops = sorted(set(stops))
  tiny = np.finfo(np.float64).tiny
  x, r = x0.copy(), b - a @ x0
  p, rr, i, negative = r.copy(), r @ r, 0, False
  snapshots = {}
  threshold = (tol * np.linalg.norm(b)) ** 2
  while i < max_iters and rr > threshold and not negative:
    ap = a @ p
    pap = p @ ap
    negative = pap <= 0
    alpha = rr / (abs(pap) + tiny if negative else pap)
    x = x + alpha * p
    r = r - alpha * ap
    rr_new = r @ r
    p = r + rr_new / max(rr, tiny) * p
    rr, i = rr_new, i + 1
    if i in stops:
      snapshots[i] = x
  return x, i, negative, np.stack([snapshots.get(s, x) for s in stops])


def test_snapshot_iterations_are_the_ceilings_of_powers_of_1_3_capped():
  assert snapshot_iterations(20) == (1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 20)
  assert snapshot_iterations(1) == (1,)
  assert snapshot_iterations(3) == (1, 2, 3)


def _spd(d, seed, shift=0.1):
  m = np.random.default_rng(seed).normal(size=(d, d))
  return m @ m.T / d + shift * np.eye(d)


@pytest.mark.parametrize(
  ("case", "max_iters", "tol"),
  [
    ("spd", 40, 1e-10),  # stops at the tolerance
    ("spd", 6, 1e-12),  # stops at the iteration cap
    ("spd", 40, 0.3),  # a loose tolerance
    ("indefinite", 30, 1e-10),  # stops at negative curvature
  ],
)
def test_truncated_cg_equals_the_replica(case, max_iters, tol):
  d = 12
  a = _spd(d, 0)
  if case == "indefinite":
    a = a - 0.6 * np.eye(d)
  b = np.random.default_rng(1).normal(size=d)
  x0 = 0.1 * np.random.default_rng(2).normal(size=d)
  matvec = lambda v: jnp.asarray(a) @ v
  out = _truncated_cg(matvec, jnp.asarray(b), jnp.asarray(x0), max_iters, tol)
  x, i, negative, snapshots = _replica(a, b, x0, max_iters, tol)
  assert int(out.i) == i and bool(out.negative) == negative
  np.testing.assert_allclose(out.x, x, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(out.snapshots, snapshots, rtol=1e-9, atol=1e-12)
  if case == "indefinite":
    assert negative and i < max_iters
  elif max_iters == 6:
    assert i == 6
  else:
    assert i < max_iters


def test_a_zero_right_hand_side_at_the_solution_takes_no_iteration():
  a = _spd(4, 3)
  out = _truncated_cg(lambda v: jnp.asarray(a) @ v, jnp.zeros(4), jnp.zeros(4), 10, 1e-4)
  assert int(out.i) == 0 and not bool(out.negative)
  np.testing.assert_array_equal(out.snapshots, np.zeros((len(snapshot_iterations(10)), 4)))


@pytest.mark.parametrize("backtracking", [False, True])
def test_a_step_is_minus_the_cg_solution_or_the_best_snapshot(backtracking):
  d = 10
  a = _spd(d, 4, shift=0.01)
  c = np.random.default_rng(5).normal(size=d)
  value_fn = lambda w: 0.5 * w @ jnp.asarray(a) @ w + jnp.sum(jnp.cos(3.0 * w)) - jnp.asarray(c) @ w
  w = jnp.asarray(np.random.default_rng(6).normal(size=d))
  lam = 0.05
  tx = scale_by_newton_cg(
    lam, curvature="hessian", max_cg_iters=8, cg_tol=1e-8, backtracking=backtracking
  )
  state = tx.init(w)
  assert state.previous.shape == (d,) and int(state.cg_iterations) == 0
  g = np.asarray(jax.grad(value_fn)(w))
  h = np.asarray(jax.hessian(value_fn)(w)) + lam * np.eye(d)
  step, state = tx.update(jnp.asarray(g), state, w, value_fn=value_fn)
  x, i, negative, snapshots = _replica(h, -g, np.zeros(d), 8, 1e-8)
  if backtracking:
    values = [float(value_fn(w + jnp.asarray(s))) for s in snapshots]
    x = snapshots[int(np.argmin(values))]
  np.testing.assert_allclose(step, -x, rtol=1e-8, atol=1e-12)
  assert int(state.cg_iterations) == i
  assert int(state.negative_curvature) == int(negative)
  # The next solve starts from 0.95 of this one's final CG iterate.
  final = _replica(h, -g, np.zeros(d), 8, 1e-8)[0]
  np.testing.assert_allclose(state.previous, final, rtol=1e-8, atol=1e-12)
  step, state = tx.update(jnp.asarray(g), state, w, value_fn=value_fn)
  x2, i2, _, snapshots2 = _replica(h, -g, 0.95 * final, 8, 1e-8)
  if backtracking:
    values = [float(value_fn(w + jnp.asarray(s))) for s in snapshots2]
    x2 = snapshots2[int(np.argmin(values))]
  np.testing.assert_allclose(step, -x2, rtol=1e-7, atol=1e-11)
  assert int(state.cg_iterations) == i2


def test_damping_from_the_extra_argument_and_its_absence():
  value_fn = lambda w: 0.5 * jnp.sum(jnp.asarray([1.0, 3.0]) * w**2)
  w = jnp.asarray([1.0, 1.0])
  tx = scale_by_newton_cg(None, curvature="hessian", backtracking=False, cg_tol=1e-12)
  step, _ = tx.update(jax.grad(value_fn)(w), tx.init(w), w, value_fn=value_fn, damping=1.0)
  # The output is the Newton direction (H + damping)^-1 g; the learning rate negates it.
  np.testing.assert_allclose(step, np.asarray([1.0, 3.0]) / np.asarray([2.0, 4.0]), rtol=1e-12)
  with pytest.raises(
    TypeError, match="newton_cg with damping=None needs the extra argument damping"
  ):
    tx.update(jax.grad(value_fn)(w), tx.init(w), w, value_fn=value_fn)
  with pytest.raises(ValueError, match=r"newton_cg needs params in update\(updates, state, params"):
    tx.update(w, tx.init(w), None, value_fn=value_fn, damping=1.0)


def test_float32_parameters_solve_in_float32_and_updates_keep_their_dtypes():
  value_fn = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"].astype(jnp.float32) ** 4)
  params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
  tx = curvopt.transforms.scale_by_newton_cg(1.0, curvature="hessian")
  state = tx.init(params)
  assert state.previous.dtype == jnp.float32
  step, state = tx.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
  assert step["a"].dtype == jnp.float32 and step["b"].dtype == jnp.bfloat16
