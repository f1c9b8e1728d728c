"""Per-example output curvature in square-root form, against `jax.hessian` of the batch loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.oracles import (
  SigmoidCrossEntropy,
  SoftmaxCrossEntropy,
  SquaredError,
  output_curvature,
)


def _dense(loss_fn, outputs):
  """The batch loss's gradient and Hessian on the flat outputs, split per example."""
  b = outputs.shape[0]
  flat = outputs.reshape(b, -1)
  c = flat.shape[1]
  fn = lambda f: loss_fn(f.reshape(outputs.shape))
  hessian = jax.hessian(fn)(flat).reshape(b, c, b, c)
  blocks = jnp.stack([hessian[i, :, i, :] for i in range(b)])
  off_diagonal = hessian.at[jnp.arange(b), :, jnp.arange(b), :].set(0.0)
  assert float(jnp.max(jnp.abs(off_diagonal))) == 0.0  # a per-example loss
  return jax.grad(fn)(flat), blocks


def _assert_factors(curvature, loss_fn, outputs, atol=1e-13):
  gradient, blocks = _dense(loss_fn, outputs)
  root, coefficients = curvature.root, curvature.coefficients
  np.testing.assert_allclose(jnp.einsum("bik,bjk->bij", root, root), blocks, atol=atol)
  reconstructed = jnp.einsum("bck,bk->bc", root, coefficients)
  if curvature.null_gradient is not None:
    reconstructed = reconstructed + curvature.null_gradient
  np.testing.assert_allclose(reconstructed, gradient, atol=atol)


def _logits(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2.0)


def test_squared_error_value_and_exact_factors_for_multi_axis_outputs():
  outputs = _logits((4, 2, 3))
  targets = _logits((4, 2, 3), seed=1)
  loss = SquaredError(targets)
  expected = 0.5 * np.mean(np.sum((np.asarray(outputs - targets).reshape(4, -1)) ** 2, axis=1))
  np.testing.assert_allclose(loss(outputs), expected, rtol=1e-14)
  curvature = output_curvature(loss, outputs)
  assert curvature.root.shape == (4, 6, 6) and curvature.coefficients.shape == (4, 6)
  assert curvature.null_gradient is None
  np.testing.assert_allclose(curvature.root, np.broadcast_to(np.eye(6) / 2.0, (4, 6, 6)))
  _assert_factors(curvature, loss, outputs)


def test_squared_error_casts_float64_targets_to_float32_outputs():
  outputs = _logits((3, 2)).astype(jnp.float32)
  curvature = SquaredError(_logits((3, 2), seed=2)).output_curvature(outputs)
  assert curvature.root.dtype == jnp.float32 and curvature.coefficients.dtype == jnp.float32


@pytest.mark.parametrize("labels", ["integers", "probabilities"])
def test_softmax_cross_entropy_value_and_exact_rank_deficient_factors(labels):
  logits = _logits((5, 4))
  if labels == "integers":
    y = jnp.asarray([0, 3, 1, 1, 2])
    one_hot = np.eye(4)[np.asarray(y)]
  else:
    raw = np.random.default_rng(5).uniform(size=(5, 4))
    one_hot = raw / raw.sum(axis=1, keepdims=True)
    y = jnp.asarray(one_hot)
  loss = SoftmaxCrossEntropy(y)
  log_p = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(loss(logits), -np.mean(np.sum(one_hot * log_p, axis=1)), rtol=1e-14)
  curvature = output_curvature(loss, logits)
  _assert_factors(curvature, loss, logits)
  p = np.exp(log_p)
  np.testing.assert_allclose(
    curvature.coefficients, (p - one_hot) / np.sqrt(5 * p), rtol=1e-12, atol=1e-15
  )
  # Each B_i has rank c - 1: softmax is unchanged by adding a constant to every logit.
  np.testing.assert_allclose(
    jnp.einsum("bck,bc->bk", curvature.root, jnp.ones((5, 4))), 0.0, atol=1e-15
  )


def test_softmax_labels_of_any_leading_shape_and_float32_logits():
  logits = _logits((2, 3, 5)).astype(jnp.float32)  # b = 2 examples of 15 outputs
  y = jnp.asarray([[4], [14]])  # integer labels shaped (b, 1)
  loss = SoftmaxCrossEntropy(y)
  curvature = loss.output_curvature(logits)
  assert curvature.root.dtype == jnp.float32 and curvature.root.shape == (2, 15, 15)
  _assert_factors(curvature, loss, logits.astype(jnp.float64), atol=1e-6)


def test_softmax_cross_entropy_of_extreme_logits_stays_finite():
  logits = jnp.asarray([[300.0, -300.0, 0.0]])
  curvature = SoftmaxCrossEntropy(jnp.asarray([1])).output_curvature(logits)
  assert bool(jnp.all(jnp.isfinite(curvature.root)))
  assert bool(jnp.all(jnp.isfinite(curvature.coefficients)))


def test_sigmoid_cross_entropy_value_and_factors_for_one_logit_per_example():
  logits = _logits((6,))
  labels = jnp.asarray([1.0, 0.0, 0.25, 1.0, 0.0, 0.5])
  loss = SigmoidCrossEntropy(labels)
  s = 1.0 / (1.0 + np.exp(-np.asarray(logits)))
  expected = -np.mean(np.asarray(labels) * np.log(s) + (1 - np.asarray(labels)) * np.log(1 - s))
  np.testing.assert_allclose(loss(logits), expected, rtol=1e-13)
  curvature = output_curvature(loss, logits)
  assert curvature.root.shape == (6, 1, 1) and curvature.null_gradient is None
  _assert_factors(curvature, loss, logits)
  np.testing.assert_allclose(curvature.root[:, 0, 0] ** 2, s * (1 - s) / 6, rtol=1e-12)


def test_autodiff_factors_a_coupled_loss_exactly():
  outputs = _logits((3, 3))
  a = jnp.asarray([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
  loss_fn = lambda f: jnp.mean(jnp.einsum("bi,ij,bj->b", f, a, f) + jnp.sin(f[:, 0]))
  curvature = output_curvature(loss_fn, outputs)
  _assert_factors(curvature, loss_fn, outputs)
  # Positive definite blocks (2a/3 - sin/3 on one entry): nothing in the null part.
  np.testing.assert_allclose(curvature.null_gradient, 0.0, atol=1e-15)


def test_autodiff_puts_negative_and_zero_curvature_in_the_null_gradient():
  outputs = _logits((4, 3))
  # Output 0 convex, output 1 linear (no curvature), output 2 concave (negative).
  loss_fn = lambda f: jnp.mean(f[:, 0] ** 2 + 3.0 * f[:, 1] - 0.5 * f[:, 2] ** 2)
  curvature = output_curvature(loss_fn, outputs)
  # Kept: only output 0's curvature (2/4 per example); the rest is null gradient.
  np.testing.assert_allclose(
    jnp.einsum("bik,bjk->bij", curvature.root, curvature.root),
    np.broadcast_to(np.diag([0.5, 0.0, 0.0]), (4, 3, 3)),
    atol=1e-15,
  )
  gradient = (
    np.stack([2 * np.asarray(outputs[:, 0]), np.full(4, 3.0), -np.asarray(outputs[:, 2])], axis=1)
    / 4
  )
  np.testing.assert_allclose(curvature.null_gradient[:, 1:], gradient[:, 1:], atol=1e-15)
  np.testing.assert_allclose(curvature.null_gradient[:, 0], 0.0, atol=1e-15)
  kept = jnp.einsum("bck,bk->bc", curvature.root, curvature.coefficients)
  np.testing.assert_allclose(kept[:, 0], gradient[:, 0], rtol=1e-14)
  np.testing.assert_allclose(kept[:, 1:], 0.0, atol=1e-15)
  # eigh orders the eigenvalues -1/4, 0, 1/2: the first two directions have no
  # coefficient (their gradient is all in the null part).
  np.testing.assert_array_equal(curvature.coefficients[:, :2], 0.0)


def test_outputs_that_are_no_array_with_an_example_axis_are_refused():
  loss = lambda f: jnp.sum(f)
  with pytest.raises(ValueError) as refused:
    output_curvature(loss, {"a": jnp.ones(2)})
  assert str(refused.value) == (
    "model_fn must return one array of outputs with a leading example axis, shape (b,) or "
    "(b, c, ...); got dict with shape None."
  )
  with pytest.raises(ValueError, match=r"got ArrayImpl with shape \(\)"):
    output_curvature(loss, jnp.float64(1.0))
  with pytest.raises(TypeError, match="floating-point outputs, got int32"):
    output_curvature(loss, jnp.ones(3, jnp.int32))
  with pytest.raises(TypeError, match="loss_fn is required"):
    output_curvature(None, jnp.ones(3))
  with pytest.raises(ValueError, match="loss_fn must return a scalar"):
    output_curvature(lambda f: f, jnp.ones(3))


def test_sigmoid_cross_entropy_keeps_float32_logits_in_float32():
  logits = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  curvature = SigmoidCrossEntropy(jnp.asarray([1.0, 0.0, 1.0])).output_curvature(logits)
  assert curvature.root.dtype == jnp.float32 and curvature.coefficients.dtype == jnp.float32


@pytest.mark.parametrize("labels", ["integers", "probabilities"])
def test_softmax_cross_entropy_keeps_float32_logits_in_float32(labels):
  logits = jnp.asarray([[0.5, -1.0, 2.0], [0.0, 1.0, -1.0]], jnp.float32)
  y = (
    jnp.asarray([2, 0]) if labels == "integers" else jnp.asarray([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
  )
  loss = SoftmaxCrossEntropy(y)
  assert loss(logits).dtype == jnp.float32
  curvature = loss.output_curvature(logits)
  assert curvature.root.dtype == jnp.float32 and curvature.coefficients.dtype == jnp.float32


def test_autodiff_curvature_of_float32_outputs_is_float32():
  outputs = jnp.asarray([[0.5, -1.0], [2.0, 0.25]], jnp.float32)
  curvature = output_curvature(lambda f: jnp.sum(f**2) + jnp.sum(f[:, 0] * f[:, 1]), outputs)
  assert curvature.root.dtype == jnp.float32 and curvature.coefficients.dtype == jnp.float32
  assert curvature.null_gradient.dtype == jnp.float32


@pytest.mark.parametrize(
  ("dtype", "curvature", "kept"),
  [
    # The cut is 10 c eps max|lambda|: 40 eps = 8.9e-15 in float64 (c = 2, max 2).
    (jnp.float64, 8.0e-15, False),
    (jnp.float64, 9.3e-15, True),
    # float32: 40 eps = 4.8e-6.
    (jnp.float32, 2.0e-6, False),
    (jnp.float32, 6.0e-6, True),
  ],
)
def test_the_round_off_cut_is_ten_c_eps_times_the_largest_eigenvalue(dtype, curvature, kept):
  outputs = jnp.asarray([[0.3, -0.2], [0.1, 0.4]], dtype)
  s = jnp.asarray(curvature / 2, dtype)
  result = output_curvature(lambda f: jnp.sum(f[:, 0] ** 2 + s * f[:, 1] ** 2), outputs)
  gram = jnp.einsum("bik,bjk->bij", result.root, result.root)
  expected = curvature if kept else 0.0
  np.testing.assert_allclose(gram[:, 1, 1], expected, rtol=1e-5, atol=0)
