"""Pytree linear algebra that keeps each leaf's shape (and so its sharding).

Krylov methods keep a basis of `k` vectors. Here a basis is a pytree shaped
like the parameters with one extra leading axis of length `k` on every leaf,
so the basis of an FSDP-sharded model is sharded the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


def structure_of(tree: Any) -> Any:
  """The `jax.ShapeDtypeStruct` of every leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def size_of(structure: Any) -> int:
  """Total number of scalars in a pytree (of arrays or structs)."""
  return sum(_prod(s.shape) for s in jax.tree.leaves(structure))


def _prod(shape: tuple[int, ...]) -> int:
  out = 1
  for n in shape:
    out *= int(n)
  return out


def is_key(x: Any) -> bool:
  """Whether `x` (an array or a `ShapeDtypeStruct`) is a typed PRNG key."""
  return jnp.issubdtype(getattr(x, "dtype", jnp.float32), jax.dtypes.prng_key)


def working_dtype(structure: Any) -> jnp.dtype:
  """float64 if any leaf is float64, else float32: estimators never work in bf16."""
  dtypes = [jnp.dtype(s.dtype) for s in jax.tree.leaves(structure)]
  if any(d == jnp.float64 for d in dtypes):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def zeros(structure: Any, dtype: Any = None) -> Any:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, dtype or s.dtype), structure)


def statistics_zeros(tree: Any) -> Any:
  """Zeros shaped like `tree` for optimizer statistics: float32 at least (bfloat16 -> float32)."""
  return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), tree)


def cast(tree: Any, dtype: Any) -> Any:
  return optax.tree.cast(tree, dtype)


def cast_like(tree: Any, structure: Any) -> Any:
  return jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), tree, structure)


# A reduction over a tree reads it as one vector, which XLA materializes
# (measured on XLA:CPU: a copy of 1.4M scalars, about 1% of a transformer
# step). Above this many scalars (64 MiB in float32) that copy, and over several
# devices the gather of sharded leaves, would cost more than the per-leaf
# reductions' compile time: leaf by leaf instead.
ONE_VECTOR_LIMIT = 1 << 24


def dot(a: Any, b: Any) -> jax.Array:
  """Real inner product over all leaves, at `Precision.HIGHEST`.

  `optax.tree.vdot` has no precision argument, and Krylov methods lose
  orthogonality with the reduced-precision products accelerators default to.
  A tree of several leaves on one device is read as one vector, one `dot`:
  summed leaf by leaf, the chain of scalar additions is cheap enough that
  XLA copies it into every per-leaf kernel that uses the result (a global
  norm scaling each leaf, a predicate selecting each leaf): on XLA:CPU, 43%
  more instructions in Newton-CG's compiled step on a transformer
  (benchmarks/results/compile_time.md).
  """
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(leaves_a) != len(leaves_b):
    raise ValueError(f"dot of trees with {len(leaves_a)} and {len(leaves_b)} leaves.")
  if one_vector(leaves_a):
    return jnp.vdot(_concatenated(leaves_a), _concatenated(leaves_b), precision=_HIGHEST)
  parts = [jnp.vdot(x, y, precision=_HIGHEST) for x, y in zip(leaves_a, leaves_b, strict=True)]
  return sum(parts[1:], parts[0])


def max_abs(a: Any) -> jax.Array:
  """The largest absolute entry over all leaves, in one reduction where `dot` reads one vector."""
  leaves = jax.tree.leaves(a)
  if one_vector(leaves):
    return jnp.max(jnp.abs(_concatenated(leaves)))
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))


def one_vector(leaves: list) -> bool:
  """Whether a reduction over `leaves` should read them as one concatenated vector."""
  size = sum(jnp.size(x) for x in leaves)
  return len(leaves) > 1 and size <= ONE_VECTOR_LIMIT and jax.device_count() == 1


def _concatenated(leaves: list) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x) for x in leaves])


def norm(a: Any) -> jax.Array:
  return jnp.sqrt(dot(a, a))


# --- Stacked vectors: a leading axis of length k on every leaf. -------------


def stacked_zeros(k: int, structure: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda s: jnp.zeros((k, *s.shape), dtype), structure)


def stacked_dot(basis: Any, v: Any) -> jax.Array:
  """The k inner products <basis[i], v>."""
  parts = [
    jnp.tensordot(b.reshape(b.shape[0], -1), x.reshape(-1), axes=1, precision=_HIGHEST)
    for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(v), strict=True)
  ]
  return sum(parts[1:], parts[0])


def stacked_combine(basis: Any, coefficients: jax.Array) -> Any:
  """sum_i coefficients[i] * basis[i]; `coefficients` may be (k,) or (k, m)."""
  return jax.tree.map(
    lambda b: jnp.tensordot(coefficients, b, axes=[[0], [0]], precision=_HIGHEST), basis
  )


def stacked_set(basis: Any, i: Any, v: Any) -> Any:
  return jax.tree.map(
    lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), i, 0), basis, v
  )


def stacked_get(basis: Any, i: Any) -> Any:
  return jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, i, 0, keepdims=False), basis)


def stacked_head(basis: Any, rows: int) -> Any:
  """The first `rows` vectors of a stacked pytree (a static slice)."""
  return jax.tree.map(lambda b: b[:rows], basis)


def project_out(basis: Any, v: Any) -> Any:
  """One classical Gram-Schmidt pass: `v - V^T (V v)` for the rows `V` of `basis`."""
  return optax.tree.add_scale(v, -1.0, stacked_combine(basis, stacked_dot(basis, v)))


def orthogonalize(basis: Any, v: Any) -> Any:
  """Removes from `v` its components along the (orthonormal or zero) rows of `basis`.

  Classical Gram-Schmidt with the Daniel-Gragg-Kaufman-Stewart test: a second
  pass runs only when the first removed more than 30% of the norm, the case
  where one pass loses orthogonality in floating point ("twice is enough",
  Giraud et al. 2005). Each pass reads the whole basis, so skipping the second
  halves the cost of reorthogonalization in Krylov loops.
  """
  before = norm(v)
  once = project_out(basis, v)
  return jax.lax.cond(
    norm(once) < _DGKS_RATIO * before, lambda: project_out(basis, once), lambda: once
  )


_DGKS_RATIO = 0.7071067811865476


def own_buffers(tree: Any) -> Any:
  """`tree` with every concrete array leaf in a buffer of its own (repeats copied).

  An eagerly built state may hold one array in several leaves (one zero count
  for two counters, one zeros tensor for two moments); `jax.jit(...,
  donate_argnums=...)` then refuses to donate "the same buffer twice". Traced
  leaves and leaves already unique are returned as they are.
  """
  seen: set[int] = set()

  def own(x: Any) -> Any:
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
      return x
    try:
      pointers = [shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards]
    except Exception:  # a deleted or non-addressable array: nothing to deduplicate
      return x
    if seen.isdisjoint(pointers):
      seen.update(pointers)
      return x
    # jnp.copy keeps the sharding and whether the array is committed to its device (a
    # device_put would commit it, and the first jitted step would then recompile).
    return jnp.copy(x)

  return jax.tree.map(own, tree)
