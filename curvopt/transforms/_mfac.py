"""M-FAC's preconditioner: the inverse empirical Fisher of a sliding window of gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree
from curvopt.estimators._fisher_inverse import rank_two_update_inverse, shifted_inverse

PyTree = Any

# A kept inverse whose solve leaves a larger relative residual is recomputed (one
# refinement step then leaves about its square).
RESIDUAL_TOLERANCE = 1e-3


class ScaleByMFACState(NamedTuple):
  """State of `scale_by_mfac`.

  Attributes:
    count: gradients seen; the next one replaces row `count % m`.
    grads: the window, `(m, d)` flattened gradients (zero rows until filled).
    kernel: the smaller of the window's kernels, `K = G G^T` (`m x m`: one
      fresh row and column a step) or `G^T G` (`d x d`: a rank-two update a
      step, recomputed from the window at each refresh).
    inverse: `(m damping I + K)^-1`, kept by a rank-two update per step and
      recomputed every `refresh_every` steps.
    damping: the damping `inverse` holds (a changed one, e.g. under
      `curvopt.inject_hyperparams`, triggers a recomputation).
  """

  count: jax.Array
  grads: jax.Array
  kernel: jax.Array
  inverse: jax.Array
  damping: jax.Array


def scale_by_mfac(
  num_grads: int = 1024, damping: float = 1e-5, refresh_every: int | None = None
) -> optax.GradientTransformation:
  """Outputs `F^-1 g` with `F = damping I + (1/m) sum_i g_i g_i^T` over the last `m` gradients.

  Each step the incoming gradient replaces the oldest in an `(m, d)` window
  `G`. M-FAC's dynamic algorithm: for `d >= m`, the inverse of the `m x m`
  matrix `A = m damping I + G G^T` follows the replaced row and column by a
  rank-two Woodbury step, and the product is `(g - G^T A^-1 G g) / damping`:
  `O(d m + m^2)` a step. For `d < m` (a small model, a long window) the
  same rank-two step keeps `(m damping I + G^T G)^-1` (`d x d`, `O(d^2)` a
  step) and the product is `m` times it applied to `g`: cheaper, and without
  the float32 cancellation of the `m x m` form when the window spans every
  direction. Every `refresh_every` steps, when `damping` changed, and when
  the kept inverse's solve leaves a residual above 1e-3 of its right-hand
  side (float32 drift on an ill-conditioned window), the inverse is
  recomputed by Cholesky (`O(k^3)` for `k = min(d, m)`, plus `O(d^2 m)` to
  rebuild the `d x d` kernel), so rounding cannot pile up; a step then
  costs what the static algorithm does. Before the window fills, its zero rows add nothing to `F`.
  Statistics are float32 (or float64 for float64 parameters); updates come
  back in the gradients' dtypes.

  Args:
    num_grads: `m`, the window length.
    damping: `lambda > 0`; the direction is `g / lambda` off the window's span.
    refresh_every: steps between exact recomputations of the inverse (None:
      `m`; 1 recomputes every step, the static algorithm's cost).

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
  refresh_every = num_grads if refresh_every is None else refresh_every
  _checks.positive_int("refresh_every", refresh_every)
  m = num_grads

  def init(params: PyTree) -> ScaleByMFACState:
    dtype = _tree.working_dtype(_tree.structure_of(params))
    d = _tree.size_of(_tree.structure_of(params))
    k = min(d, m)
    damping_ = jnp.asarray(damping, dtype)
    return ScaleByMFACState(
      jnp.zeros((), jnp.int32),
      jnp.zeros((m, d), dtype),
      jnp.zeros((k, k), dtype),
      jnp.eye(k, dtype=dtype) / (m * damping_),
      damping_,
    )

  def update(updates, state, params=None):
    del params
    g, unravel = ravel_pytree(_tree.cast(updates, state.grads.dtype))
    dtype = g.dtype
    damping_ = jnp.asarray(damping, dtype)
    shift = m * damping_
    slot = state.count % m
    old = state.grads[slot]
    grads = state.grads.at[slot].set(g)
    window_space = g.shape[0] >= m
    if window_space:  # the m x m form: A = shift I + G G^T, solve A c = G g
      rhs = grads @ g  # G' g: row and column `slot` of the new G G^T
      delta = rhs - state.kernel[slot]  # the change of that row and column
      kernel = state.kernel.at[slot].set(rhs).at[:, slot].set(rhs)
      e = jax.nn.one_hot(slot, m, dtype=dtype)
      basis = jnp.stack([e, delta - 0.5 * delta[slot] * e], axis=1)  # A' = A + e w^T + w e^T
      coupling = jnp.array([[0.0, 1.0], [1.0, 0.0]], dtype)
      exact_kernel = lambda: kernel  # its rows are fresh dot products: exact already
    else:  # the d x d form: A = shift I + G^T G = m F, solve A c = g
      rhs = g
      basis = jnp.stack([g, old], axis=1)  # G'^T G' = G^T G + g g^T - old old^T
      coupling = jnp.diag(jnp.array([1.0, -1.0], dtype))
      kernel = state.kernel + basis @ coupling @ basis.T
      exact_kernel = lambda: grads.T @ grads  # drops the downdates' rounding

    def solve_refined(inverse, kernel, c):
      # One step of iterative refinement against A itself: squares the solve's error.
      return c + inverse @ (rhs - shift * c - kernel @ c)

    updated = rank_two_update_inverse(state.inverse, basis, coupling)
    first = updated @ rhs
    residual = rhs - shift * first - kernel @ first
    accurate = jnp.all(jnp.isfinite(residual)) & (
      jnp.linalg.norm(residual) <= RESIDUAL_TOLERANCE * jnp.linalg.norm(rhs)
    )
    due = (state.count % refresh_every == 0) | (damping_ != state.damping) | ~accurate

    def recompute():
      exact = exact_kernel()
      inverse = shifted_inverse(exact, shift)
      return exact, inverse, solve_refined(inverse, exact, inverse @ rhs)

    def keep():
      return kernel, updated, first + updated @ residual

    kernel, inverse, coefficients = jax.lax.cond(due, recompute, keep)
    direction = (g - grads.T @ coefficients) / damping_ if window_space else m * coefficients
    new_state = ScaleByMFACState(
      optax.safe_increment(state.count), grads, kernel, inverse, damping_
    )
    return _tree.cast_like(unravel(direction), _tree.structure_of(updates)), new_state

  return optax.GradientTransformation(init, update)
