"""The practitioner-scale workloads at their `tiny` size: exact math where there is some."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.bench.config import ConfigError, check_buildable, parse
from curvopt.bench.workloads import WORKLOADS
from curvopt.bench.workloads.noisy_quadratic import NoisyQuadratic


def test_nqm_gradient_is_curvature_times_theta_plus_noise_and_hessian_is_exact():
  workload = WORKLOADS["noisy_quadratic"](size="tiny", batch_size=4)
  problem = NoisyQuadratic.make(16)
  params = workload.init_params(jax.random.key(0))
  batch = workload.batch(seed=0, step=3)
  xi = np.asarray(batch[0][0], np.float64)
  grad = jax.grad(workload.value_fn)(params, batch)["theta"]
  np.testing.assert_allclose(grad, problem.curvature * problem.start + xi, rtol=1e-5, atol=1e-6)
  hessian = jax.hessian(lambda t: workload.value_fn({"theta": t}, batch))(params["theta"])
  np.testing.assert_allclose(hessian, np.diag(problem.curvature), rtol=1e-5, atol=1e-7)
  # The noise has covariance H / B.
  draws = np.stack([workload.batch(0, t)[0][0] for t in range(4000)])
  np.testing.assert_allclose(draws.var(0), problem.noise / 4, rtol=0.1)
  # The evaluation batch is noise-free: the reported loss is the true one.
  assert float(workload.value_fn(params, workload.eval_batch())) == pytest.approx(
    problem.loss(problem.start), rel=1e-5
  )


def test_nqm_expected_loss_matches_simulation():
  problem = NoisyQuadratic.make(16)
  rng = np.random.default_rng(1)
  lr, batch_size, steps, repeats = 0.5, 4, 100, 4000
  for p in (0.0, 1.0):
    rate = lr * problem.curvature**-p
    theta = np.tile(problem.start, (repeats, 1))
    for _ in range(steps):
      noise = rng.normal(size=theta.shape) * np.sqrt(problem.noise / batch_size)
      theta = theta - rate * (problem.curvature * theta + noise)
    simulated = np.mean(0.5 * np.sum(problem.curvature * theta**2, axis=1))
    expected = problem.expected_loss(np.array(steps), lr, batch_size, p)
    assert simulated == pytest.approx(expected, rel=0.05)
  assert problem.expected_loss(np.array(1), 2.5, 4, 0.0) == np.inf  # lr h_1 > 2: unstable


def test_nqm_prediction_has_perfect_scaling_then_a_plateau_and_preconditioning_helps():
  problem = NoisyQuadratic.make(16)
  target = 0.01 * problem.loss(problem.start)
  steps = {
    p: [problem.predicted_steps(target, b, p)[0] for b in (1, 2, 10**5, 2 * 10**5)] for p in (0, 1)
  }
  for p in (0, 1):
    small_1, small_2, large_1, large_2 = steps[p]
    assert small_1 / small_2 == pytest.approx(2.0, rel=0.1)  # steps ~ 1/B when noise dominates
    assert large_1 / large_2 == pytest.approx(1.0, rel=0.1)  # no gain past the critical size
  assert steps[1][2] < steps[0][2]  # preconditioning lowers the curvature-bound floor


@pytest.mark.parametrize(
  "options",
  [{"size": "huge"}, {"size": "tiny", "batch_size": 0}, {"size": "tiny", "power": float("nan")}],
  ids=["size", "batch_size", "power"],
)
def test_nqm_bad_options_are_named(options):
  name = next(iter(k for k in options if k != "size" or options[k] == "huge"))
  raw = {
    "benchmark": {"name": "x", "steps": 2},
    "workloads": {"noisy_quadratic": options},
    "optimizers": {"adam": {"learning_rates": [0.1]}},
  }
  with pytest.raises(ConfigError, match=name):
    check_buildable(parse(raw))


def test_nqm_sizes():
  dims = {
    s: WORKLOADS["noisy_quadratic"](size=s).init_params(None)["theta"].size
    for s in ("tiny", "small", "full")
  }
  assert dims == {"tiny": 16, "small": 256, "full": 10_000}
  chex.assert_type(
    WORKLOADS["noisy_quadratic"](size="tiny").init_params(None)["theta"], jnp.float32
  )
