"""Kronecker-factor statistics and mode products on stacked blocks `(n, d_1, ..., d_k)`."""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def factor_statistics(blocks: jax.Array, axes: tuple[int, ...]) -> list[jax.Array]:
  """`G_(i) G_(i)^T` for every block axis `i` in `axes`: one `(n, d_i, d_i)` array each.

  `G_(i)` is the mode-`i` unfolding: the block contracted with itself over
  every other axis. Products at HIGHEST precision (TF32 ruins the statistics).
  """
  n = blocks.shape[0]
  out = []
  for axis in axes:
    unfolded = jnp.moveaxis(blocks, axis + 1, 1).reshape(n, blocks.shape[axis + 1], -1)
    out.append(jnp.einsum("nij,nkj->nik", unfolded, unfolded, precision=_HIGHEST))
  return out


def mode_product(
  blocks: jax.Array, matrices: list[jax.Array], axes: tuple[int, ...], transpose: bool = False
) -> jax.Array:
  """`blocks x_i M_i` over `i` in `axes`: block axis `i` multiplied by `M_i` (or `M_i^T`)."""
  letters = string.ascii_lowercase[: blocks.ndim - 1]  # N and Z are upper case: no clash
  out = blocks
  for i, matrix in zip(axes, matrices, strict=True):
    new = letters[:i] + "Z" + letters[i + 1 :]
    pair = f"N{letters[i]}Z" if transpose else f"NZ{letters[i]}"
    out = jnp.einsum(f"N{letters},{pair}->N{new}", out, matrix, precision=_HIGHEST)
  return out


def map_factors(fn, factors, key=None) -> list[list]:
  """`fn(key, stacked)` over every factor `(n, d, d)`: one call per key, calls in sequence.

  Factors with the same key (by default their size `d`) from every block
  shape and axis are concatenated into one stack, so one batched call (an
  `eigh`, a root) serves them all; the results are cut back per factor. The
  calls are ordered one after another: jaxlib's batched LAPACK kernels wait
  on the XLA:CPU thread pool from inside it, and two of them running at once
  deadlock a two-thread pool (measured: `eigh` refreshes of a CNN hung).
  An optimization barrier does not order them (it is gone before the thunk
  schedule is built); a data dependency does.
  """
  key = key or (lambda g, a: factors[g][a].shape[-1])
  jobs: dict = {}
  for g, group in enumerate(factors):
    for a in range(len(group)):
      jobs.setdefault(key(g, a), []).append((g, a))
  out: list[list] = [[None] * len(group) for group in factors]
  previous = None
  for k, members in jobs.items():
    stacked = jnp.concatenate([factors[g][a] for g, a in members])
    if previous is not None:
      stacked = stacked + _zero_depending_on(previous)
    previous = fn(k, stacked)
    offset = 0
    for g, a in members:
      n = factors[g][a].shape[0]
      out[g][a] = jax.tree.map(lambda r, o=offset, n=n: r[o : o + n], previous)
      offset += n
  return out


def _zero_depending_on(tree) -> jax.Array:
  """An exact 0.0 that XLA must compute from `tree` (float `x * 0` is never folded)."""
  leaf = next(x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))
  return 0.0 * jnp.nan_to_num(leaf.reshape(-1)[0])
