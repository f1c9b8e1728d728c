"""Operators against dense float64 references (jax.hessian, Jacobians)."""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
  dense_empirical_fisher,
  dense_ggn,
  dense_hessian,
  mlp_problem,
  random_like,
  ravel,
)

import curvopt

RTOL = 1e-10


def _relative_error(actual, expected):
  return np.linalg.norm(np.asarray(actual) - np.asarray(expected)) / np.linalg.norm(expected)


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_hvp_equals_dense_hessian(loss):
  problem = mlp_problem(loss)
  v = random_like(jax.random.key(1), problem.params)
  dense = dense_hessian(problem.value_fn, problem.params)
  hv = jax.jit(curvopt.hvp, static_argnums=0)(problem.value_fn, problem.params, v)
  chex.assert_trees_all_equal_shapes_and_dtypes(hv, problem.params)
  assert _relative_error(ravel(hv), dense @ ravel(v)) < RTOL


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_gauss_newton_product_equals_dense(loss):
  problem = mlp_problem(loss)
  v = random_like(jax.random.key(2), problem.params)
  dense = dense_ggn(problem.model_fn, problem.loss_fn, problem.params)
  op = curvopt.gauss_newton(problem.model_fn, problem.loss_fn, problem.params)
  assert _relative_error(ravel(op.mv(v)), dense @ ravel(v)) < RTOL
  assert op.num_examples == 32
  assert curvopt.is_symmetric(op) and curvopt.is_positive_semidefinite(op)
  assert np.linalg.eigvalsh(dense).min() > -1e-10  # PSD for convex losses


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_empirical_fisher_product_equals_dense(loss):
  problem = mlp_problem(loss)
  v = random_like(jax.random.key(3), problem.params)
  dense = dense_empirical_fisher(problem.per_example_loss_fn, problem.params)
  op = curvopt.empirical_fisher(problem.per_example_loss_fn, problem.params)
  assert _relative_error(ravel(op.mv(v)), dense @ ravel(v)) < RTOL
  assert op.num_examples == 32


def test_as_matrix_equals_dense_hessian():
  problem = mlp_problem("mse", sizes=(3, 4, 2), n=5)
  op = curvopt.hessian(problem.value_fn, problem.params)
  np.testing.assert_allclose(
    op.as_matrix(), dense_hessian(problem.value_fn, problem.params), rtol=1e-12, atol=1e-12
  )


def test_gauss_newton_equals_hessian_for_a_linear_model():
  x = jax.random.normal(jax.random.key(0), (10, 4))
  y = jax.random.normal(jax.random.key(1), (10, 2))
  params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
  model_fn = lambda p: x @ p["w"] + p["b"]
  loss_fn = lambda out: jnp.mean(jnp.sum(jax.nn.log_softmax(out) * y, axis=-1) ** 2)
  ggn = curvopt.gauss_newton(model_fn, loss_fn, params, positive_semidefinite=False)
  hess = curvopt.hessian(lambda p: loss_fn(model_fn(p)), params)
  np.testing.assert_allclose(ggn.as_matrix(), hess.as_matrix(), rtol=1e-10, atol=1e-12)


def test_value_grad_hvp_equals_separate_computations():
  problem = mlp_problem("xent")
  v = random_like(jax.random.key(4), problem.params)
  value, grad, hv = jax.jit(curvopt.value_grad_hvp, static_argnums=0)(
    problem.value_fn, problem.params, v
  )
  chex.assert_trees_all_close(value, problem.value_fn(problem.params), rtol=1e-12)
  chex.assert_trees_all_close(grad, jax.grad(problem.value_fn)(problem.params), rtol=1e-12)
  chex.assert_trees_all_close(hv, curvopt.hvp(problem.value_fn, problem.params, v), rtol=1e-12)


def test_dataset_operator_equals_concatenated_batch():
  problem = mlp_problem("xent", n=40)
  x, y = problem.inputs, problem.targets
  loss = lambda p, batch: jnp.mean(softmax_loss(p, batch))
  batches = [(x[:5], y[:5]), (x[5:20], y[5:20]), (x[20:], y[20:])]  # sizes 5, 15, 20
  op = curvopt.dataset_operator(
    lambda p, b: curvopt.hessian(lambda q: loss(q, b), p), problem.params, batches
  )
  v = random_like(jax.random.key(5), problem.params)
  full = curvopt.hvp(lambda q: loss(q, (x, y)), problem.params, v)
  chex.assert_trees_all_close(op.mv(v), full, rtol=1e-10, atol=1e-13)
  assert op.num_examples == 40
  # An average of batch means would be wrong whenever sizes differ.
  mean_of_means = jax.tree.map(
    lambda *hs: sum(hs) / 3,
    *[curvopt.hvp(lambda q, b=b: loss(q, b), problem.params, v) for b in batches],
  )
  assert _relative_error(ravel(mean_of_means), ravel(full)) > 1e-3


def softmax_loss(params, batch):
  from helpers import mlp, softmax_xent

  x, y = batch
  return softmax_xent(mlp(params, x), y)


def test_operator_is_usable_under_jit_and_vmap_over_probes():
  problem = mlp_problem("mse")
  keys = jax.random.split(jax.random.key(6), 4)
  probes = jax.vmap(lambda k: random_like(k, problem.params))(keys)

  @jax.jit
  def batched(params, probes):
    op = curvopt.hessian(problem.value_fn, params)
    return jax.vmap(op.mv)(probes)

  out = batched(problem.params, probes)
  for i in range(4):
    one = jax.tree.map(lambda p, i=i: p[i], probes)
    chex.assert_trees_all_close(
      jax.tree.map(lambda o, i=i: o[i], out),
      curvopt.hvp(problem.value_fn, problem.params, one),
      rtol=1e-12,
    )


def test_mixed_dtype_leaves():
  params = {
    "a": jnp.ones(3, jnp.bfloat16),
    "b": jnp.ones((2, 2), jnp.float32),
    "c": jnp.ones(2, jnp.float64),
  }
  value_fn = lambda p: (
    jnp.sum(p["a"].astype(jnp.float64) ** 3)
    + jnp.sum(p["b"].astype(jnp.float64) ** 2) * jnp.sum(p["c"] ** 2)
  )
  op = curvopt.hessian(value_fn, params)
  vector = jax.tree.map(jnp.ones_like, params)
  out = jax.jit(lambda p, v: curvopt.hessian(value_fn, p).mv(v))(params, vector)
  chex.assert_trees_all_equal_dtypes(out, params)
  assert op.dtype == jnp.float64
  dense = dense_hessian(value_fn, jax.tree.map(lambda x: x.astype(jnp.float64), params))
  np.testing.assert_allclose(
    ravel(jax.tree.map(lambda x: x.astype(jnp.float64), out)), dense @ np.ones(9), rtol=1e-2
  )
  # A float32 Krylov vector is accepted on bfloat16 leaves and cast.
  op.mv(jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params))


def test_restrict_is_the_diagonal_block():
  problem = mlp_problem("mse", sizes=(3, 4, 2), n=6)
  full = dense_hessian(problem.value_fn, problem.params)
  mask = {"layer0": {"w": False, "b": False}, "layer1": {"w": True, "b": True}}
  block = curvopt.restrict(curvopt.hessian(problem.value_fn, problem.params), mask)
  # ravel_pytree orders dict keys: layer0/b (4), layer0/w (12), layer1/b (2), layer1/w (8).
  index = np.arange(16, 26)
  np.testing.assert_allclose(block.as_matrix(), full[np.ix_(index, index)], rtol=1e-12, atol=1e-14)
  assert block.size == 10
  by_path = curvopt.restrict(
    curvopt.hessian(problem.value_fn, problem.params),
    lambda path, _: "layer1" in jax.tree_util.keystr(path),
  )
  np.testing.assert_allclose(by_path.as_matrix(), block.as_matrix())


def test_preconditioned_has_the_spectrum_of_p_inverse_a():
  problem = mlp_problem("mse", sizes=(3, 4, 2), n=6)
  op = curvopt.hessian(problem.value_fn, problem.params)
  diag = jax.tree.map(lambda x: 0.5 + jnp.abs(x), problem.params)
  pre = curvopt.preconditioned(op, diag)
  expected = np.sort(np.linalg.eigvals(np.diag(1 / ravel(diag)) @ op.as_matrix()).real)
  np.testing.assert_allclose(np.linalg.eigvalsh(pre.as_matrix()), expected, rtol=1e-9, atol=1e-12)
  assert curvopt.is_symmetric(pre)


def test_transpose_of_a_non_symmetric_composition():
  a = curvopt.diagonal_operator(jnp.array([1.0, 2.0]))
  b = curvopt.linear_operator(lambda v: jnp.array([v[1], 0.0]), jnp.zeros(2))
  ab = curvopt.compose(a, b)
  np.testing.assert_allclose(ab.transpose().as_matrix(), ab.as_matrix().T)


# --- Bad input gets a clear error naming the argument. ----------------------


def test_value_fn_returning_a_vector_is_rejected():
  with pytest.raises(ValueError, match=r"value_fn must return a scalar.*shape \(3,\)"):
    curvopt.hessian(lambda w: w * 2, jnp.ones(3))


def test_value_fn_returning_a_tuple_is_rejected_with_a_hint():
  with pytest.raises(ValueError, match=r"value_fn must return a scalar.*aux"):
    curvopt.hessian(lambda w: (jnp.sum(w), w), jnp.ones(3))


def test_missing_value_fn_is_rejected():
  with pytest.raises(TypeError, match="value_fn is required"):
    curvopt.hvp(None, jnp.ones(3), jnp.ones(3))


def test_probe_with_wrong_structure_is_rejected():
  op = curvopt.hessian(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="vector must have the same pytree structure"):
    op.mv({"v": jnp.ones(3)})


def test_value_grad_hvp_names_a_vector_of_the_wrong_structure():
  with pytest.raises(ValueError, match=r"^vector must have the same pytree structure"):
    curvopt.value_grad_hvp(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.ones(3)}, {"v": jnp.ones(3)})


def test_hessian_reports_the_batch_size_it_was_given():
  value_fn = lambda w: jnp.sum(w**2)
  assert curvopt.hessian(value_fn, jnp.ones(2), num_examples=12).num_examples == 12
  assert curvopt.hessian(value_fn, jnp.ones(2)).num_examples is None


def test_probe_with_wrong_shape_is_rejected():
  op = curvopt.hessian(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"vector\['w'\] must have shape \(3,\)"):
    op.mv({"w": jnp.ones(4)})


def test_integer_params_are_rejected():
  with pytest.raises(TypeError, match=r"params\['w'\] must have a floating-point dtype"):
    curvopt.hessian(lambda p: jnp.sum(p["w"]), {"w": jnp.ones(3, jnp.int32)})


def test_integer_probe_is_rejected():
  op = curvopt.hessian(lambda w: jnp.sum(w**2), jnp.ones(3))
  with pytest.raises(TypeError, match="vector must have a floating-point dtype"):
    op.mv(jnp.ones(3, jnp.int32))


def test_loss_fn_returning_per_example_losses_is_rejected():
  with pytest.raises(ValueError, match="loss_fn must return a scalar"):
    curvopt.gauss_newton(lambda w: jnp.outer(jnp.ones(4), w), lambda out: out.sum(-1), jnp.ones(2))


@pytest.mark.parametrize("missing", ["model_fn", "loss_fn"])
def test_gauss_newton_names_a_missing_function(missing):
  fns = {"model_fn": lambda w: w * 2.0, "loss_fn": lambda out: jnp.sum(out**2), missing: None}
  with pytest.raises(TypeError, match=f"^{missing} is required"):
    curvopt.gauss_newton(fns["model_fn"], fns["loss_fn"], jnp.ones(2))


def test_gauss_newton_names_integer_params():
  with pytest.raises(TypeError, match=r"^params\['w'\] must have a floating-point dtype"):
    curvopt.gauss_newton(lambda p: p["w"] * 1.0, jnp.sum, {"w": jnp.ones(3, jnp.int32)})


def test_gauss_newton_tags_and_batch_size_follow_its_arguments_and_outputs():
  loss = lambda out: jnp.sum(jax.tree.leaves(out)[0] ** 2)
  op = curvopt.gauss_newton(lambda w: jnp.outer(jnp.ones(5), w), loss, jnp.ones(2))
  assert curvopt.is_symmetric(op) and curvopt.is_positive_semidefinite(op)
  assert op.num_examples == 5  # the first output leaf's leading dimension
  assert curvopt.gauss_newton(lambda w: w * 2.0, loss, jnp.ones(4)).num_examples == 4  # (n,)
  indefinite = curvopt.gauss_newton(
    lambda w: w, lambda out: out[0] * out[1], jnp.ones(2), positive_semidefinite=False
  )
  assert curvopt.is_symmetric(indefinite) and not curvopt.is_positive_semidefinite(indefinite)
  np.testing.assert_array_equal(indefinite.as_matrix(), [[0.0, 1.0], [1.0, 0.0]])
  tree = curvopt.gauss_newton(lambda w: {"a": jnp.ones((3, 2)) * w, "b": w[0]}, loss, jnp.ones(2))
  assert tree.num_examples == 3
  assert (
    curvopt.gauss_newton(lambda w: jnp.sum(w), lambda out: out**2, jnp.ones(2)).num_examples is None
  )


@pytest.mark.parametrize(
  "fn, error, message",
  [
    (
      lambda w: jnp.sum(w),
      ValueError,
      r"must return a 1-D array of per-example losses, got shape \(\)\.$",
    ),
    (lambda w: jnp.outer(w, w), ValueError, r"per-example losses, got shape \(2, 2\)\.$"),
    (lambda w: (w, w), ValueError, r"per-example losses, got shape tuple\.$"),
    (
      lambda w: (w > 0).astype(jnp.int32),
      TypeError,
      r"must return floating-point losses, got int32\.$",
    ),
    (None, TypeError, "per_example_loss_fn is required"),
  ],
)
def test_a_bad_per_example_loss_fn_is_named_with_what_it_returned(fn, error, message):
  with pytest.raises(error, match=message) as caught:
    curvopt.empirical_fisher(fn, jnp.ones(2))
  assert str(caught.value).startswith("per_example_loss_fn")


def test_empirical_fisher_names_integer_params_and_is_tagged_psd():
  with pytest.raises(TypeError, match=r"^params\['w'\] must have a floating-point dtype"):
    curvopt.empirical_fisher(lambda p: p["w"] * 1.0, {"w": jnp.ones(3, jnp.int32)})
  op = curvopt.empirical_fisher(lambda w: w * 2.0, jnp.ones(3))
  assert curvopt.is_symmetric(op) and curvopt.is_positive_semidefinite(op)
  assert op.num_examples == 3
  single = curvopt.empirical_fisher(lambda w: w * 2.0, jnp.ones(3, jnp.float32))  # float32 losses
  np.testing.assert_array_equal(single.as_matrix(), np.diag(np.full(3, 4.0 / 3, np.float32)))


def test_empty_batches_are_rejected():
  with pytest.raises(TypeError, match="batches must be a non-empty list"):
    curvopt.dataset_operator(lambda p, b: curvopt.hessian(jnp.sum, p), jnp.ones(2), [])


def test_mask_selecting_nothing_is_rejected():
  op = curvopt.hessian(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="mask selects no leaves"):
    curvopt.restrict(op, {"w": False})


# --- Operators are values: pytrees through jit and vmap, and lineax's solvers. ---


def _small_regression():
  x = jax.random.normal(jax.random.key(0), (7, 3), jnp.float64)
  y = jax.random.normal(jax.random.key(1), (7, 2), jnp.float64)
  params = {"w": jax.random.normal(jax.random.key(2), (3, 2), jnp.float64), "b": jnp.ones(2)}
  model_fn = lambda p: jnp.tanh(x @ p["w"] + p["b"])
  loss_fn = lambda out: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
  return model_fn, loss_fn, params, lambda p: loss_fn(model_fn(p))


def test_an_operator_crosses_jit_boundaries_both_ways():
  with jax.enable_x64(True):
    _, _, params, loss = _small_regression()
    built_inside = jax.jit(lambda p: curvopt.hessian(loss, p))(params)
    assert isinstance(built_inside, curvopt.LinearOperator) and jax.tree.leaves(built_inside)
    dense = jax.hessian(lambda flat: loss(unravel(flat)))(ravel(params))
    np.testing.assert_allclose(built_inside.as_matrix(), dense, rtol=1e-12, atol=1e-12)
    apply = jax.jit(lambda op, v: op.mv(v))
    v = jax.tree.map(jnp.ones_like, params)
    eager = curvopt.hessian(loss, params)
    chex.assert_trees_all_close(apply(eager, v), eager.mv(v), rtol=1e-12)
    chex.assert_trees_all_close(apply(eager, v), eager.mv(v), rtol=1e-12)
    assert apply._cache_size() == 1  # the same operator again: no retrace


def test_vmap_over_operators_of_two_parameter_sets():
  with jax.enable_x64(True):
    _, _, params, loss = _small_regression()
    second = jax.tree.map(lambda x: 0.5 * x - 0.1, params)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, second)
    operators = jax.vmap(lambda p: curvopt.hessian(loss, p))(stacked)
    v = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), params)
    batched = jax.vmap(lambda op: op.mv(v))(operators)
    for i, p in enumerate((params, second)):
      chex.assert_trees_all_close(
        jax.tree.map(lambda x, i=i: x[i], batched), curvopt.hessian(loss, p).mv(v), rtol=1e-12
      )


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_to_lineax_solves_a_damped_gauss_newton_system(solver):
  lx = pytest.importorskip("lineax")
  with jax.enable_x64(True):
    model_fn, loss_fn, params, _ = _small_regression()
    gn = curvopt.gauss_newton(model_fn, loss_fn, params)
    damping = 0.1
    damped = curvopt.linear_operator(
      lambda v: jax.tree.map(lambda a, b: a + damping * b, gn.mv(v), v),
      params,
      symmetric=True,
      positive_semidefinite=True,
    )
    operator = curvopt.to_lineax(damped)
    assert lx.is_symmetric(operator) and lx.is_positive_semidefinite(operator)
    b = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), params)
    method = lx.CG(rtol=1e-12, atol=1e-12) if solver == "cg" else lx.Cholesky()
    if solver == "cholesky":
      operator = lx.materialise(operator)
    solution = lx.linear_solve(operator, b, method).value
    matrix = gn.as_matrix() + damping * np.eye(gn.size)
    expected = unravel(np.linalg.solve(matrix, ravel(b)))
    chex.assert_trees_all_close(solution, expected, rtol=1e-9, atol=1e-10)
    with pytest.raises(TypeError, match="operator must be a curvopt LinearOperator"):
      curvopt.to_lineax(matrix)


def unravel(flat):
  params = _small_regression()[2]
  return jax.flatten_util.ravel_pytree(params)[1](flat)


@pytest.mark.parametrize("symmetric, psd", [(False, False), (True, False), (True, True)])
def test_to_lineax_translates_exactly_the_tags_it_has(symmetric, psd):
  lx = pytest.importorskip("lineax")
  matrix = jnp.array([[2.0, 1.0], [0.5, 3.0]])
  op = curvopt.linear_operator(
    lambda v: matrix @ v, jnp.zeros(2), symmetric=symmetric, positive_semidefinite=psd
  )
  converted = curvopt.to_lineax(op)
  assert (lx.is_symmetric(converted), lx.is_positive_semidefinite(converted)) == (symmetric, psd)
  np.testing.assert_array_equal(
    converted.mv(jnp.array([1.0, -1.0])), matrix @ jnp.array([1.0, -1.0])
  )


def test_to_lineax_without_lineax_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "lineax", None)  # a blocked import
  op = curvopt.linear_operator(lambda v: v, jnp.zeros(2))
  with pytest.raises(ImportError, match=r"^curvopt.to_lineax needs lineax: pip install lineax$"):
    curvopt.to_lineax(op)


def test_to_lineax_names_what_it_got_instead_of_an_operator():
  pytest.importorskip("lineax")
  with pytest.raises(
    TypeError, match=r"^operator must be a curvopt LinearOperator, got ndarray\.$"
  ):
    curvopt.to_lineax(np.eye(2))
