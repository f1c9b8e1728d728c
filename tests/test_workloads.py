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
  ("options", "named"),
  [
    ({"size": "huge"}, "size"),
    ({"size": "tiny", "batch_size": 0}, "batch_size"),
    ({"size": "tiny", "power": float("nan")}, "power"),
  ],
  ids=["size", "batch_size", "power"],
)
def test_nqm_bad_options_are_named(options, named):
  raw = {
    "benchmark": {"name": "x", "steps": 2},
    "workloads": {"noisy_quadratic": options},
    "optimizers": {"adam": {"learning_rates": [0.1]}},
  }
  with pytest.raises(ConfigError, match=named):
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


def test_gpt_lm_tiny_corpus_split_and_a_uniform_start():
  workload = WORKLOADS["gpt_lm"](size="tiny")
  from curvopt.bench import data

  corpus = data.python_source_corpus()
  assert corpus.train.size + corpus.validation.size >= 5_000_000  # at least 5 MB of text
  assert 0.02 < corpus.validation.size / corpus.train.size < 0.1
  params = workload.init_params(jax.random.key(0))
  assert "unembed" not in params  # tied embeddings
  inputs, targets = workload.batch(seed=0, step=0)
  assert inputs.shape == (8, 32) and inputs.dtype == np.int32
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # next-byte targets
  # Small initial logits: the loss starts at log(256), a uniform guess.
  loss = float(workload.value_fn(params, workload.eval_batch()))
  assert loss == pytest.approx(np.log(256), abs=0.05)
  assert np.isfinite(float(workload.test_metric_fn(params)))


@pytest.mark.slow  # the ResNet at tiny size, several compiles
def test_resnet_normalizes_per_example_and_blocks_start_as_the_identity():
  workload = WORKLOADS["resnet_digits"](size="tiny")
  params = workload.init_params(jax.random.key(0))
  x = jnp.asarray(workload.train[0][:6])
  together = workload.model_fn(params, x)
  alone = jnp.concatenate([workload.model_fn(params, x[i : i + 1]) for i in range(6)])
  chex.assert_trees_all_close(together, alone, atol=1e-5)  # GroupNorm: no batch statistics
  # A zero-initialized last norm makes every residual branch zero at the start.
  branchless = jax.tree.map(lambda v: v, params)
  for name, block in params.items():
    if name.startswith("stage"):
      branchless[name] = {**block, "conv2": jnp.zeros_like(block["conv2"])}
  chex.assert_trees_all_close(workload.model_fn(branchless, x), together, atol=1e-6)


@pytest.mark.parametrize(
  "name", ["gpt_lm", pytest.param("resnet_digits", marks=pytest.mark.slow), "noisy_quadratic"]
)
def test_a_curvature_optimizer_trains_each_new_workload_through_value_fn(name):
  import optax

  import curvopt

  workload = WORKLOADS[name](size="tiny")
  params = workload.init_params(jax.random.key(0))
  opt = curvopt.sophia_h(3e-3, refresh_every=1)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    value_fn = lambda p: workload.value_fn(p, batch)
    updates, state = opt.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  before = float(workload.value_fn(params, workload.eval_batch()))
  for i in range(10):
    params, state = step(params, state, jax.tree.map(jnp.asarray, workload.batch(0, i)))
  after = float(workload.value_fn(params, workload.eval_batch()))
  assert int(state.skipped) == 0
  assert after < before
