"""Every measure curvopt takes for XLA's CPU backend, in one place, behind one switch.

None of them changes a result; each only avoids a slow path or a hang of
XLA:CPU or jaxlib's CPU kernels. Set `CURVOPT_XLA_CPU_WORKAROUNDS=0` (read
whenever a program is traced) to turn all of them off, for example to check
that results are identical without them. On other backends they never apply.

1. Convolutions inside `cond`/`while`/`scan` lose their fast path unless laid
   out channels-last (jax-ml/jax#12868; measured with jax 0.4.30-0.10.2 on
   x86_64: a small CNN's Hessian product 20x slower in a loop). Conditional
   refreshes and estimator loops whose program holds a convolution are
   rewritten channels-last (`for_control_flow`, `with_channels_last_convolutions`).
2. jaxlib's batched LAPACK kernels (`eigh`, Cholesky) wait on the XLA:CPU
   thread pool from inside it: two running at once deadlock a two-thread pool
   (measured: Shampoo's `eigh` refreshes of a CNN hung), and simulated CPU
   devices share one pool. Root and eigenbasis refreshes are ordered by a
   data dependency (`order_lapack_calls`), and over several CPU devices run one
   factor at a time (`lapack_one_at_a_time`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from curvopt import _jaxpr

SWITCH = "CURVOPT_XLA_CPU_WORKAROUNDS"


def active() -> bool:
  """Whether the workarounds apply: the default backend is CPU and the switch is not "0"."""
  return jax.default_backend() == "cpu" and os.environ.get(SWITCH) != "0"


def contains_convolution(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether `fn(*args)` runs a convolution, nested calls and loops included (traced only)."""
  return _jaxpr.contains_primitive(jax.make_jaxpr(fn)(*args).jaxpr, "conv_general_dilated")


def for_control_flow(fn: Callable[..., Any], *example_args: Any) -> Callable[..., Any]:
  """`fn` to run inside a conditional or a loop body: channels-last where that helps.

  `example_args` are what `fn` will be called with (shapes and dtypes matter).
  """
  if active() and contains_convolution(fn, *example_args):
    return with_channels_last_convolutions(fn)
  return fn


def order_lapack_calls() -> bool:
  """Whether batched LAPACK calls of one program must be ordered one after another."""
  return active()


def lapack_one_at_a_time() -> bool:
  """Whether each factor gets its own LAPACK call (several CPU devices share one pool)."""
  return active() and jax.device_count() > 1


# Primitives that only call one jaxpr, by their names in jax 0.6-0.11 (a test
# fails if a convolution inside `jax.jit` or `jax.checkpoint` stops being
# rewritten): evaluated inline so that the convolutions inside are rewritten
# too. Each returns its jaxpr's outputs as a list (`multiple_results`).
# Custom-derivative calls are not in the list: they are bound as they are,
# rule and all.
_CALLS = {
  "pjit": "jaxpr",
  "jit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "remat": "jaxpr",
  "remat2": "jaxpr",
  "checkpoint": "jaxpr",
}


def with_channels_last_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` recomputed with every convolution in channels-last layout.

  XLA:CPU runs a convolution on its fast path only when its operands are laid
  out batch-spatial-feature and spatial-in-out; at the top level of a program
  XLA transposes other layouts there itself, but not inside a conditional or a
  loop (jax-ml/jax#12868), where the backward pass's convolutions (kernel as
  spatial-out-in, or batch and feature swapped) fall to a loop ~20x slower.
  This evaluates `fn`'s jaxpr with each convolution wrapped in explicit
  transposes to and from that layout; results are identical. Calls
  (`jax.jit`, `jax.checkpoint`) are evaluated inline, so differentiating the
  result does not rematerialize what `jax.checkpoint` would have. A call with a
  custom derivative rule (`jax.custom_vjp`, `jax.custom_jvp`) is kept as it
  is, so differentiating the result uses the rule (its convolutions keep
  their layout).
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
    return _evaluate(getattr(called, "jaxpr", called), consts, *args)
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
