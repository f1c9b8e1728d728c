"""Shampoo step by step against a numpy replica (two-sided factors, Adam grafting)."""

import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.transforms import scale_by_shampoo


def _inverse_root(factor, p, epsilon):
  """`(F + epsilon lambda_max I)^(-1/p)` by eigendecomposition (relative epsilon)."""
  w, u = np.linalg.eigh(factor)
  w = np.maximum(w, 0)
  damping = epsilon * (w[-1] if w[-1] > 0 else 1.0)
  return (u * (w + damping) ** (-1.0 / p)) @ u.T


class _Replica:
  def __init__(self, shape, beta2, epsilon, frequency, start, graft_b2, graft_eps):
    m, n = shape
    self.beta2, self.epsilon, self.frequency, self.start = beta2, epsilon, frequency, start
    self.graft_b2, self.graft_eps = graft_b2, graft_eps
    self.left, self.right = np.zeros((m, m)), np.zeros((n, n))
    self.left_root, self.right_root = np.eye(m), np.eye(n)
    self.graft_nu = {"w": np.zeros(shape), "b": np.zeros(n)}
    self.count = 0

  def _graft(self, name, g):
    self.graft_nu[name] = self.graft_b2 * self.graft_nu[name] + (1 - self.graft_b2) * g**2
    corrected = self.graft_nu[name] / (1 - self.graft_b2 ** (self.count + 1))
    return g / (np.sqrt(corrected) + self.graft_eps)

  def step(self, g, v):
    weight = 1.0 if self.beta2 == 1 else 1 - self.beta2
    self.left = self.beta2 * self.left + weight * g @ g.T
    self.right = self.beta2 * self.right + weight * g.T @ g
    if self.count % self.frequency == 0:
      debias = 1 - self.beta2 ** (self.count + 1) if self.beta2 < 1 else 1.0
      self.left_root = _inverse_root(self.left / debias, 4, self.epsilon)
      self.right_root = _inverse_root(self.right / debias, 4, self.epsilon)
    direction, vector = self._graft("w", g), self._graft("b", v)
    preconditioned = self.left_root @ g @ self.right_root
    grafted = preconditioned * np.linalg.norm(direction) / (np.linalg.norm(preconditioned) + 1e-16)
    out = direction if self.count < self.start else grafted
    self.count += 1
    return out, vector


@pytest.mark.parametrize(
  ("beta2", "epsilon", "frequency", "start"),
  [(1.0, 1e-6, 3, 3), (0.9, 1e-4, 2, 0), (0.7, 1e-6, 4, 5)],
)
def test_shampoo_equals_the_replica(beta2, epsilon, frequency, start):
  rng = np.random.default_rng(7)
  shape = (4, 3)
  tx = scale_by_shampoo(
    beta2=beta2,
    epsilon=epsilon,
    precondition_frequency=frequency,
    start_preconditioning_step=start,
    one_sided=False,
  )
  replica = _Replica(shape, beta2, epsilon, frequency, start, 0.999, 1e-8)
  state = tx.init({"w": jnp.zeros(shape), "b": jnp.zeros(3)})
  for _ in range(12):
    g, v = rng.normal(size=shape), rng.normal(size=3)
    out, state = tx.update({"w": jnp.asarray(g), "b": jnp.asarray(v)}, state)
    expected, expected_vector = replica.step(g, v)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(out["b"], expected_vector, rtol=1e-12)
  assert int(state.count) == 12 and int(state.failures) == 0
