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


# An independent replica of the counter-based draw: Wellons' lowbias32 finalizer, the
# golden-ratio stream, 32 signs per word and Box-Muller on 24-bit uniforms.
def _lowbias32(x):
  x = np.asarray(x, np.uint64) & 0xFFFFFFFF
  x ^= x >> 16
  x = (x * 0x7FEB352D) & 0xFFFFFFFF
  x ^= x >> 15
  x = (x * 0x846CA68B) & 0xFFFFFFFF
  return x ^ (x >> 16)


def _replica_words(key, counter, m):
  stream = np.uint64((counter * 0x9E3779B9) & 0xFFFFFFFF)
  for word in np.asarray(jax.random.key_data(key)).reshape(-1):
    stream = _lowbias32(stream ^ np.uint64(word))
  offset = _lowbias32(stream ^ np.uint64(0x9E3779B9))
  index = np.arange(m, dtype=np.uint64)
  return _lowbias32((_lowbias32(index ^ stream) + offset) & 0xFFFFFFFF)


def _replica_signs(words, n):
  bits = (words[:, None] >> np.arange(32, dtype=np.uint64)) & 1
  return 2.0 * bits.reshape(-1)[:n] - 1.0


def _replica_uniforms(words):
  """The 24-bit uniforms in (0, 1) of the Gaussian draw, rounded to float32 as drawn."""
  return ((words >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)


@pytest.mark.parametrize("counter", [0, 7, 2**31 + 5])
def test_counter_signs_equal_an_independent_replica_of_the_hash(counter):
  key = jax.random.key(123)
  n = 100  # four words, the last one partly used
  z = curvopt.random_vector(key, jnp.zeros(n), counter=counter)
  np.testing.assert_array_equal(z, _replica_signs(_replica_words(key, counter, 4), n))


@pytest.mark.parametrize("n", [4097, 4096])  # odd: the last sine is cut off
def test_counter_gaussians_equal_box_muller_on_the_replica_words(n):
  key, counter = jax.random.key(3), 5
  z = np.asarray(curvopt.random_vector(key, jnp.zeros(n, jnp.float32), "gaussian", counter=counter))
  assert z.dtype == np.float32
  half = (n + 1) // 2
  words = _replica_words(key, counter, 2 * half)
  u1, u2 = _replica_uniforms(words[:half]), _replica_uniforms(words[half:])
  sines = z[half:] if n % 2 == 0 else np.append(z[half:], 0.0)  # pad the cut-off sine
  cosines, sines = z[:half].astype(np.float64), sines.astype(np.float64)
  radius = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
  # The radius, from both halves; near u1 = 1 it is small and sensitive to u1's last bit.
  np.testing.assert_allclose(np.hypot(cosines[:-1], sines[:-1]), radius[:-1], rtol=2e-6)
  np.testing.assert_allclose(
    np.abs(cosines[-1]), np.abs(radius[-1] * np.cos(2 * np.pi * float(u2[-1]))), rtol=1e-5
  )
  angle = np.mod(np.arctan2(sines[:-1], cosines[:-1]), 2 * np.pi)
  wrapped = np.abs(np.angle(np.exp(1j * (angle - 2 * np.pi * u2[:-1]))))
  assert wrapped.max() < 1e-5


def test_counter_uniform_is_the_top_24_bits_of_the_first_word():
  key = jax.random.key(9)
  for counter in (0, 1, 77):
    word = _replica_words(key, counter, 1)[0]
    u = curvopt.oracles._probes.counter_uniform(key, counter)
    assert u.dtype == jnp.float32
    assert float(u) == float(word >> 8) * 2.0**-24


def test_threefry_draws_are_jax_random_draws_cut_into_the_leaves():
  key = jax.random.key(21)
  d = 37 * 5 + 3
  signs = curvopt.random_vector(key, STRUCTURE)
  words = np.asarray(jax.random.bits(key, ((d + 31) // 32,), jnp.uint32)).astype(np.uint64)
  flat = np.concatenate([np.ravel(signs["a"]), signs["b"]])
  np.testing.assert_array_equal(flat, _replica_signs(words, d))
  normals = curvopt.random_vector(key, STRUCTURE, "gaussian")
  flat = np.concatenate([np.ravel(normals["a"]), normals["b"]])
  np.testing.assert_array_equal(flat, jax.random.normal(key, (d,), STRUCTURE["a"].dtype))


@pytest.mark.parametrize("counter", [None, 3], ids=["threefry", "counter"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_probe_dtypes_the_draw_in_the_working_dtype_and_casts_per_leaf(distribution, counter):
  key = jax.random.key(8)
  mixed = {"half": jnp.zeros(5, jnp.bfloat16), "single": jnp.zeros(4, jnp.float32)}
  z = curvopt.random_vector(key, mixed, distribution, counter=counter)
  assert z["half"].dtype == jnp.bfloat16 and z["single"].dtype == jnp.float32
  # Drawn in float32 (no leaf is float64), then each leaf cast to its own dtype.
  flat = curvopt.random_vector(key, jnp.zeros(9, jnp.float32), distribution, counter=counter)
  np.testing.assert_array_equal(z["single"], flat[5:])
  np.testing.assert_array_equal(z["half"], flat[:5].astype(jnp.bfloat16))
  # A float64 structure draws in float64; an explicit dtype draws in that dtype instead.
  wide = curvopt.random_vector(key, jnp.zeros(9, jnp.float64), distribution, counter=counter)
  assert wide.dtype == jnp.float64
  if counter is None and distribution == "gaussian":
    np.testing.assert_array_equal(wide, jax.random.normal(key, (9,), jnp.float64))
  narrowed = curvopt.random_vector(
    key, jnp.zeros(9, jnp.float64), distribution, jnp.float32, counter=counter
  )
  assert narrowed.dtype == jnp.float32
  np.testing.assert_array_equal(narrowed, flat)
  both = curvopt.random_vector(key, mixed, distribution, jnp.float32, counter=counter)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(both))
  np.testing.assert_array_equal(both["half"], flat[:5])


def test_unknown_distribution_is_refused_by_name():
  with pytest.raises(
    ValueError, match="distribution must be one of 'rademacher', 'gaussian'; got 'normal'"
  ):
    curvopt.random_vector(jax.random.key(0), jnp.zeros(3), "normal")


@pytest.mark.parametrize("d", [64, 65])
def test_threefry_draws_of_float32_leaves_are_float32_draws(d):
  key = jax.random.key(30)
  normals = curvopt.random_vector(key, jnp.zeros(d, jnp.float32), "gaussian")
  np.testing.assert_array_equal(normals, jax.random.normal(key, (d,), jnp.float32))
  signs = curvopt.random_vector(key, jnp.zeros(d, jnp.float32))
  words = np.asarray(jax.random.bits(key, ((d + 31) // 32,), jnp.uint32)).astype(np.uint64)
  np.testing.assert_array_equal(signs, _replica_signs(words, d))  # a whole number of words


def test_three_leaves_are_three_consecutive_pieces():
  key = jax.random.key(6)
  structure = {"a": jnp.zeros(3), "b": jnp.zeros(5), "c": jnp.zeros((2, 2))}
  flat = curvopt.random_vector(key, jnp.zeros(12), "gaussian", counter=2)
  tree = curvopt.random_vector(key, structure, "gaussian", counter=2)
  np.testing.assert_array_equal(jnp.concatenate([tree["a"], tree["b"], tree["c"].ravel()]), flat)
