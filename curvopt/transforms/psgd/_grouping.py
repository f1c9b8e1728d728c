"""Running one function over many arrays as one program per distinct shape (`vmap`).

XLA's compile time grows with the kernels of a program; a Python loop over a
transformer's leaves or factors compiles one copy per leaf. Grouping equal
shapes and `vmap`ping over each group compiles one copy per shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def map_grouped(fn_for, groups: list[list[int]], *columns: list) -> list:
  """`fn_for(i)` on entry `i` of every column, `vmap`ped over the entries of a group.

  Entries of equal shape and layout (a transformer's layers; factors of one
  size across leaves) share one traced program instead of one each: the
  program, and XLA's compile time, grow with the number of distinct shapes
  rather than of leaves or factors.
  """
  out: list = [None] * len(columns[0])
  for members in groups:
    fn = fn_for(members[0])
    if len(members) == 1:
      out[members[0]] = fn(*(column[members[0]] for column in columns))
      continue
    stacked = [
      jax.tree.map(lambda *xs: jnp.stack(xs), *(column[i] for i in members)) for column in columns
    ]
    batched = jax.vmap(fn)(*stacked)
    for k, i in enumerate(members):
      out[i] = jax.tree.map(lambda x, k=k: x[k], batched)
  return out


def group_indices(signatures: list) -> list[list[int]]:
  """Indices of equal signatures, in order of first appearance."""
  groups: dict = {}
  for i, signature in enumerate(signatures):
    groups.setdefault(signature, []).append(i)
  return list(groups.values())
