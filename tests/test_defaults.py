"""Every optimizer's and transform's defaults are the documented ones.

A changed default changes every user's optimizer silently; each case below runs the
default construction and one that spells the documented values out (the README's and
the docstrings' numbers, from the papers and reference code), and asks for the same
trajectory, bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt import transforms as T
from curvopt.transforms.gauss_newton._line_search import value_fn_objective

_KEY = jax.random.split(jax.random.key(0), 3)
PARAMS = {"w": 0.5 * jax.random.normal(_KEY[0], (6, 4)), "b": jnp.zeros(4)}
X = jax.random.normal(_KEY[1], (16, 6))
Y = jax.random.normal(_KEY[2], (16, 4))


def model_fn(p):
  return jnp.tanh(X @ p["w"] + p["b"])


def loss_fn(f):
  return 0.5 * jnp.mean(jnp.sum((f - Y) ** 2, axis=-1))


def value_fn(p):
  return loss_fn(model_fn(p))


def _trajectory(tx, steps):
  tx = optax.with_extra_args_support(tx)

  @jax.jit
  def step(p, state):
    g = jax.grad(value_fn)(p)
    u, state = tx.update(g, state, p, value_fn=value_fn, model_fn=model_fn, loss_fn=loss_fn)
    return optax.apply_updates(p, u), state

  p, state = PARAMS, tx.init(PARAMS)
  for _ in range(steps):
    p, state = step(p, state)
  return p


LR = 0.05
PSGD_COMMON = {
  "lr_preconditioner": 0.1,
  "init_scale": None,
  "beta_l": 0.9,
  "damping": 1e-9,
  "seed": 0,
}
# What the named PSGD optimizers add to their transforms' defaults.
PSGD_NAMED = {
  "weight_decay": 0.0,
  "max_update_rms": 1.1,
  "weight_decay_mask": None,
  "state_dtype": None,
  **PSGD_COMMON,
}
SHAMPOO = {
  "block_size": 1024,
  "beta2": 1.0,
  "epsilon": 1e-6,
  "precondition_frequency": 10,
  "start_preconditioning_step": None,
  "relative_epsilon": True,
  "root_method": "eigh",
  "exponent_override": None,
  "rank_rtol": None,
  "grafting": "adam",
  "grafting_b2": 0.999,
  "grafting_eps": 1e-8,
  "merge_dims": True,
  "precondition_1d": False,
  "matrix_axes": None,
  "one_sided": True,
  "block_sharding": None,
}
SOAP = {
  "b1": 0.95,
  "b2": 0.95,
  "eps": 1e-8,
  "shampoo_beta": None,
  "precondition_frequency": 10,
  "start_preconditioning_step": 0,
  "block_size": 1024,
  "merge_dims": True,
  "precondition_1d": False,
  "matrix_axes": None,
  "one_sided": True,
  "block_sharding": None,
  "eigenbasis_method": "eigh",
}
LAZY = {
  "regularization": 1.0,
  "hessian_every": None,
  "mode": "auto",
  "kind": "cubic",
  "adaptive": True,
  "min_regularization": 1e-10,
  "max_doublings": 40,
  "krylov_dim": 20,
  "max_dense_size": 4096,
  "seed": 0,
}
SAM = {"rho": 0.05, "adaptive": False, "eta": 0.01, "eps": 1e-12, "has_aux": False}
GAM = {
  "rho": 0.03,
  "grad_norm_rho": 0.2,
  "beta1": 0.1,
  "beta3": None,
  "beta0": 0.1,
  "gamma": 0.05,
  "apply_beta0": False,
  "adaptive": False,
  "eps": 1e-12,
  "has_aux": False,
}

CASES = {
  # Named optimizers.
  "adahessian": (
    lambda: curvopt.adahessian(LR),
    lambda: curvopt.adahessian(
      LR,
      0.9,
      0.999,
      1e-4,
      0.0,
      1.0,
      refresh_every=1,
      absolute=True,
      averaging_axes="flax",
      seed=0,
      state_dtype=None,
    ),
  ),
  "sophia_h": (
    lambda: curvopt.sophia_h(LR),
    lambda: curvopt.sophia_h(
      LR,
      b1=0.965,
      b2=0.99,
      gamma=0.01,
      eps=1e-8,
      weight_decay=1e-4,
      clip_threshold=1.0,
      refresh_every=10,
      seed=0,
      state_dtype=None,
    ),
  ),
  "shampoo": (
    lambda: curvopt.shampoo(LR),
    lambda: curvopt.shampoo(
      LR,
      b1=0.9,
      weight_decay=0.0,
      nesterov=False,
      state_dtype=None,
      statistics_dtype=None,
      root_dtype=None,
      packed_statistics=None,
      **{k: v for k, v in SHAMPOO.items()},
    ),
  ),
  "soap": (
    lambda: curvopt.soap(LR),
    lambda: curvopt.soap(LR, weight_decay=0.01, state_dtype=None, **SOAP),
  ),
  "psgd_kron": (
    lambda: curvopt.psgd_kron(LR),
    lambda: curvopt.psgd_kron(
      LR,
      b1=0.9,
      fit="whitening",
      update_probability=None,
      max_size=None,
      max_skew=1.0,
      geometry="Q0.5EQ1.5",
      **PSGD_NAMED,
    ),
  ),
  "psgd_lra": (
    lambda: curvopt.psgd_lra(LR),
    lambda: curvopt.psgd_lra(
      LR,
      b1=0.9,
      fit="whitening",
      rank=10,
      update_probability=None,
      **PSGD_NAMED,
    ),
  ),
  "psgd_dense": (
    lambda: curvopt.psgd_dense(LR),
    lambda: curvopt.psgd_dense(
      LR,
      b1=0.0,
      fit="newton",
      update_probability=1.0,
      geometry="Q0.5EQ1.5",
      max_dimension=16384,
      **PSGD_NAMED,
    ),
  ),
  "psgd_muon": (
    lambda: curvopt.psgd_muon(LR),
    lambda: curvopt.psgd_muon(
      LR,
      b1=0.9,
      weight_decay=0.0,
      matrices=None,
      update_rms=0.2,
      ns_steps=5,
      ns_coeffs=(3.4445, -4.775, 2.0315),
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      lr_preconditioner=0.1,
      update_probability=None,
      max_size=None,
      max_skew=1.0,
      geometry="Q0.5EQ1.5",
      seed=0,
      state_dtype=None,
    ),
  ),
  "egn": (
    lambda: curvopt.egn(),
    lambda: curvopt.egn(
      1.0,
      0.1,
      adaptive_damping=False,
      momentum=0.0,
      line_search=True,
      solver="auto",
      l2_regularization=0.0,
      l2_mask=None,
      max_factor_size=1024,
      cg_tol=1e-6,
      cg_maxiter=50,
    ),
  ),
  "newton_cg": (
    lambda: curvopt.newton_cg(),
    lambda: curvopt.newton_cg(
      1.0,
      1.0,
      curvature="gauss_newton",
      adaptive_damping=True,
      max_cg_iters=50,
      cg_tol=1e-4,
      warm_start=0.95,
      backtracking=True,
    ),
  ),
  "lazy_newton": (
    lambda: curvopt.lazy_newton(),
    lambda: curvopt.lazy_newton(1.0, **LAZY),
  ),
  "sam": (
    lambda: curvopt.sam(optax.sgd(LR)),
    lambda: curvopt.sam(optax.sgd(LR), perturbation="global", num_groups=1, **SAM),
  ),
  "gam": (
    lambda: curvopt.gam(optax.sgd(LR)),
    lambda: curvopt.gam(optax.sgd(LR), **GAM),
  ),
  "mfac": (
    lambda: curvopt.mfac(LR),
    lambda: curvopt.mfac(
      LR, num_grads=1024, damping=1e-5, momentum=0.0, weight_decay=0.0, refresh_every=None
    ),
  ),
  # Transforms.
  "scale_by_adahessian": (
    lambda: T.scale_by_adahessian(),
    lambda: T.scale_by_adahessian(
      0.9,
      0.999,
      1e-4,
      1.0,
      refresh_every=1,
      absolute=True,
      averaging_axes="flax",
      hessian_diagonal_fn=T.hutchinson_diagonal_estimator(seed=0, distribution="rademacher"),
    ),
  ),
  "scale_by_sophia_h": (
    lambda: T.scale_by_sophia_h(),
    lambda: T.scale_by_sophia_h(
      0.965,
      0.99,
      0.01,
      1e-8,
      1.0,
      refresh_every=10,
      hessian_diagonal_fn=T.hutchinson_diagonal_estimator(seed=0),
    ),
  ),
  "scale_by_shampoo": (
    lambda: T.scale_by_shampoo(),
    lambda: T.scale_by_shampoo(failure_threshold=0.1, packed_statistics=False, **SHAMPOO),
  ),
  "scale_by_soap": (lambda: T.scale_by_soap(), lambda: T.scale_by_soap(**SOAP)),
  "scale_by_psgd_kron": (
    lambda: T.scale_by_psgd_kron(),
    lambda: T.scale_by_psgd_kron(
      "whitening",
      update_probability=None,
      max_size=None,
      max_skew=1.0,
      geometry="Q0.5EQ1.5",
      **PSGD_COMMON,
    ),
  ),
  "scale_by_psgd_lra": (
    lambda: T.scale_by_psgd_lra(),
    lambda: T.scale_by_psgd_lra("whitening", update_probability=None, rank=10, **PSGD_COMMON),
  ),
  "scale_by_psgd_dense": (
    lambda: T.scale_by_psgd_dense(),
    lambda: T.scale_by_psgd_dense(
      "newton",
      update_probability=1.0,
      geometry="Q0.5EQ1.5",
      max_dimension=16384,
      **PSGD_COMMON,
    ),
  ),
  "scale_by_egn": (
    lambda: T.scale_by_egn(),
    lambda: T.scale_by_egn(
      1.0,
      solver="auto",
      l2_regularization=0.0,
      l2_mask=None,
      max_factor_size=1024,
      cg_tol=1e-6,
      cg_maxiter=50,
      name="egn",
    ),
  ),
  "scale_by_newton_cg": (
    lambda: T.scale_by_newton_cg(),
    lambda: T.scale_by_newton_cg(
      1.0,
      curvature="gauss_newton",
      max_cg_iters=50,
      cg_tol=1e-4,
      warm_start=0.95,
      backtracking=True,
    ),
  ),
  "scale_by_lazy_newton": (
    lambda: T.scale_by_lazy_newton(),
    lambda: T.scale_by_lazy_newton(**LAZY),
  ),
  "scale_by_mfac": (
    lambda: T.scale_by_mfac(),
    lambda: T.scale_by_mfac(num_grads=1024, damping=1e-5, refresh_every=None),
  ),
  "scale_by_armijo_backtracking": (
    lambda: optax.chain(optax.scale(-1.0), T.scale_by_armijo_backtracking()),
    lambda: optax.chain(
      optax.scale(-1.0),
      T.scale_by_armijo_backtracking(
        1.0,
        slope_fraction=0.1,
        decrease_factor=0.8,
        increase_factor=1.5,
        max_steps=15,
        objective=value_fn_objective,
      ),
    ),
  ),
  "levenberg_marquardt": (
    lambda: T.levenberg_marquardt(optax.chain(T.scale_by_egn(), optax.scale(-1.0))),
    lambda: T.levenberg_marquardt(
      optax.chain(T.scale_by_egn(), optax.scale(-1.0)),
      1.0,
      increase=1.5,
      decrease=0.5,
      low=0.25,
      high=0.75,
      min_damping=1e-12,
      max_damping=1e6,
      gain_ratio_clip=5.0,
      reject_below=0.0,
      l2_regularization=0.0,
      l2_mask=None,
    ),
  ),
  "sam_gradient": (
    lambda: optax.chain(T.sam_gradient(), optax.sgd(LR)),
    lambda: optax.chain(T.sam_gradient(perturbation="global", num_groups=1, **SAM), optax.sgd(LR)),
  ),
  "gam_gradient": (
    lambda: optax.chain(T.gam_gradient(), optax.sgd(LR)),
    lambda: optax.chain(T.gam_gradient(**GAM), optax.sgd(LR)),
  ),
  "ema_momentum": (
    lambda: optax.chain(T.ema_momentum(), optax.sgd(LR)),
    lambda: optax.chain(T.ema_momentum(0.9, nesterov=False, debias=False), optax.sgd(LR)),
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_defaults_are_the_documented_values(name):
  default, spelled_out = CASES[name]
  steps = 12  # past the first refresh of every cadence of 10, and one step using it
  a, b = _trajectory(default(), steps), _trajectory(spelled_out(), steps)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  moved = max(
    float(jnp.max(jnp.abs(x - p)))
    for x, p in zip(jax.tree.leaves(a), jax.tree.leaves(PARAMS), strict=True)
  )
  assert moved > 0  # the optimizer did something


def test_psgd_update_probability_defaults():
  default = T.psgd_update_probability()
  spelled_out = T.psgd_update_probability(
    max_probability=1.0, min_probability=0.03, decay=0.001, flat_steps=500
  )
  for count in (0, 499, 500, 501, 2000, 10**6):
    assert float(default(count)) == float(spelled_out(count))
