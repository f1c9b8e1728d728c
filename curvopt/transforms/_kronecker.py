"""Kronecker-factor statistics and mode products on stacked blocks `(n, d_1, ..., d_k)`."""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def factor_statistics(blocks: jax.Array) -> list[jax.Array]:
  """`G_(i) G_(i)^T` for every block axis `i`: one `(n, d_i, d_i)` array per axis.

  `G_(i)` is the mode-`i` unfolding: the block contracted with itself over
  every other axis. Products at HIGHEST precision (TF32 ruins the statistics).
  """
  n = blocks.shape[0]
  out = []
  for axis in range(1, blocks.ndim):
    unfolded = jnp.moveaxis(blocks, axis, 1).reshape(n, blocks.shape[axis], -1)
    out.append(jnp.einsum("nij,nkj->nik", unfolded, unfolded, precision=_HIGHEST))
  return out


def mode_product(blocks: jax.Array, matrices: list[jax.Array], transpose: bool = False):
  """`blocks x_1 M_1 x_2 ... x_k M_k`: axis `i` of each block multiplied by `M_i` (`M_i^T`)."""
  letters = string.ascii_lowercase[: blocks.ndim - 1]  # N and Z are upper case: no clash
  out = blocks
  for i, matrix in enumerate(matrices):
    new = letters[:i] + "Z" + letters[i + 1 :]
    pair = f"N{letters[i]}Z" if transpose else f"NZ{letters[i]}"
    out = jnp.einsum(f"N{letters},{pair}->N{new}", out, matrix, precision=_HIGHEST)
  return out
