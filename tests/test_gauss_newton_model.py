"""The objective Gauss-Newton methods see: loss on outputs plus a masked, coupled L2 term."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.transforms.gauss_newton._model import GaussNewtonModel, require_model_and_loss

X = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))
PARAMS = {"w": jnp.asarray([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]]), "b": jnp.asarray([0.1, -0.3])}
model_fn = lambda p: jnp.tanh(X @ p["w"] + p["b"])
loss_fn = lambda f: jnp.mean(jnp.log(1.0 + f**2)) + jnp.mean(f[:, 0] * f[:, 1])


def _flat(tree):
  return jnp.concatenate([tree["w"].reshape(-1), tree["b"]])


def _unflat(v):
  return {"w": v[:6].reshape(3, 2), "b": v[6:]}


def test_a_missing_model_or_loss_names_what_is_missing():
  for model, loss, missing in (
    (None, loss_fn, "model_fn"),
    (model_fn, None, "loss_fn"),
    (None, None, "model_fn and loss_fn"),
  ):
    with pytest.raises(TypeError) as raised:
      require_model_and_loss("egn", model, loss)
    assert str(raised.value) == (
      "egn needs the model and the loss apart, as the extra arguments model_fn and loss_fn: "
      "call update(grads, state, params, model_fn=lambda p: apply(p, inputs), "
      f"loss_fn=lambda outputs: loss(outputs, targets)); {missing} missing."
    )
  assert require_model_and_loss("egn", model_fn, loss_fn) == (model_fn, loss_fn)
  with pytest.raises(TypeError, match="model_fn must be callable"):
    require_model_and_loss("egn", 1.0, loss_fn)
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    require_model_and_loss("egn", model_fn, 1.0)
  with pytest.raises(TypeError, match="egn evaluates the loss"):
    require_model_and_loss("egn", model_fn, loss_fn, {"w": PARAMS["w"], "b": optax.MaskedNode()})
  # curvopt.masked hands over a model that takes the masked view: it is accepted.
  on_view = lambda p: model_fn(p)
  on_view.takes_masked_view = True
  masked = {"w": PARAMS["w"], "b": optax.MaskedNode()}
  assert require_model_and_loss("egn", on_view, loss_fn, masked) == (on_view, loss_fn)


@pytest.mark.parametrize(
  "mask", [None, {"w": True, "b": False}, lambda p: {k: v.ndim == 1 for k, v in p.items()}]
)
def test_value_gradient_and_predicted_decrease_equal_the_dense_gauss_newton_model(mask):
  l2 = 0.7
  model = GaussNewtonModel(model_fn, loss_fn, l2, mask)
  resolved = mask(PARAMS) if callable(mask) else (mask or {"w": True, "b": True})
  m = _flat(jax.tree.map(lambda on, p: jnp.full(p.shape, float(on)), resolved, PARAMS))
  np.testing.assert_array_equal(_flat(model.penalty_mask(PARAMS)), m)
  p = _flat(PARAMS)
  f = lambda v: loss_fn(model_fn(_unflat(v))) + 0.5 * l2 * jnp.sum((m * v) ** 2)
  np.testing.assert_allclose(model.value(PARAMS), f(p), rtol=1e-14)
  np.testing.assert_allclose(_flat(model.penalty_gradient(PARAMS)), l2 * m * p, rtol=1e-14)
  # The Gauss-Newton matrix J^T H_loss J plus the penalty's l2 diag(m).
  jac = jax.jacfwd(lambda v: model_fn(_unflat(v)).reshape(-1))(p)
  h_loss = jax.hessian(lambda y: loss_fn(y.reshape(5, 2)))(model_fn(PARAMS).reshape(-1))
  gn = jac.T @ h_loss @ jac + l2 * jnp.diag(m)
  g = jax.grad(f)(p)
  step = jnp.asarray(np.random.default_rng(1).normal(size=8))
  damping = 0.3
  value, predicted = model.value_and_predicted_decrease(PARAMS, _unflat(step), jnp.asarray(damping))
  np.testing.assert_allclose(value, f(p), rtol=1e-14)
  expected = -(g @ step + 0.5 * (step @ gn @ step + damping * step @ step))
  np.testing.assert_allclose(predicted, expected, rtol=1e-12)


def test_an_l2_mask_of_the_wrong_structure_is_named():
  model = GaussNewtonModel(model_fn, loss_fn, 0.1, {"w": True})
  with pytest.raises(ValueError) as raised:
    model.penalty_mask(PARAMS)
  message = str(raised.value)
  assert message.startswith(
    "l2_mask must be a pytree of booleans with the structure of params (or a function "
    "returning one).\n  expected: PyTreeDef({'b': *, 'w': *})\n  got:      PyTreeDef({'w': *})"
  )


def test_the_penalty_keeps_the_loss_dtype():
  single = jax.tree.map(lambda x: x.astype(jnp.float32), PARAMS)
  model = GaussNewtonModel(
    lambda p: jnp.tanh(X.astype(jnp.float32) @ p["w"] + p["b"]), loss_fn, 0.5
  )
  assert model.value(single).dtype == jnp.float32
  mask = model.penalty_mask(single)
  assert mask["w"].dtype == jnp.float32 and mask["w"].shape == (3, 2)
  # A mask of booleans (or of float64 numbers) is read in the parameters' dtype.
  for flags in ({"w": True, "b": False}, {"w": np.float64(1.0), "b": np.zeros(2)}):
    masked = model._replace(mask=flags)
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(masked.penalty_mask(single)))
    gradient = masked.penalty_gradient(single)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(gradient))
    np.testing.assert_array_equal(gradient["w"], 0.5 * single["w"])
