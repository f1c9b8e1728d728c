"""Inspecting traced programs (layer 0)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np


def contains_primitive(jaxpr: Any, name: str) -> bool:
  """Whether `jaxpr` (or any jaxpr nested in its equations) applies primitive `name`."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      if contains_primitive(sub, name):
        return True
  return False


# Primitives that only call one jaxpr: evaluated inline so that the
# convolutions inside them are rewritten too.
_CALLS = {
  "pjit": "jaxpr",
  "jit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
  "remat": "jaxpr",
  "checkpoint": "jaxpr",
}


def uses_only(jaxpr: Any, names: frozenset[str]) -> bool:
  """Whether `jaxpr` applies only primitives in `names`, looking inside plain calls.

  A loop or a conditional counts as itself (not in `names` unless listed),
  whatever its body holds.
  """
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in names:
      continue
    called = eqn.params.get(_CALLS.get(name, ""))
    if called is None or not uses_only(getattr(called, "jaxpr", called), names):
      return False
  return True


def with_channels_last_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` recomputed with every convolution in channels-last layout.

  XLA:CPU runs a convolution on its fast path only when its operands are laid
  out batch-spatial-feature and spatial-in-out; at the top level of a program
  XLA transposes other layouts there itself, but not inside a conditional or a
  loop (jax-ml/jax#12868), where the backward pass's convolutions (kernel as
  spatial-out-in, or batch and feature swapped) fall to a loop ~20x slower.
  This evaluates `fn`'s jaxpr with each convolution wrapped in explicit
  transposes to and from that layout; results are identical. Custom
  derivative rules inside `fn` are dropped (evaluate, do not differentiate).
  """

  def rewritten(*args: Any) -> Any:
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)

  return rewritten


def _evaluate(jaxpr: Any, consts: Any, *args: Any) -> list[Any]:
  env = {}

  def read(var):
    return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    outs = _apply(eqn, [read(v) for v in eqn.invars])
    env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs], strict=True))
  return [read(v) for v in jaxpr.outvars]


def _apply(eqn: Any, args: list[Any]) -> Any:
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    return _channels_last_convolution(*args, **eqn.params)
  if name in _CALLS and _CALLS[name] in eqn.params:
    called = eqn.params[_CALLS[name]]
    consts = getattr(called, "consts", [])
    outs = _evaluate(getattr(called, "jaxpr", called), consts, *args)
    return outs if eqn.primitive.multiple_results else outs[0]
  bound = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # older jax: a pair
  return eqn.primitive.bind(*subfuns, *args, **params)


def _channels_last_convolution(lhs, rhs, *, dimension_numbers, **params):
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = len(lhs_spec) - 2
  spatial = tuple(range(1, n + 1))
  lhs = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  canonical = jax.lax.ConvDimensionNumbers(
    lhs_spec=(0, n + 1, *spatial), rhs_spec=(n + 1, n, *range(n)), out_spec=(0, n + 1, *spatial)
  )
  out = jax.lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=canonical, **params)
  # `out` is (batch, *spatial, feature); put each axis where `out_spec` wants it.
  placed = (out_spec[0], *out_spec[2:], out_spec[1])
  return jnp.transpose(out, np.argsort(placed))


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
