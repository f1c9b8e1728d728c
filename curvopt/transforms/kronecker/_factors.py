"""Kronecker-factor statistics and mode products on stacked blocks `(n, d_1, ..., d_k)`."""

from __future__ import annotations

import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt import _xla_cpu

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


def pack_symmetric(stacked: jax.Array) -> jax.Array:
  """The upper triangles of symmetric `(..., d, d)` factors, row by row: `(..., d (d + 1) / 2)`.

  Factor statistics are symmetric, so half of their entries carry the whole
  factor: stored this way, float32 statistics take the bytes of bfloat16 ones
  and keep their precision (LAPACK's packed storage, by rows of the upper
  triangle). A product's two triangles can differ in the last bit; the upper
  one is kept, so the unpacked factor is exactly symmetric.
  """
  rows, cols = np.triu_indices(stacked.shape[-1])
  return stacked[..., rows, cols]


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape `pack_symmetric` gives a `(n, d, d)` stack; any other shape (optax's
  leafless placeholder, one empty leaf) is kept as it is."""
  if len(shape) != 3:
    return shape
  return (*shape[:-2], shape[-1] * (shape[-1] + 1) // 2)


def unpack_symmetric(packed: jax.Array) -> jax.Array:
  """The symmetric `(..., d, d)` factors whose upper triangles `pack_symmetric` kept.

  One gather (entry `(i, j)` reads the packed position of `(min(i, j), max(i, j))`),
  no scatter: gathers are the cheaper of the two on accelerators.
  """
  size = packed.shape[-1]
  d = (math.isqrt(8 * size + 1) - 1) // 2
  if d * (d + 1) // 2 != size:
    raise ValueError(f"{size} entries are not the upper triangle of a square matrix.")
  position = np.zeros((d, d), np.int32)
  position[np.triu_indices(d)] = np.arange(size)
  position = np.maximum(np.triu(position), np.triu(position, 1).T)
  return jnp.take(packed, jnp.asarray(position), axis=-1)


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


def _shard_count(sharding: Any) -> int:
  """How many pieces `sharding` cuts a stack's leading axis into."""
  spec = sharding.spec[0] if len(sharding.spec) else None
  names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(sharding.mesh.shape[name] for name in names)


def _distributed(fn, sharding):
  """`fn` on a stack padded with identities to a multiple of the shards and sharded over them."""

  def run(key, stacked):
    n, d = stacked.shape[0], stacked.shape[-1]
    pad = -n % _shard_count(sharding)
    identities = jnp.broadcast_to(jnp.eye(d, dtype=stacked.dtype), (pad, *stacked.shape[1:]))
    padded = jax.lax.with_sharding_constraint(jnp.concatenate([stacked, identities]), sharding)
    return jax.tree.map(lambda r: r[:n], fn(key, padded))

  return run


def _one_at_a_time(fn):
  """`fn` over a stack one factor at a time (`lax.map`), never a batched LAPACK call.

  With several CPU devices their programs share one thread pool, and batched
  `eigh` calls running on two devices at once deadlock it (measured: eight
  simulated devices hung on a stack of two factors each), whatever the order
  within one program.
  """

  def run(key, stacked):
    return jax.lax.map(lambda m: jax.tree.map(lambda r: r[0], fn(key, m[None])), stacked)

  return run


def map_factors(fn, factors, key=None, sharding=None) -> list[list]:
  """`fn(key, stacked)` over every factor `(n, d, d)`: one call per key, calls in sequence.

  Factors with the same key (by default their size `d`) from every block
  shape and axis are concatenated into one stack, so one batched call (an
  `eigh`, a root) serves them all; the results are cut back per factor. The
  calls are ordered one after another on XLA:CPU (`curvopt._xla_cpu`: two
  batched LAPACK calls at once deadlock its thread pool). An optimization
  barrier does not order them (it is gone before the thunk schedule is
  built); a data dependency does.

  With `sharding` (a `NamedSharding` over the stack's leading axis), each
  stack is padded with identity factors to a multiple of the shards and
  constrained to it, so every device computes its share of the roots.
  """
  if _xla_cpu.lapack_one_at_a_time():
    fn = _one_at_a_time(fn)
  if sharding is not None:
    fn = _distributed(fn, sharding)
  key = key or (lambda g, a: factors[g][a].shape[-1])
  jobs: dict = {}
  for g, group in enumerate(factors):
    for a in range(len(group)):
      jobs.setdefault(key(g, a), []).append((g, a))
  out: list[list] = [[None] * len(group) for group in factors]
  previous = None
  for k, members in jobs.items():
    stacked = jnp.concatenate([factors[g][a] for g, a in members])
    if previous is not None and _xla_cpu.order_lapack_calls():
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
