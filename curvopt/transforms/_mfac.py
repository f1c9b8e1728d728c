"""M-FAC's preconditioner: the inverse empirical Fisher of a sliding window of gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree
from curvopt.estimators._fisher_inverse import factor, inverse_product

PyTree = Any


class ScaleByMFACState(NamedTuple):
  """State of `scale_by_mfac`.

  Attributes:
    count: gradients seen; the next one replaces row `count % m`.
    grads: the window, `(m, d)` flattened gradients (zero rows until filled).
    gram: `grads @ grads.T`, kept up to date one row and column per step.
  """

  count: jax.Array
  grads: jax.Array
  gram: jax.Array


def scale_by_mfac(num_grads: int = 1024, damping: float = 1e-5) -> optax.GradientTransformation:
  """Outputs `F^-1 g` with `F = damping I + (1/m) sum_i g_i g_i^T` over the last `m` gradients.

  Each step the incoming gradient replaces the oldest in an `(m, d)` window
  and one row and column of the Gram matrix `G G^T` (`O(d m)`); the `m x m`
  matrix `m damping I + G G^T` is factored (`O(m^3)`) and the product is
  `(g - G^T A^-1 G g) / damping` (`O(d m + m^2)`, Woodbury). Before the
  window fills, its zero rows add nothing to `F`. Statistics are float32 (or
  float64 for float64 parameters); updates come back in the gradients' dtypes.

  Args:
    num_grads: `m`, the window length.
    damping: `lambda > 0`; the direction is `g / lambda` off the window's span.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> tx = curvopt.transforms.scale_by_mfac(num_grads=2, damping=1.0)
    >>> g = jnp.array([2.0, 0.0])
    >>> u, state = tx.update(g, tx.init(g))  # F = I + g g^T / 2 = diag(3, 1)
    >>> u.round(4)
    Array([0.6667, 0.    ], dtype=float32)

  References:
    Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations
    of Second-Order Information", NeurIPS 2021.
  """
  _checks.positive_int("num_grads", num_grads)
  _checks.positive("damping", damping)

  def init(params: PyTree) -> ScaleByMFACState:
    dtype = _tree.working_dtype(_tree.structure_of(params))
    d = _tree.size_of(_tree.structure_of(params))
    return ScaleByMFACState(
      jnp.zeros((), jnp.int32),
      jnp.zeros((num_grads, d), dtype),
      jnp.zeros((num_grads, num_grads), dtype),
    )

  def update(updates, state, params=None):
    del params
    g, unravel = ravel_pytree(_tree.cast(updates, state.grads.dtype))
    slot = state.count % num_grads
    grads = state.grads.at[slot].set(g)
    row = grads @ g
    gram = state.gram.at[slot].set(row).at[:, slot].set(row)
    direction = inverse_product(grads, factor(gram, damping), damping, g)
    new_state = ScaleByMFACState(optax.safe_increment(state.count), grads, gram)
    return _tree.cast_like(unravel(direction), _tree.structure_of(updates)), new_state

  return optax.GradientTransformation(init, update)
