"""Program inspection (`curvopt._jaxpr`) and the data-set operator over mini-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvopt
from curvopt import _jaxpr


def _jaxpr_of(fn, *args):
  return jax.make_jaxpr(fn)(*args).jaxpr


def test_contains_primitive_looks_inside_nested_programs():
  x = jnp.ones(3)
  nested = lambda x: jax.jit(lambda y: jax.lax.cond(y[0] > 0, jnp.sin, jnp.cos, y))(x)
  jaxpr = _jaxpr_of(nested, x)
  assert _jaxpr.contains_primitive(jaxpr, "sin") and _jaxpr.contains_primitive(jaxpr, "cos")
  assert _jaxpr.contains_primitive(jaxpr, "cond")
  assert not _jaxpr.contains_primitive(jaxpr, "exp")
  assert not _jaxpr.contains_primitive(_jaxpr_of(lambda x: x, x), "sin")


def test_uses_only_looks_inside_calls_but_not_loops_or_conditionals():
  x = jnp.ones(3)
  allowed = frozenset({"mul", "add"})
  assert _jaxpr.uses_only(_jaxpr_of(lambda x: x * 2.0 + x, x), allowed)
  assert _jaxpr.uses_only(_jaxpr_of(lambda x: x, x), frozenset())
  assert _jaxpr.uses_only(_jaxpr_of(lambda x: jax.jit(lambda y: y * y)(x), x), allowed)
  assert not _jaxpr.uses_only(_jaxpr_of(lambda x: jax.jit(jnp.sin)(x), x), allowed)
  assert not _jaxpr.uses_only(_jaxpr_of(jnp.sin, x), allowed)
  loop = lambda x: jax.lax.fori_loop(0, 3, lambda i, y: y * 2.0, x)
  assert not _jaxpr.uses_only(_jaxpr_of(loop, x), allowed | {"lt"})
  branch = lambda x: jax.lax.cond(True, lambda y: y * 2.0, lambda y: y + 1.0, x)
  assert not _jaxpr.uses_only(_jaxpr_of(branch, x), allowed | {"convert_element_type"})


def test_forward_flops_of_batched_products_elementwise_work_and_loops():
  flops = _jaxpr.forward_flops
  a, b = jnp.ones((4, 6, 5)), jnp.ones((4, 5, 3))
  assert flops(jnp.matmul, a, b) == 2 * 4 * 6 * 3 * 5  # a batch dimension, contracted over 5
  assert flops(jnp.sin, jnp.ones((3, 7))) == 21  # one per output element
  assert flops(lambda x: (jnp.sin(x), jnp.cos(x)), jnp.ones(4)) == 8
  assert flops(lambda x: jnp.sum(x), jnp.ones(10)) == 1  # a reduction: its one output
  scan = lambda x: jax.lax.scan(lambda c, _: (jnp.sin(c), None), x, None, length=5)[0]
  assert flops(scan, jnp.ones(3)) == 5 * 3
  called = lambda x: jax.jit(jnp.sin)(x)
  assert flops(called, jnp.ones(3)) == 3
  # NHWC input, HWIO kernel: 2 x outputs x (3 x 3 x 2) multiply-adds each.
  conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  assert flops(conv, jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 5))) == 2 * (4 * 4 * 5) * 18


def _quadratic_batches():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=(n, 3))) for n in (1, 4, 2)]


def _batch_hessian(p, x):
  return curvopt.hessian(lambda q: 0.5 * jnp.mean((x @ q) ** 2), p)


def test_dataset_operator_weights_batches_by_size_and_keeps_the_first_tags():
  batches = _quadratic_batches()
  op = curvopt.dataset_operator(_batch_hessian, jnp.zeros(3), batches)
  stacked = np.concatenate([np.asarray(x) for x in batches])
  np.testing.assert_allclose(op.as_matrix(), stacked.T @ stacked / 7, rtol=1e-13)
  assert op.num_examples == 7 and curvopt.is_symmetric(op)
  # The batch size from batch_size_fn instead of the leading axis.
  pairs = [(x, "label") for x in batches]
  by_fn = curvopt.dataset_operator(
    lambda p, b: _batch_hessian(p, b[0]), jnp.zeros(3), pairs, batch_size_fn=lambda b: 1
  )
  means = sum(np.asarray(x).T @ np.asarray(x) / len(x) for x in batches) / 3
  np.testing.assert_allclose(by_fn.as_matrix(), means, rtol=1e-13)
  assert by_fn.num_examples == 3


def test_dataset_operator_works_in_float32_for_float32_params():
  batches = [x.astype(jnp.float32) for x in _quadratic_batches()]
  op = curvopt.dataset_operator(_batch_hessian, jnp.zeros(3, jnp.float32), tuple(batches))
  assert op.mv(jnp.ones(3, jnp.float32)).dtype == jnp.float32


def test_dataset_operator_reads_the_batch_size_from_a_one_dimensional_first_leaf():
  batches = _quadratic_batches()
  # The labels come first in each batch: a vector, whose only axis is the example axis.
  labelled = [(jnp.zeros(len(x)), x) for x in batches]
  op = curvopt.dataset_operator(lambda p, b: _batch_hessian(p, b[1]), jnp.zeros(3), labelled)
  stacked = np.concatenate([np.asarray(x) for x in batches])
  np.testing.assert_allclose(op.as_matrix(), stacked.T @ stacked / 7, rtol=1e-13)
  assert op.num_examples == 7


def test_dataset_operator_sums_bfloat16_products_in_float32():
  batches = [x.astype(jnp.float32) for x in _quadratic_batches()]

  def hessian_bf16(p, x):
    return curvopt.hessian(
      lambda q: (0.5 * jnp.mean((x @ q.astype(jnp.float32)) ** 2)).astype(jnp.bfloat16), p
    )

  params, vector = jnp.zeros(3, jnp.bfloat16), jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16)
  products = [hessian_bf16(params, x).mv(vector) for x in batches]
  assert all(p.dtype == jnp.bfloat16 for p in products)
  in_float32 = sum(
    (len(x) / 7) * np.asarray(p, np.float32) for x, p in zip(batches, products, strict=True)
  )
  got = curvopt.dataset_operator(hessian_bf16, params, batches).mv(vector)
  # Rounded once at the end (weighting in bfloat16 moves the first entry by one ulp).
  np.testing.assert_array_equal(got, jnp.asarray(in_float32, jnp.bfloat16))


def test_dataset_operator_refusals_name_the_argument():
  params, hess = jnp.zeros(3), _batch_hessian
  with pytest.raises(
    TypeError, match="batches must be a non-empty list or tuple of batch pytrees, got generator"
  ):
    curvopt.dataset_operator(hess, params, (x for x in _quadratic_batches()))
  with pytest.raises(
    ValueError, match=r"every batch must hold at least one example; got sizes \[1, 0\]"
  ):
    curvopt.dataset_operator(hess, params, [jnp.ones((1, 3)), jnp.ones((0, 3))])
  no_axis = (
    "^cannot infer the batch size: the first leaf of each batch must have a leading "
    "example axis, or pass batch_size_fn.$"
  )
  with pytest.raises(ValueError, match=no_axis):
    curvopt.dataset_operator(hess, params, [jnp.ones(())])
  with pytest.raises(ValueError, match=no_axis):
    curvopt.dataset_operator(hess, params, [{}])
  with pytest.raises(TypeError, match="operator_fn must return a LinearOperator, got ArrayImpl"):
    curvopt.dataset_operator(lambda p, b: b, params, [jnp.ones((2, 3))])
  with pytest.raises(TypeError, match="operator_fn is required"):
    curvopt.dataset_operator(None, params, [jnp.ones((2, 3))])
  with pytest.raises(TypeError, match=r"^params must have a floating-point dtype \(float32"):
    curvopt.dataset_operator(hess, jnp.zeros(3, jnp.int32), [jnp.ones((2, 3))])


def test_uses_only_checks_every_equation_and_flops_add_up_around_calls():
  x = jnp.ones(3)
  assert not _jaxpr.uses_only(_jaxpr_of(lambda x: jnp.sin(x * 2.0), x), frozenset({"mul"}))
  assert _jaxpr.forward_flops(lambda x: jax.jit(jnp.sin)(jnp.cos(x)), x) == 6  # 3 + 3
