"""The noisy quadratic model (NQM) of Zhang et al. 2019, and its closed-form predictions.

A diagonal quadratic `L(theta) = 1/2 sum_i h_i theta_i^2` with a power-law
spectrum `h_i = i^-power` and stochastic gradients `H theta + xi`,
`xi ~ N(0, C / B)` with the noise covariance equal to the curvature
(`C = H`, the paper's choice) and `B` the batch size. For preconditioned SGD
with effective per-coordinate rate `a_i = lr h_i^-p` the expected loss has a
closed form per coordinate, so the steps a batch size needs to reach a
target, at the best learning rate, are predicted exactly: perfect scaling
(steps ~ 1/B) below a critical batch size, none above it, and a larger
critical batch size the stronger the preconditioning (`p`).

Zhang, Li, Nado, Martens, Sachdeva, Dahl, Shallue, Grosse, "Which
Algorithmic Choices Matter at Which Batch Sizes? Insights From a Noisy
Quadratic Model", NeurIPS 2019.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from curvopt import _checks
from curvopt.bench.workloads._base import Workload, check_batch_size

SIZES = ("tiny", "small", "full")
_DIMENSION = {"tiny": 16, "small": 256, "full": 10_000}


@dataclasses.dataclass(frozen=True)
class NoisyQuadratic:
  """The problem's constants: curvature `h`, noise variance `c` (per example), start.

  The start is a fixed standard normal draw (seed 0).
  """

  curvature: np.ndarray
  noise: np.ndarray
  start: np.ndarray

  @classmethod
  def make(cls, dimension: int, power: float = 1.0) -> NoisyQuadratic:
    h = np.arange(1, dimension + 1, dtype=np.float64) ** -float(power)
    # A random start: from all ones, sign-based steps (Adam's early steps) would
    # shrink every coordinate alike and reach the optimum in a few steps.
    start = np.random.default_rng(0).normal(size=dimension)
    return cls(curvature=h, noise=h.copy(), start=start)

  def loss(self, theta: np.ndarray) -> float:
    return 0.5 * float(np.sum(self.curvature * theta**2))

  def expected_loss(
    self, steps: np.ndarray, learning_rate: float, batch_size: int, preconditioning: float
  ) -> np.ndarray:
    """`E[L]` after each of `steps` of SGD preconditioned by `h^-p` (no momentum).

    Per coordinate `E[theta_i^2]_t = r^t theta_i0^2 + a^2 c_i / B (1 - r^t) / (1 - r)`,
    `r = (1 - a h_i)^2`, `a = lr h_i^-p`; infinite where some `r >= 1` (unstable).
    """
    h, c = self.curvature, self.noise
    a = learning_rate * h**-preconditioning
    r = (1.0 - a * h) ** 2
    if np.any(r >= 1.0):
      return np.full(np.shape(steps), np.inf)
    t = np.asarray(steps, np.float64)[..., None]
    decay = r**t
    noise = a**2 * c / batch_size * (1.0 - decay) / (1.0 - r)
    return 0.5 * np.sum(h * (decay * self.start**2 + noise), axis=-1)

  def predicted_steps(
    self,
    target: float,
    batch_size: int,
    preconditioning: float,
    *,
    max_steps: int = 10**7,
    learning_rates: np.ndarray | None = None,
  ) -> tuple[float, float]:
    """`(steps, learning_rate)`: the fewest steps to `E[L] <= target` over learning rates.

    The expected loss decreases monotonically in `t`, so each learning rate's
    count is a bisection; `inf` when no learning rate reaches the target
    within `max_steps` (the noise floor `~ lr / B` lies above it).
    """
    if learning_rates is None:
      # Stability needs lr * h_i^(1-p) < 2 for every i.
      top = 2.0 / np.max(self.curvature ** (1.0 - preconditioning))
      learning_rates = top * np.geomspace(1e-4, 0.999, 200)
    best = (float("inf"), float("nan"))
    for lr in learning_rates:
      if self.expected_loss(np.array(max_steps), lr, batch_size, preconditioning) > target:
        continue
      low, high = 0, max_steps
      while high - low > 1:
        middle = (low + high) // 2
        if self.expected_loss(np.array(middle), lr, batch_size, preconditioning) <= target:
          high = middle
        else:
          low = middle
      if high < best[0]:
        best = (float(high), float(lr))
    return best


def noisy_quadratic(
  size: str = "small", batch_size: int = 64, power: float = 1.0, target_fraction: float = 0.01
) -> Workload:
  """Noisy quadratic model (Zhang et al. 2019): power-law curvature, noise ~ curvature / B."""
  _checks.one_of("size", size, SIZES)
  check_batch_size(batch_size, full_batch_allowed=False)
  _checks.in_range("power", power, 0.0, 4.0, high_inclusive=True)
  _checks.in_range("target_fraction", target_fraction, 0.0, 1.0)
  _checks.positive("target_fraction", target_fraction)
  dimension = _DIMENSION[size]
  problem = NoisyQuadratic.make(dimension, power)
  root = jnp.asarray(np.sqrt(problem.curvature), jnp.float32)
  noise_scale = np.sqrt(problem.noise / batch_size)
  no_noise = (np.zeros((1, dimension), np.float32), np.zeros((1, dimension), np.float32))

  def sample(seed: int, step: int):
    xi = np.random.default_rng([seed, step]).normal(size=dimension) * noise_scale
    return xi[None].astype(np.float32), no_noise[1]

  # Residuals r = sqrt(h) theta + xi / sqrt(h): 1/2 |r|^2 has gradient H theta + xi and
  # Hessian H, and with xi = 0 (the evaluation batch) it is the noise-free loss.
  return Workload(
    name="noisy_quadratic",
    description=(
      f"noisy quadratic model (Zhang et al. 2019), {size}: {dimension}-d, h_i = i^-{power:g}, "
      f"gradient noise covariance H / {batch_size}"
    ),
    loss_type="least_squares",
    init_params=lambda key: {"theta": jnp.asarray(problem.start, jnp.float32)},
    model_fn=lambda p, xi: root * p["theta"] + xi[0] / root,
    loss_fn=lambda residuals, _: 0.5 * jnp.sum(residuals**2),
    train=no_noise,
    batch_size=batch_size,
    test_metric="loss",
    test_metric_fn=lambda p: 0.5 * jnp.sum(root**2 * p["theta"] ** 2),
    higher_is_better=False,
    target=target_fraction * problem.loss(problem.start),
    sample_batch=sample,
    train_eval_batch=no_noise,
  )
