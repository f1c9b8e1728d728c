"""Property-based tests of the operators over random pytree shapes and dtypes (hypothesis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvopt

hypothesis = pytest.importorskip("hypothesis")

# Property-based: many random pytrees each; the dense references of test_oracles.py run by default.
pytestmark = pytest.mark.slow
st = hypothesis.strategies
# Every example compiles new shapes: few examples, derandomized so CI is reproducible.
settings = hypothesis.settings(max_examples=6, deadline=None, derandomize=True)

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
leaf_shapes = st.dictionaries(st.sampled_from("abcde"), shapes, min_size=1, max_size=3)


def _params(shapes: dict, dtype, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
    name: jax.random.normal(k, shape, jnp.float64).astype(dtype)
    for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
  }


def _value_fn(params):
  # Couples every leaf with every other: a dense, indefinite Hessian.
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float64) for x in jax.tree.leaves(params)])
  return jnp.sum(jnp.cos(flat) * flat**2) + jnp.sum(flat) ** 3 / 10


@settings
@hypothesis.given(leaf_shapes, st.integers(0, 3))
def test_hessian_products_equal_the_dense_hessian(shapes, seed):
  params = _params(shapes, jnp.float64, seed)
  flat, unravel = ravel_pytree(params)
  dense = np.asarray(jax.hessian(lambda f: _value_fn(unravel(f)))(flat))
  operator = curvopt.hessian(_value_fn, params)
  vector = curvopt.random_vector(jax.random.key(seed), params, "gaussian")
  got = ravel_pytree(operator.mv(vector))[0]
  np.testing.assert_allclose(got, dense @ ravel_pytree(vector)[0], rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(operator.as_matrix(), dense, rtol=1e-10, atol=1e-10)
  assert operator.size == flat.size


@settings
@hypothesis.given(leaf_shapes, st.sampled_from([jnp.float32, jnp.float64, jnp.bfloat16]))
def test_products_and_probes_keep_the_structure_and_dtypes(shapes, dtype):
  params = _params(shapes, dtype)
  operator = curvopt.hessian(lambda p: _value_fn(p).astype(jnp.float32), params)
  probe = curvopt.random_vector(jax.random.key(1), params)
  out = operator.mv(probe)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  for leaf, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
    assert leaf.shape == p.shape and leaf.dtype == p.dtype
  for leaf in jax.tree.leaves(probe):
    np.testing.assert_array_equal(np.abs(np.asarray(leaf, np.float64)), 1.0)  # Rademacher


@settings
@hypothesis.given(leaf_shapes, st.integers(0, 3))
def test_gauss_newton_is_symmetric_positive_semidefinite_and_factors_exactly(shapes, seed):
  params = _params(shapes, jnp.float64, seed)
  flat, _ = ravel_pytree(params)
  x = jax.random.normal(jax.random.key(seed + 10), (5, flat.size), jnp.float64)
  model_fn = lambda p: jnp.tanh(x @ ravel_pytree(p)[0]).reshape(5, 1) * jnp.arange(1.0, 3.0)
  loss_fn = lambda out: jnp.mean(jax.nn.logsumexp(out, axis=-1) - out[:, 0])
  ggn = curvopt.gauss_newton(model_fn, loss_fn, params).as_matrix()
  np.testing.assert_allclose(ggn, ggn.T, atol=1e-12)
  assert np.linalg.eigvalsh(ggn).min() > -1e-10
  factor = curvopt.gauss_newton_factor(model_fn, loss_fn, params).as_matrix()
  np.testing.assert_allclose(factor.T @ factor, ggn, atol=1e-10)


@settings
@hypothesis.given(leaf_shapes, st.data())
def test_restrict_is_the_dense_diagonal_block(shapes, data):
  params = _params(shapes, jnp.float64)
  names = sorted(shapes)
  chosen = data.draw(st.sets(st.sampled_from(names), min_size=1))
  mask = {name: name in chosen for name in names}
  flat, unravel = ravel_pytree(params)
  dense = np.asarray(jax.hessian(lambda f: _value_fn(unravel(f)))(flat))
  selected = np.concatenate(
    [np.full(max(1, int(np.prod(shapes[n]))), n in chosen) for n in names]
  ).astype(bool)
  block = curvopt.restrict(curvopt.hessian(_value_fn, params), mask).as_matrix()
  np.testing.assert_allclose(block, dense[np.ix_(selected, selected)], rtol=1e-10, atol=1e-10)
