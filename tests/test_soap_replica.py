"""SOAP step by step against a numpy replica of Vyas et al.'s algorithm (two-sided factors)."""

import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.transforms import scale_by_soap


def _eigenbasis(factor):
  """Eigenvectors, largest eigenvalue first (a column's sign does not change SOAP's step)."""
  return np.linalg.eigh(factor)[1][:, ::-1]


class _Replica:
  """SOAP on one matrix leaf and one vector leaf (plain Adam), in float64."""

  def __init__(self, shape, b1, b2, eps, beta, frequency, start):
    m, n = shape
    self.b1, self.b2, self.eps, self.beta = b1, b2, eps, beta
    self.frequency, self.start = frequency, start
    self.mu, self.nu = np.zeros(shape), np.zeros(shape)
    self.left, self.right = np.zeros((m, m)), np.zeros((n, n))
    self.q_left, self.q_right = np.eye(m), np.eye(n)
    self.vector_mu, self.vector_nu = np.zeros(n), np.zeros(n)
    self.count = 0

  def step(self, g, v):
    b1, b2, eps = self.b1, self.b2, self.eps
    self.left = self.beta * self.left + (1 - self.beta) * g @ g.T
    self.right = self.beta * self.right + (1 - self.beta) * g.T @ g
    previous, self.count = self.count, self.count + 1
    self.mu = b1 * self.mu + (1 - b1) * g
    rotated = self.q_left.T @ g @ self.q_right
    self.nu = b2 * self.nu + (1 - b2) * rotated**2
    mu_hat = self.mu / (1 - b1**self.count)
    nu_hat = self.nu / (1 - b2**self.count)
    adam = (self.q_left.T @ mu_hat @ self.q_right) / (np.sqrt(nu_hat) + eps)
    out = self.q_left @ adam @ self.q_right.T
    self.vector_mu = b1 * self.vector_mu + (1 - b1) * v
    self.vector_nu = b2 * self.vector_nu + (1 - b2) * v**2
    vector_out = (self.vector_mu / (1 - b1**self.count)) / (
      np.sqrt(self.vector_nu / (1 - b2**self.count)) + eps
    )
    if previous % self.frequency == 0 and previous >= self.start:
      new_left, new_right = _eigenbasis(self.left), _eigenbasis(self.right)
      overlap_left = (new_left.T @ self.q_left) ** 2
      overlap_right = (new_right.T @ self.q_right) ** 2
      self.nu = overlap_left @ self.nu @ overlap_right.T  # diagonals carried to the new basis
      self.q_left, self.q_right = new_left, new_right
    return out, vector_out


@pytest.mark.parametrize(
  ("b1", "b2", "shampoo_beta", "frequency", "start"),
  [(0.9, 0.95, 0.8, 5, 5), (0.5, 0.9, None, 3, 6)],
)
def test_soap_equals_the_replica_across_refreshes(b1, b2, shampoo_beta, frequency, start):
  rng = np.random.default_rng(4)
  shape = (4, 3)
  # The first refresh comes after `start` steps, when both factors have full rank: a
  # rank-deficient factor's null-space basis is arbitrary (any one is an eigenbasis).
  tx = scale_by_soap(
    b1,
    b2,
    1e-8,
    shampoo_beta,
    precondition_frequency=frequency,
    start_preconditioning_step=start,
    one_sided=False,
  )
  replica = _Replica(
    shape, b1, b2, 1e-8, b2 if shampoo_beta is None else shampoo_beta, frequency, start
  )
  params = {"w": jnp.zeros(shape), "b": jnp.zeros(3)}
  state = tx.init(params)
  for _ in range(14):
    g, v = rng.normal(size=shape), rng.normal(size=3)
    out, state = tx.update({"w": jnp.asarray(g), "b": jnp.asarray(v)}, state)
    expected, expected_vector = replica.step(g, v)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(out["b"], expected_vector, rtol=1e-12)
  assert int(state.count) == 14
