"""Orthogonalized updates and PSGD-Muon against dense float64 references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt.transforms import orthogonalize, with_float32_statistics

# The classical cubic Newton-Schulz iteration converges to the polar factor (singular
# values in (0, sqrt(3)) after normalization): a test can ask for the exact answer.
CUBIC = (1.5, -0.5, 0.0)


def _polar(matrix: np.ndarray) -> np.ndarray:
  u, _, vt = np.linalg.svd(matrix, full_matrices=False)
  return u @ vt


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (3, 3, 2, 4)])
def test_orthogonalize_gives_the_polar_factor_at_the_requested_rms(shape):
  u = jax.random.normal(jax.random.key(0), shape, jnp.float64)
  tx = orthogonalize(ns_steps=60, update_rms=0.3, ns_coeffs=CUBIC)
  out, _ = tx.update({"u": u}, tx.init({"u": u}))
  matrix = np.asarray(u).reshape(-1, shape[-1])  # a kernel (h, w, in, out) is (h w in, out)
  expected = 0.3 * max(matrix.shape) ** 0.5 * _polar(matrix)
  np.testing.assert_allclose(np.asarray(out["u"]).reshape(matrix.shape), expected, atol=1e-10)
  # A polar factor's entries have RMS 1 / sqrt(max(m, n)): the scale makes it update_rms.
  assert np.sqrt(np.mean(np.asarray(out["u"]) ** 2)) == pytest.approx(0.3, rel=1e-10)


def test_muons_quintic_iteration_lands_near_the_polar_factor():
  """Five quintic steps: singular values in about [0.7, 1.2], the same singular vectors."""
  u = jax.random.normal(jax.random.key(1), (64, 32), jnp.float64)
  out, _ = orthogonalize(update_rms=1.0).update(u, optax.EmptyState())
  normalized = np.asarray(out) / 64**0.5
  singular = np.linalg.svd(normalized, compute_uv=False)
  assert singular.min() > 0.6 and singular.max() < 1.25
  polar = _polar(np.asarray(u))
  assert np.sum(normalized * polar) / np.linalg.norm(normalized) / np.linalg.norm(polar) > 0.98


def test_orthogonalize_refuses_vectors_naming_the_fix():
  with pytest.raises(ValueError, match=r"fewer than two axes.*multi_transform"):
    orthogonalize().update({"b": jnp.ones(3)}, optax.EmptyState())
  with pytest.raises(ValueError, match="ns_steps"):
    orthogonalize(ns_steps=0)
  with pytest.raises(ValueError, match="update_rms"):
    orthogonalize(update_rms=float("nan"))


def test_float32_statistics_wrap_keeps_bfloat16_updates_and_float32_moments():
  tx = with_float32_statistics(optax.adam(0.1))
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.full(3, 0.5, jnp.bfloat16)}, state, params)
  assert updates["w"].dtype == jnp.bfloat16
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)


def _problem():
  key_w, key_b, key_e = jax.random.split(jax.random.key(2), 3)
  params = {
    "w": jax.random.normal(key_w, (6, 4), jnp.float64),
    "b": jax.random.normal(key_b, (4,), jnp.float64),
    "embed": jax.random.normal(key_e, (5, 4), jnp.float64),
  }
  grads = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, params)
  return params, grads


def test_psgd_muon_runs_adamw_on_the_leaves_outside_matrices():
  params, grads = _problem()
  matrices = {"w": True, "b": False, "embed": False}  # the embedding goes to AdamW
  lr = 0.05
  opt = curvopt.psgd_muon(lr, matrices=matrices)
  state = opt.init(params)
  adamw = optax.adamw(lr, weight_decay=0.0, nesterov=True)
  adam_states = {name: adamw.init(params[name]) for name in ("b", "embed")}
  for step in range(3):
    g = jax.tree.map(lambda x, s=step: x * (1.0 - 0.2 * s), grads)
    updates, state = opt.update(g, state, params)
    for name in ("b", "embed"):
      expected, adam_states[name] = adamw.update(g[name], adam_states[name], params[name])
      np.testing.assert_allclose(updates[name], expected, rtol=1e-12)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("b1", [0.0, 0.5])
def test_psgd_muon_orthogonalizes_the_whitened_nesterov_momentum(b1):
  """The matrix step is polar(b1 m + (1 - b1) P g), m the EMA of P g; P replayed from PSGD."""
  params, grads = _problem()
  matrices = {"w": True, "b": False, "embed": False}
  opt = curvopt.psgd_muon(
    0.1, b1, matrices=matrices, ns_steps=60, ns_coeffs=CUBIC, update_probability=1.0, seed=3
  )
  psgd = curvopt.transforms.scale_by_psgd_kron("whitening", 0.1, 1.0, seed=3)
  state, psgd_state = opt.init(params), psgd.init({"w": params["w"]})
  momentum = np.zeros((6, 4))
  for step in range(4):
    g = jax.tree.map(lambda x, s=step: x * (1.0 + 0.3 * s), grads)
    updates, state = opt.update(g, state, params)
    whitened, psgd_state = psgd.update({"w": g["w"]}, psgd_state, {"w": params["w"]})
    h = np.asarray(whitened["w"])
    momentum = b1 * momentum + (1 - b1) * h
    expected = -0.1 * 0.2 * 6**0.5 * _polar(b1 * momentum + (1 - b1) * h)
    np.testing.assert_allclose(updates["w"], expected, atol=1e-9)
  # The fitted preconditioner is not a multiple of I: the test sees the whitening.
  assert np.abs(_polar(h) - _polar(np.asarray(g["w"]))).max() > 1e-3


def test_psgd_muon_default_groups_and_a_mask_of_the_wrong_structure():
  params, _ = _problem()
  assert curvopt.transforms.matrix_leaves(params) == {"w": True, "b": False, "embed": True}
  opt = curvopt.psgd_muon(0.1, matrices={"w": True})
  with pytest.raises(ValueError, match="matrices must be a pytree of booleans like the param"):
    opt.init(params)


def test_psgd_muon_trains_a_small_network_and_refuses_bad_hyperparameters():
  with jax.enable_x64(False):
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jnp.tanh(x @ jax.random.normal(jax.random.key(1), (8, 3)))
    params = {
      "hidden": {"w": jax.random.normal(jax.random.key(2), (8, 16)) / 8**0.5, "b": jnp.zeros(16)},
      "out": {"w": jax.random.normal(jax.random.key(3), (16, 3)) / 4.0, "b": jnp.zeros(3)},
    }
    loss = lambda p: jnp.mean(
      (jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["out"]["w"] + p["out"]["b"] - y) ** 2
    )
    opt = curvopt.psgd_muon(optax.cosine_decay_schedule(0.05, 200))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    before = float(loss(params))
    for _ in range(200):
      params, state = step(params, state)
    chex.assert_tree_all_finite(params)
    assert float(loss(params)) < 0.1 * before
  for bad in ({"learning_rate": -0.1}, {"b1": 1.5}, {"weight_decay": float("nan")}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      curvopt.psgd_muon(**{"learning_rate": 0.1, **bad})


def _newton_schulz_replica(x, steps, coeffs, eps):
  a, b, c = coeffs
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (2, 3, 5)])
def test_orthogonalize_defaults_are_five_quintic_steps_at_rms_point_two(shape):
  u = np.asarray(jax.random.normal(jax.random.key(3), shape, jnp.float64))
  out, _ = orthogonalize().update({"u": jnp.asarray(u)}, optax.EmptyState())
  matrix = u.reshape(-1, shape[-1])
  wide = matrix.shape[0] <= matrix.shape[1]
  polar = _newton_schulz_replica(matrix if wide else matrix.T, 5, (3.4445, -4.775, 2.0315), 1e-8)
  expected = 0.2 * max(matrix.shape) ** 0.5 * (polar if wide else polar.T)
  np.testing.assert_allclose(np.asarray(out["u"]).reshape(matrix.shape), expected, rtol=1e-12)


def test_orthogonalize_eps_guards_the_normalization_of_a_tiny_matrix():
  u = np.array([[1e-8, 0.0], [0.0, 2e-8]])
  for eps in (1e-8, 0.0, 1e-6):
    tx = orthogonalize(ns_steps=1, update_rms=1.0, ns_coeffs=(1.0, 0.0, 0.0), eps=eps)
    out, _ = tx.update(jnp.asarray(u), optax.EmptyState())
    # One step of the identity iteration: the normalized input, times sqrt(2).
    expected = 2**0.5 * u / (np.linalg.norm(u) + eps)
    np.testing.assert_allclose(out, expected, rtol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float64])
def test_orthogonalize_works_in_float32_at_least_and_returns_the_leaf_dtype(dtype):
  u = jax.random.normal(jax.random.key(4), (5, 3), jnp.float64)
  tx = orthogonalize(ns_steps=30, update_rms=1.0, ns_coeffs=CUBIC)
  out, _ = tx.update(u.astype(dtype), optax.EmptyState())
  assert out.dtype == dtype
  exact = 5**0.5 * _polar(np.asarray(u.astype(dtype), np.float64))
  # bfloat16 input, float32 work: the output is the polar factor rounded to bfloat16 once.
  tolerance = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5, jnp.float64: 1e-12}[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float64), exact, atol=tolerance)
  if dtype == jnp.bfloat16:
    in_float32, _ = tx.update(u.astype(dtype).astype(jnp.float32), optax.EmptyState())
    np.testing.assert_array_equal(out, in_float32.astype(jnp.bfloat16))


def test_orthogonalize_refuses_bad_coefficients_and_eps():
  with pytest.raises(
    ValueError, match=r"ns_coeffs must be three numbers \(a, b, c\), got \(1\.5, -0\.5\)"
  ):
    orthogonalize(ns_coeffs=(1.5, -0.5))
  with pytest.raises(ValueError, match="eps"):
    orthogonalize(eps=-1e-8)
  assert curvopt.transforms.matrix_leaves(
    {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "s": 1.0}
  ) == {
    "w": True,
    "b": False,
    "s": False,
  }


def test_orthogonalize_names_each_argument_and_keeps_float32_work_in_float32():
  for kwargs, message in (
    ({"ns_steps": 0}, r"^ns_steps must be a positive integer"),
    ({"update_rms": 0.0}, r"^update_rms must be a finite number > 0"),
    ({"eps": -1.0}, r"^eps must be a finite number >= 0"),
  ):
    with pytest.raises(ValueError, match=message):
      orthogonalize(**kwargs)
  with pytest.raises(
    ValueError,
    match=r"route vectors and scalars to another transform \(curvopt\.multi_transform\)\.$",
  ):
    orthogonalize().update(jnp.ones(3), optax.EmptyState())
  tx = orthogonalize()
  assert tx.init({"w": jnp.ones((2, 2))}) == optax.EmptyState()
  u = jnp.ones((4, 3), jnp.float32)
  program = str(jax.make_jaxpr(lambda u: tx.update(u, optax.EmptyState())[0])(u))
  assert "f64" not in program  # a float32 leaf is orthogonalized in float32, not float64
