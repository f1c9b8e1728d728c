"""Inspecting traced programs (layer 0)."""

from __future__ import annotations

from typing import Any

import jax.extend.core


def contains_primitive(jaxpr: Any, name: str) -> bool:
  """Whether `jaxpr` (or any jaxpr nested in its equations) applies primitive `name`."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      if contains_primitive(sub, name):
        return True
  return False
