"""Inspecting traced programs (layer 0)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
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


# Loops and conditionals count as themselves whatever their bodies hold.
_CONTROL_FLOW = frozenset({"cond", "while", "scan"})


def uses_only(jaxpr: Any, names: frozenset[str]) -> bool:
  """Whether `jaxpr` applies only primitives in `names`, looking inside calls (not loops)."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in names:
      continue
    subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
    if not subs or name in _CONTROL_FLOW or not all(uses_only(sub, names) for sub in subs):
      return False
  return True


def _equation_flops(eqn: Any) -> float:
  """Multiply-adds count twice; every other primitive once per output element."""
  name = eqn.primitive.name
  if name == "dot_general":
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[i] for i in lhs_contracting)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
    per_output = math.prod(rhs[i] for i in spec[1:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
  return float(sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars))


def _jaxpr_flops(jaxpr: Any) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
    if subs:
      # Loops run their body more than once; `scan` says how often.
      repeats = eqn.params.get("length", 1)
      total += repeats * sum(_jaxpr_flops(sub) for sub in subs)
    else:
      total += _equation_flops(eqn)
  return total


def forward_flops(fn: Callable, *args: Any) -> float:
  """An estimate of the floating-point operations of `fn(*args)`, from its jaxpr.

  Matrix products and convolutions count `2 x` their multiply-adds (a
  convolution's weights are reused at every output position, which is why a
  small CNN costs far more than its parameter count suggests); elementwise
  work counts one per output element. Traced abstractly: nothing runs.
  """
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
