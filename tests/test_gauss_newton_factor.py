"""The Gauss-Newton factor A = S^T J against dense Jacobians and loss Hessians."""

import dataclasses

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import curvopt
from curvopt.oracles import SoftmaxCrossEntropy, gauss_newton_factor

_KEYS = jax.random.split(jax.random.key(3), 3)
X = jax.random.normal(_KEYS[0], (5, 3))


def model_fn(p):
  return jnp.tanh(X @ p["w"] + p["b"])


def flat(tree):
  """Raveled as `jax.flatten_util` does: keys in sorted order, b then w."""
  return jnp.concatenate([tree["b"], tree["w"].reshape(-1)])


def unflat(v, c):
  return {"b": v[:c], "w": v[c:].reshape(3, c)}


def _params(c):
  return {"w": jax.random.normal(_KEYS[1], (3, c)), "b": 0.1 * jax.random.normal(_KEYS[2], (c,))}


@pytest.mark.parametrize(
  ("c", "loss_kind"),
  [(4, "coupled"), (1, "coupled"), (3, "softmax")],  # d = 16 < b k = 20; d = 4 < 5; closed form
)
def test_factor_products_and_matrix_equal_the_dense_gauss_newton_model(c, loss_kind):
  params = _params(c)
  if loss_kind == "softmax":
    loss_fn = SoftmaxCrossEntropy(jnp.asarray([0, 2, 1, 1, 0]))
  else:
    # Coupled outputs, positive definite per example (an indefinite one keeps only its
    # positive part in A: tested in test_output_loss.py).
    loss_fn = lambda f: jnp.mean(jnp.sum(f**2, axis=1) + 0.5 * jnp.sum(f, axis=1) ** 2 + f[:, 0])
  factor = gauss_newton_factor(model_fn, loss_fn, params)
  b, k = factor.row_shape
  assert b == 5
  jac = jax.jacfwd(lambda v: model_fn(unflat(v, c)).reshape(-1))(flat(params))
  outputs = model_fn(params)
  h = jax.hessian(lambda y: loss_fn(y.reshape(5, c)))(outputs.reshape(-1))
  a = factor.as_matrix()
  assert a.shape == (b * k, 4 * c)
  np.testing.assert_allclose(a.T @ a, jac.T @ h @ jac, atol=1e-12)
  np.testing.assert_allclose(factor.operator().as_matrix(), jac.T @ h @ jac, atol=1e-12)
  v = jax.random.normal(jax.random.key(9), (4 * c,))
  np.testing.assert_allclose(factor.mv(unflat(v, c)).reshape(-1), a @ v, atol=1e-12)
  z = jax.random.normal(jax.random.key(10), (b, k))
  np.testing.assert_allclose(flat(factor.rmv(z)), a.T @ z.reshape(-1), atol=1e-12)
  u = jax.random.normal(jax.random.key(11), (b, c))
  np.testing.assert_allclose(flat(factor.output_vjp(u)), jac.T @ u.reshape(-1), atol=1e-12)
  gradient = jax.grad(lambda v: loss_fn(model_fn(unflat(v, c))))(flat(params))
  np.testing.assert_allclose(flat(factor.gradient()), gradient, atol=1e-12)
  op = factor.operator()
  assert curvopt.is_symmetric(op) and curvopt.is_positive_semidefinite(op)
  assert op.num_examples == 5


def test_a_model_wider_than_its_rows_is_materialized_by_vjps_alike():
  # d = 8 + 40 parameters against b k = 5 x 2 = 10 rows: A comes from 10 VJPs, not 48 JVPs.
  params = {**_params(2), "z": 0.1 * jnp.arange(40.0)}
  model = lambda p: model_fn(p) + 0.01 * jnp.sum(jnp.sin(p["z"]))
  loss_fn = lambda f: 0.5 * jnp.mean(jnp.sum(f**2, axis=1))
  factor = gauss_newton_factor(model, loss_fn, params)
  ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
  _, unravel = jax.flatten_util.ravel_pytree(params)
  jac = jax.jacfwd(lambda v: model(unravel(v)).reshape(-1))(ravel(params))
  a = factor.as_matrix()
  assert a.shape == (10, 48)
  np.testing.assert_allclose(a.T @ a, jac.T @ jac / 5, atol=1e-12)  # B_i = I / b
  assert _sides_used(factor) == {"vjp"}
  narrow = gauss_newton_factor(model_fn, loss_fn, _params(2))  # d = 8 < 10 rows: JVPs
  assert _sides_used(narrow) == {"jvp"}


def _sides_used(factor):
  used = set()

  def spy(name, fn):
    def called(x):
      used.add(name)
      return fn(x)

    return called

  spied = dataclasses.replace(factor, _jvp=spy("jvp", factor._jvp), _vjp=spy("vjp", factor._vjp))
  spied.as_matrix()
  return used


def test_refusals_name_the_argument():
  params = _params(2)
  with pytest.raises(TypeError, match="model_fn is required"):
    gauss_newton_factor(None, jnp.sum, params)
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    gauss_newton_factor(model_fn, 3, params)
  with pytest.raises(TypeError, match=r"params\['b'\] must have a floating-point dtype"):
    gauss_newton_factor(model_fn, jnp.sum, {"w": params["w"], "b": jnp.ones(2, jnp.int32)})


def test_the_gradient_keeps_the_part_where_the_loss_has_no_curvature():
  # Concave per example (Hessian -0.2 I / b): A is zero, the whole gradient is null_gradient.
  params = _params(2)
  loss_fn = lambda f: jnp.mean(jnp.sum(f, axis=1) - 0.1 * jnp.sum(f**2, axis=1))
  factor = gauss_newton_factor(model_fn, loss_fn, params)
  np.testing.assert_array_equal(factor.as_matrix(), 0.0)
  gradient = jax.grad(lambda v: loss_fn(model_fn(unflat(v, 2))))(flat(params))
  np.testing.assert_allclose(flat(factor.gradient()), gradient, rtol=1e-12)


@pytest.mark.parametrize("extra", [0, 40])  # d = 8 < 10 rows (JVPs); d = 48 > 10 (VJPs)
def test_float32_parameters_give_a_float32_matrix(extra):
  params = {**_params(2), "z": 0.1 * jnp.arange(float(extra))}
  x = lambda p: X.astype(p["w"].dtype)
  model = lambda p: jnp.tanh(x(p) @ p["w"] + p["b"]) + 0.01 * jnp.sum(jnp.sin(p["z"]))
  loss_fn = lambda f: 0.5 * jnp.mean(jnp.sum(f**2, axis=1))
  single = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  a = gauss_newton_factor(model, loss_fn, single).as_matrix()
  assert a.dtype == jnp.float32
  np.testing.assert_allclose(a, gauss_newton_factor(model, loss_fn, params).as_matrix(), atol=1e-6)
