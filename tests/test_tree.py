"""Pytree linear algebra (`curvopt._tree`) against numpy, leaf by leaf and as one vector."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import _tree


def _tree_of(*shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {f"x{i}": jnp.asarray(rng.normal(size=shape)) for i, shape in enumerate(shapes)}


def _flat(tree):
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.fixture(params=["one_vector", "leaf_by_leaf"])
def reduction(request, monkeypatch):
  """Both ways a reduction reads a tree: as one vector, or leaf by leaf above the limit."""
  if request.param == "leaf_by_leaf":
    monkeypatch.setattr(_tree, "ONE_VECTOR_LIMIT", 0)
  return request.param


def test_structure_and_size_of_arrays_scalars_and_empty_trees():
  tree = {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.int32(4), "c": np.ones(5, np.float32)}
  structure = _tree.structure_of(tree)
  assert structure["a"] == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)
  assert structure["b"] == jax.ShapeDtypeStruct((), jnp.int32)
  assert structure["c"] == jax.ShapeDtypeStruct((5,), jnp.float32)
  assert _tree.size_of(tree) == 6 + 1 + 5
  assert _tree.size_of(structure) == 12
  assert _tree.size_of({}) == 0
  assert _tree.size_of(jax.ShapeDtypeStruct((4, 0, 3), jnp.float32)) == 0


def test_is_key_only_for_typed_keys():
  key = jax.random.key(0)
  assert _tree.is_key(key)
  assert _tree.is_key(jax.ShapeDtypeStruct((2,), key.dtype))
  assert not _tree.is_key(jax.random.PRNGKey(0))  # raw uint32 words
  assert not _tree.is_key(jnp.zeros(3))
  assert not _tree.is_key(1.5)  # no dtype at all


@pytest.mark.parametrize(
  "dtypes, expected",
  [
    ((jnp.bfloat16,), jnp.float32),
    ((jnp.float16, jnp.int32), jnp.float32),
    ((jnp.float32, jnp.float64), jnp.float64),
    ((jnp.float64,), jnp.float64),
    ((), jnp.float32),
  ],
)
def test_working_dtype_is_float64_only_when_a_leaf_is(dtypes, expected):
  structure = [jax.ShapeDtypeStruct((2,), d) for d in dtypes]
  assert _tree.working_dtype(structure) == expected


def test_zeros_statistics_zeros_and_casts_keep_shapes_and_choose_dtypes():
  tree = {
    "h": jnp.ones((2, 2), jnp.bfloat16),
    "f": jnp.ones(3, jnp.float16),
    "s": jnp.ones(1, jnp.float32),
    "d": jnp.ones((), jnp.float64),
  }
  zeros = _tree.zeros(_tree.structure_of(tree))
  assert {k: (v.shape, v.dtype) for k, v in zeros.items()} == {
    k: (v.shape, v.dtype) for k, v in tree.items()
  }
  assert all(not np.any(np.asarray(v, np.float64)) for v in zeros.values())
  assert all(v.dtype == jnp.float64 for v in _tree.zeros(tree, jnp.float64).values())
  statistics = _tree.statistics_zeros(tree)
  assert {k: v.dtype for k, v in statistics.items()} == {
    "h": jnp.float32,
    "f": jnp.float32,
    "s": jnp.float32,
    "d": jnp.float64,
  }
  assert statistics["h"].shape == (2, 2) and not np.any(statistics["h"])
  assert all(v.dtype == jnp.bfloat16 for v in _tree.cast(tree, jnp.bfloat16).values())
  wide = _tree.cast(tree, jnp.float64)
  back = _tree.cast_like(wide, tree)
  assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in tree.items()}


def test_dot_norm_and_max_abs_equal_numpy_both_ways(reduction):
  a, b = _tree_of((3, 4), (5,), (), seed=1), _tree_of((3, 4), (5,), (), seed=2)
  np.testing.assert_allclose(_tree.dot(a, b), _flat(a) @ _flat(b), rtol=1e-14)
  np.testing.assert_allclose(_tree.norm(a), np.linalg.norm(_flat(a)), rtol=1e-14)
  negative = {"x0": -jnp.arange(4.0) - 9.0, "x1": jnp.arange(3.0), "x2": jnp.float64(2.0)}
  assert float(_tree.max_abs(negative)) == 12.0
  assert float(_tree.max_abs({"only": jnp.asarray([-3.0, 2.0])})) == 3.0
  assert float(_tree.dot(jnp.arange(3.0), jnp.arange(3.0))) == 5.0  # a single leaf


def test_dot_refuses_trees_with_different_leaf_counts():
  with pytest.raises(ValueError, match="dot of trees with 2 and 1 leaves"):
    _tree.dot({"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": jnp.ones(4)})


def test_one_vector_below_the_limit_of_two_to_the_24_scalars_only():
  half = np.broadcast_to(np.float32(0), (2**23,))  # no memory behind it
  assert _tree.one_vector([half, half])
  assert not _tree.one_vector([half, half, np.zeros(1, np.float32)])
  assert not _tree.one_vector([np.zeros(3)])  # one leaf is already one vector
  assert _tree.one_vector([np.zeros(3), np.zeros(())])


def test_stacked_vectors_against_numpy():
  structure = _tree.structure_of(_tree_of((2, 3), (4,)))
  basis = _tree.stacked_zeros(3, structure, jnp.float64)
  assert [leaf.shape for leaf in jax.tree.leaves(basis)] == [(3, 2, 3), (3, 4)]
  rows = [_tree_of((2, 3), (4,), seed=s) for s in (3, 4, 5)]
  for i, row in enumerate(rows):
    basis = _tree.stacked_set(basis, i, _tree.cast(row, jnp.float32))
  assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(basis))  # cast to the basis
  matrix = np.stack([_flat(_tree.cast(row, jnp.float32)) for row in rows])
  np.testing.assert_array_equal(_flat(_tree.stacked_get(basis, 1)), matrix[1])
  v = _tree_of((2, 3), (4,), seed=6)
  np.testing.assert_allclose(_tree.stacked_dot(basis, v), matrix @ _flat(v), rtol=1e-13)
  c = np.array([0.5, -2.0, 3.0])
  combined = _tree.stacked_combine(basis, jnp.asarray(c))
  np.testing.assert_allclose(_flat(combined), c @ matrix, rtol=1e-13)
  many = np.arange(6.0).reshape(3, 2)  # (k, m): m combinations at once
  both = _tree.stacked_combine(basis, jnp.asarray(many))
  np.testing.assert_allclose(
    np.concatenate([both["x0"].reshape(2, -1), both["x1"]], axis=1), many.T @ matrix, rtol=1e-13
  )
  head = _tree.stacked_head(basis, 2)
  assert [leaf.shape[0] for leaf in jax.tree.leaves(head)] == [2, 2]
  np.testing.assert_array_equal(_flat(_tree.stacked_get(head, 1)), matrix[1])
  projected = _tree.project_out(basis, v)
  np.testing.assert_allclose(
    _flat(projected), _flat(v) - matrix.T @ (matrix @ _flat(v)), rtol=1e-12, atol=1e-12
  )


def _scaled_basis(scale):
  """One row, `scale` times the first unit vector: a pass keeps 1 - scale**2 of that component."""
  basis = _tree.stacked_zeros(1, jax.ShapeDtypeStruct((2,), jnp.float64), jnp.float64)
  return _tree.stacked_set(basis, 0, jnp.asarray([scale, 0.0]))


def test_orthogonalize_runs_a_second_pass_only_below_the_dgks_ratio():
  # One pass keeps (0.75, 1) of (1, 1): norm ratio 0.88 > 1/sqrt(2), no second pass.
  once = _tree.orthogonalize(_scaled_basis(0.5), jnp.asarray([1.0, 1.0]))
  np.testing.assert_array_equal(once, [0.75, 1.0])
  # Of (1, 0) one pass keeps (0.75, 0): ratio 0.75, still one pass.
  np.testing.assert_array_equal(
    _tree.orthogonalize(_scaled_basis(0.5), jnp.asarray([1.0, 0.0])), [0.75, 0.0]
  )
  # With scale 0.6 one pass keeps 0.64 of (1, 0) < 0.7071: a second pass, 0.64**2.
  np.testing.assert_allclose(
    _tree.orthogonalize(_scaled_basis(0.6), jnp.asarray([1.0, 0.0])), [0.64**2, 0.0], rtol=1e-15
  )
  # An orthonormal basis: the result is orthogonal to it.
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 3)))
  basis = jnp.asarray(q.T)
  v = jnp.asarray(q[:, 0] * 1e3 + np.arange(6.0) * 1e-9)  # almost in the span: two passes
  out = _tree.orthogonalize(basis, v)
  assert np.abs(q.T @ np.asarray(out)).max() < 1e-20


def test_own_buffers_copies_repeated_buffers_only():
  shared = jnp.arange(3.0)
  other = jnp.ones(2)
  tree = {"a": shared, "b": shared, "c": other, "d": 1.5, "e": np.zeros(2)}
  owned = _tree.own_buffers(tree)
  assert owned["a"] is shared and owned["c"] is other
  assert owned["d"] == 1.5 and owned["e"] is tree["e"]
  assert owned["b"] is not shared
  np.testing.assert_array_equal(owned["b"], shared)
  pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
  assert pointer(owned["b"]) != pointer(owned["a"])
  # Three leaves of one buffer: every repeat gets its own copy.
  three = _tree.own_buffers([shared, shared, shared])
  assert len({pointer(x) for x in three}) == 3
  # A deleted array cannot be read: it is returned as it is.
  gone = jnp.ones(4)
  gone.delete()
  assert _tree.own_buffers([gone])[0] is gone
  # Under tracing the leaves are tracers: nothing to deduplicate.
  traced = jax.jit(lambda x: _tree.own_buffers({"p": x, "q": x}))(shared)
  np.testing.assert_array_equal(traced["q"], shared)


def test_stacked_vectors_keep_the_basis_dtype_shape_and_leaf_count():
  structure = {
    "a": jax.ShapeDtypeStruct((2,), jnp.float64),
    "b": jax.ShapeDtypeStruct((3,), jnp.float64),
  }
  basis = _tree.stacked_zeros(2, structure, jnp.float32)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(basis))
  wide = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([3.0, 4.0, 5.0])}
  basis = _tree.stacked_set(basis, 1, wide)  # float64 vectors stored in the float32 basis
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(basis))
  row = _tree.stacked_get(basis, 1)
  assert row["a"].shape == (2,) and row["b"].shape == (3,)
  np.testing.assert_array_equal(row["b"], [3.0, 4.0, 5.0])
  with pytest.raises(ValueError):
    _tree.stacked_dot(basis, {"a": jnp.ones(2)})  # one leaf against two


def test_orthogonalize_compares_norms_not_a_ratio_over_the_norm():
  # v = (3, 0), one row 0.6 e1: one pass keeps 1.92 of 3 (0.64 < 0.7071): a second pass.
  out = _tree.orthogonalize(_scaled_basis(0.6), jnp.asarray([3.0, 0.0]))
  np.testing.assert_allclose(out, [3.0 * 0.64**2, 0.0], rtol=1e-15)
