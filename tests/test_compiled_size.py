"""What the compiled program holds: reductions over a pytree are not copied into per-leaf kernels.

XLA copies a cheap producer into every consumer kernel. A sum of per-leaf
partial results is a chain of scalar additions, cheap enough to be copied
into each kernel that reads it: a global norm scaling every leaf, or a
predicate selecting every leaf, then compiles the whole chain once per leaf
(measured: Newton-CG's program on a transformer doubled).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import _tree

LEAVES = 40


def _compiled_lines(fn, *args) -> int:
  return len(jax.jit(fn).lower(*args).compile().as_text().splitlines())


def _tree_of(scale: float) -> list[jax.Array]:
  return [jnp.full((8, 16), scale * (i + 1)) for i in range(LEAVES)]


@pytest.mark.parametrize("large", [False, True], ids=["one_vector", "leaf_by_leaf"])
def test_tree_reductions_are_exact_against_numpy_in_float64(large, monkeypatch):
  if large:  # the path taken above ONE_VECTOR_LIMIT scalars
    monkeypatch.setattr(_tree, "ONE_VECTOR_LIMIT", 4)
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5), "s": np.float64(-7.5)}
    b = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5), "s": np.float64(-1.5)}
    flat_a = np.concatenate([np.ravel(a[k]) for k in sorted(a)])
    flat_b = np.concatenate([np.ravel(b[k]) for k in sorted(b)])
    a, b = jax.tree.map(jnp.asarray, a), jax.tree.map(jnp.asarray, b)
    np.testing.assert_allclose(float(_tree.dot(a, b)), flat_a @ flat_b, rtol=1e-14)
    np.testing.assert_allclose(float(_tree.norm(a)), np.linalg.norm(flat_a), rtol=1e-14)
    assert float(_tree.max_abs(a)) == 7.5


def test_dot_refuses_trees_of_different_sizes():
  with pytest.raises(ValueError, match="2 and 1 leaves"):
    _tree.dot([jnp.ones(2), jnp.ones(2)], [jnp.ones(2)])


def test_a_predicate_from_dot_selects_every_leaf_without_copying_the_reduction():
  def select_by(predicate_of):
    def program(a, b, c):
      s, t = predicate_of(a, b), predicate_of(b, c)
      keep = jnp.isfinite(s) & (s > 0.5 * t) | ~jnp.isfinite(t)
      return [jnp.where(keep, 2.0 * x, x + y) for x, y in zip(a, b, strict=True)]

    return program

  given = lambda a, b: a[0][0, 0]  # a scalar from one leaf: nothing to copy
  a, b, c = _tree_of(1.0), _tree_of(2.0), _tree_of(3.0)
  baseline = _compiled_lines(select_by(given), a, b, c)
  # Summed leaf by leaf, the program had about 9x the baseline's lines (18.7k vs 2.0k).
  assert _compiled_lines(select_by(_tree.dot), a, b, c) < 1.5 * baseline


def test_psgd_kron_steps_factors_of_one_size_once_across_leaves():
  from curvopt.transforms.psgd._driver import FitSettings
  from curvopt.transforms.psgd._kron import kron_family

  def fit_lines(shapes):
    tree = {f"w{i}": jnp.ones(s) for i, s in enumerate(shapes)}
    family = kron_family(
      tree, FitSettings(0.9, True), geometry="Q0.5EQ1.5", max_size=None, max_skew=float("inf")
    )
    x = family.view(tree)
    state = family.init(x, None)
    return _compiled_lines(lambda s, v, h: family.fit(s, v, h, 0.1, 0.5), state, x, x)

  # The second leaf brings no new factor size: its factors join the first's programs.
  # Now 1.7k lines against 1.3k; stepped leaf by leaf, 2.5k against 1.4k.
  one, two = fit_lines([(16, 24)]), fit_lines([(16, 24), (24, 16)])
  assert two < 1.5 * one, (one, two)
