"""Orthogonalized updates: each matrix replaced by its polar factor, at a fixed RMS."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _tree

PyTree = Any

# Jordan et al.'s quintic Newton-Schulz coefficients: five steps push every singular
# value into about [0.7, 1.2], fast in low precision, not convergent to exactly 1.
MUON_NS_COEFFS = (3.4445, -4.775, 2.0315)


def matrix_leaves(params: PyTree) -> PyTree:
  """True for every leaf with two or more axes: `psgd_muon`'s default `matrices`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.transforms.matrix_leaves({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
    {'b': False, 'w': True}

  References:
    Jordan et al., "Muon: an optimizer for hidden layers in neural networks",
    2024 (Muon on matrices, Adam on the rest).
  """
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def orthogonalize(
  ns_steps: int = 5,
  update_rms: float = 0.2,
  ns_coeffs: tuple[float, float, float] = MUON_NS_COEFFS,
  eps: float = 1e-8,
) -> optax.GradientTransformation:
  r"""Replaces each matrix `U` by `update_rms sqrt(max(m, n)) polar(U)` (Muon's step).

  `polar(U) = U (U^T U)^{-1/2}` (`= A B^T` for the SVD `U = A S B^T`) is
  approximated by `ns_steps` Newton-Schulz iterations on `U / ||U||_F`, in
  float32 (float64 for float64 leaves), on the wide orientation so that the
  Gram matrix is the smaller one (optax runs the same iteration inside its
  Muon but does not export it). A leaf of shape
  `(..., out)` is the matrix `(prod(...), out)`: a dense kernel `(in, out)`,
  a convolution kernel `(h, w, in, out)`. The factor `sqrt(max(m, n))` gives
  every entry an RMS of `update_rms` for an exact polar factor (Liu et al.'s
  "consistent RMS", 0.2 matching AdamW's typical update), so one learning rate
  serves matrices of every shape and an Adam group beside them.

  Leaves with fewer than two axes are refused: route them to another transform
  (`curvopt.multi_transform`), as `curvopt.psgd_muon` does.

  Args:
    ns_steps: Newton-Schulz iterations.
    update_rms: the RMS of an entry of the output (for an exact polar factor).
    ns_coeffs: `(a, b, c)` of the iteration `X <- a X + b (X X^T) X + c (X X^T)^2 X`;
      `(1.5, -0.5, 0.0)` is the classical cubic iteration, which converges to
      the polar factor for every singular value in `(0, sqrt(3))`.
    eps: added to the Frobenius norm before normalizing.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, curvopt
    >>> tx = curvopt.transforms.orthogonalize(ns_steps=40, update_rms=1.0,
    ...                                        ns_coeffs=(1.5, -0.5, 0.0))
    >>> u = jnp.array([[3.0, 0.0], [0.0, 0.5]])
    >>> out, _ = tx.update({"w": u}, tx.init({"w": u}))
    >>> np.round(out["w"] / 2**0.5, 4)  # the polar factor of u: the identity
    Array([[1., 0.],
           [0., 1.]], dtype=float32)

  References:
    Jordan, Jin, Boza, You, Cesista, Newhouse, Bernstein, "Muon: an optimizer
    for hidden layers in neural networks", 2024; Liu et al., "Muon is scalable
    for LLM training", 2025; Higham, "Functions of Matrices", 2008, ch. 8.
  """
  _checks.positive_int("ns_steps", ns_steps)
  _checks.positive("update_rms", update_rms)
  _checks.non_negative_float("eps", eps)
  if len(ns_coeffs) != 3:
    raise ValueError(f"ns_coeffs must be three numbers (a, b, c), got {ns_coeffs!r}.")

  def one(u: jax.Array) -> jax.Array:
    if u.ndim < 2:
      raise ValueError(
        f"orthogonalize: a leaf of shape {u.shape} has fewer than two axes; route vectors "
        "and scalars to another transform (curvopt.multi_transform)."
      )
    fan_in, fan_out = math.prod(u.shape[:-1]), u.shape[-1]
    x = u.reshape(fan_in, fan_out).astype(_tree.working_dtype(u))
    polar = newton_schulz(x.T if fan_in > fan_out else x, ns_steps, ns_coeffs, eps)
    polar = polar.T if fan_in > fan_out else polar
    scale = update_rms * math.sqrt(max(fan_in, fan_out))
    return (scale * polar).reshape(u.shape).astype(u.dtype)

  def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None):
    del params
    return jax.tree.map(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def newton_schulz(
  x: jax.Array, steps: int, coeffs: tuple[float, float, float], eps: float
) -> jax.Array:
  """`steps` iterations `X <- a X + (b A + c A^2) X`, `A = X X^T`, from `x / ||x||_F` (x wide)."""
  a, b, c = coeffs
  x = x / (jnp.linalg.norm(x) + eps)

  def body(_, x):
    gram = x @ x.T
    return a * x + (b * gram + c * gram @ gram) @ x

  return jax.lax.fori_loop(0, steps, body, x)
