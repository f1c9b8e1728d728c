"""PSGD with one dense preconditioner on the flattened parameters, for small models."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks
from curvopt.transforms.psgd._driver import Fit, scale_by_psgd
from curvopt.transforms.psgd._kron import GEOMETRIES, Geometry, kron_family


def scale_by_psgd_dense(
  fit: Fit = "newton",
  lr_preconditioner: optax.ScalarOrSchedule = 0.1,
  update_probability: optax.ScalarOrSchedule = 1.0,
  init_scale: float | None = None,
  *,
  beta_l: float = 0.9,
  damping: float = 1e-9,
  geometry: Geometry = "Q0.5EQ1.5",
  max_dimension: int = 16384,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """PSGD with one dense `n x n` `Q` on all `n` parameters: outputs `P g`, `P = Q^T Q`.

  The Kronecker transform's fitting step with a single factor on the
  flattened parameter vector (see `scale_by_psgd_kron` for the update and
  the arguments). `O(n^2)` memory and `O(n^2)` per step (`O(n^3)` per fit for
  Q0.5EQ1.5's rotation): for models up to a few thousand parameters. With
  Newton-type fitting (the default here, psgd_torch's `DenseNewton`) on a
  quadratic, `P -> |H|^{-1}`, so `learning_rate = 1` is a (saddle-free)
  Newton step; this makes it a quasi-Newton method needing no line search.
  Models with more than `max_dimension` parameters are refused when the state
  is built, with the memory `Q` would take (16384: 1 GiB in float32).

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_psgd_dense()
    >>> loss = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * w**2)
    >>> w = jnp.ones(2)
    >>> u, state = tx.update(jax.grad(loss)(w), tx.init(w), w, value_fn=loss)
    >>> state.preconditioner.q[0][0].shape
    (2, 2)

  References:
    Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018;
    psgd_torch's `DenseNewton` (github.com/lixilinx/psgd_torch).
  """
  _checks.one_of("geometry", geometry, GEOMETRIES)
  max_dimension = _checks.positive_int("max_dimension", max_dimension)

  def family(tree, settings):
    n = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))
    if n > max_dimension:
      gib = n * n * 4 / 2**30
      raise ValueError(
        f"psgd_dense on {n} parameters would hold a dense {n} x {n} preconditioner "
        f"({gib:.1f} GiB in float32), above max_dimension={max_dimension}: use psgd_kron or "
        "psgd_lra, or raise max_dimension if that memory is meant."
      )
    return kron_family(tree, settings, geometry=geometry, flatten=True)

  return scale_by_psgd(
    family,
    fit=fit,
    lr_preconditioner=lr_preconditioner,
    update_probability=update_probability,
    init_scale=init_scale,
    beta_l=beta_l,
    damping=damping,
    seed=seed,
    name="psgd_dense",
  )
