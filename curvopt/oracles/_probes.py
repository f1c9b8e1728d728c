"""Random probe vectors shaped like the parameters."""

from __future__ import annotations

from typing import Any, Literal

import jax

from curvopt import _checks

PyTree = Any
Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS = ("rademacher", "gaussian")


def random_vector(
  key: jax.Array, structure: PyTree, distribution: Distribution = "rademacher", dtype: Any = None
) -> PyTree:
  """A probe with independent entries of mean 0 and variance 1, shaped like `structure`.

  Each leaf draws from its own key, split from `key` by leaf position, so the
  probe depends only on the key and the structure: it is the same on every
  replica and under every sharding (with JAX's default partitionable
  threefry).

  Args:
    key: a PRNG key.
    structure: a pytree of arrays or `jax.ShapeDtypeStruct`.
    distribution: "rademacher" (entries +-1, the lowest-variance choice for
      Hutchinson's estimators) or "gaussian".
    dtype: the dtype of every leaf; defaults to each leaf's own dtype.

  Example:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> z = curvopt.random_vector(jax.random.key(0), {"w": jnp.zeros(3)})
    >>> sorted(set(abs(z["w"]).tolist()))
    [1.0]
  """
  _checks.one_of("distribution", distribution, DISTRIBUTIONS)
  leaves, treedef = jax.tree.flatten(structure)
  keys = jax.random.split(key, len(leaves))
  draw = jax.random.rademacher if distribution == "rademacher" else jax.random.normal
  return treedef.unflatten(
    [draw(k, leaf.shape, dtype or leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]
  )
