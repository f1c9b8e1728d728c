"""EGN's solver choice: the cost model and its thresholds, exactly."""

import pytest

from curvopt.transforms.gauss_newton._egn import choose_solver, solver_costs


def test_solver_costs_are_the_documented_flop_counts():
  costs = solver_costs(num_params=30, num_rows=8, product_flops=100.0, cg_maxiter=7)
  assert costs == {
    "cholesky": 8 * 100.0 + 8 * 8 * 30 + 8**3 / 3,
    "parameter_cholesky": 8 * 100.0 + 30 * 30 * 8 + 30**3 / 3,
    "cg": 2.0 * 7 * 100.0,
  }
  wide = solver_costs(num_params=5, num_rows=9, product_flops=2.0, cg_maxiter=1)
  assert wide["cholesky"] == 5 * 2.0 + 81 * 5 + 9**3 / 3  # materializing: min(d, n) products


def test_auto_factors_the_cheaper_space_within_the_size_limit():
  # Costly products (F = 1e4), so CG's 100 of them lose to either factorization.
  flops = 1e4
  # d = 30 > n = 8: the batch system is cheaper, and the other way round.
  assert choose_solver(30, 8, 1024, flops, 50) == "cholesky"
  assert choose_solver(8, 30, 1024, flops, 50) == "parameter_cholesky"
  # A size limit at the smaller system allows it; below, CG is all that is left.
  assert choose_solver(30, 8, 8, flops, 50) == "cholesky"
  assert choose_solver(30, 8, 7, flops, 50) == "cg"
  assert choose_solver(8, 30, 8, flops, 50) == "parameter_cholesky"
  # The parameter system alone fits under the limit.
  assert choose_solver(30, 40, 30, flops, 50) == "parameter_cholesky"


def _flops_for_ratio(ratio, d=30, n=8, cg_maxiter=5):
  """The product flops F at which the batch Cholesky costs `ratio` times CG."""
  # n F + n^2 d + n^3 / 3 = ratio 2 cg_maxiter F
  return (n * n * d + n**3 / 3) / (ratio * 2 * cg_maxiter - n)


@pytest.mark.parametrize(("ratio", "expected"), [(3.9, "cholesky"), (4.0, "cholesky"), (4.1, "cg")])
def test_a_factorization_is_kept_up_to_four_times_the_cost_of_cg(ratio, expected):
  flops = _flops_for_ratio(ratio)
  costs = solver_costs(30, 8, flops, 5)
  assert costs["cholesky"] / costs["cg"] == pytest.approx(ratio, rel=1e-12)
  if ratio == 4.0:  # exactly at the threshold (the tie is exact here): still factored
    assert costs["cholesky"] <= 4.0 * costs["cg"]
  assert choose_solver(30, 8, 1024, flops, 5) == expected
