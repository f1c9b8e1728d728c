"""Probe vectors: moments, independence and determinism of both draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvopt

STRUCTURE = {"a": jnp.zeros((37, 5)), "b": jnp.zeros(3)}  # sizes not multiples of 32


def _draws(distribution, counter, n=4000, d=190):
  key = jax.random.key(11)
  structure = jnp.zeros(d)
  if counter:
    draw = lambda t: curvopt.random_vector(key, structure, distribution, counter=t)
    return np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(n)))
  keys = jax.random.split(key, n)
  return np.asarray(jax.vmap(lambda k: curvopt.random_vector(k, structure, distribution))(keys))


@pytest.mark.parametrize("counter", [False, True], ids=["threefry", "counter"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_probe_entries_have_mean_zero_unit_variance_and_no_correlation(distribution, counter):
  z = _draws(distribution, counter)
  n, d = z.shape
  if distribution == "rademacher":
    assert set(np.unique(z)) == {-1.0, 1.0}
  # Five standard errors: mean (1/sqrt(nd)), variance, and E[z z^T] = I entrywise.
  assert abs(z.mean()) < 5 / np.sqrt(n * d)
  assert abs(z.var() - 1) < 5 * np.sqrt(z.var(axis=0).var() / d + 2 / (n * d))
  second = z.T @ z / n
  off_diagonal = second[~np.eye(d, dtype=bool)]
  assert np.abs(off_diagonal).max() < 5.5 / np.sqrt(n)
  assert abs(np.mean(off_diagonal**2) * n - 1) < 0.1  # off-diagonal spread is pure noise
  consecutive = np.mean(z[1:] * z[:-1], axis=1)  # successive probes are independent
  assert abs(np.mean(consecutive**2) * d - 1) < 0.15


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_counter_probe_is_a_function_of_key_and_counter_only(distribution):
  key = jax.random.key(4)
  draw = lambda t: curvopt.random_vector(key, STRUCTURE, distribution, counter=t)
  eager, jitted = draw(3), jax.jit(draw)(jnp.int32(3))
  for leaf_a, leaf_b, like in zip(
    jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(STRUCTURE), strict=True
  ):
    np.testing.assert_array_equal(leaf_a, leaf_b)
    assert leaf_a.shape == like.shape and leaf_a.dtype == like.dtype
  other_counter = curvopt.random_vector(key, STRUCTURE, distribution, counter=4)
  other_key = curvopt.random_vector(jax.random.key(5), STRUCTURE, distribution, counter=3)
  for other in (other_counter, other_key):
    assert not np.array_equal(eager["a"], other["a"])


def test_probe_leaves_are_consecutive_pieces_of_one_draw():
  key = jax.random.key(2)
  flat = curvopt.random_vector(key, jnp.zeros(37 * 5 + 3), counter=9)
  tree = curvopt.random_vector(key, STRUCTURE, counter=9)
  np.testing.assert_array_equal(tree["a"].reshape(-1), flat[: 37 * 5])
  np.testing.assert_array_equal(tree["b"], flat[37 * 5 :])
