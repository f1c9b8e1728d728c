"""How estimator loops compile: `resolve_loop`'s choice and `iterate`'s steps."""

import jax
import jax.numpy as jnp
import pytest

import curvopt
from curvopt import _xla_cpu
from curvopt.estimators import _loops
from curvopt.estimators._loops import Loop, iterate, resolve_loop

UNROLL, LAX, CHANNELS_LAST = Loop(True, False), Loop(False, False), Loop(False, True)


def _conv_operator():
  x = jnp.ones((2, 8, 3))
  value_fn = lambda k: jnp.sum(
    jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")) ** 2
  )
  return curvopt.hessian(value_fn, jnp.ones((3, 3, 2)))


def test_resolve_loop_rewrites_only_automatic_loops_over_convolutions_on_cpu(monkeypatch):
  dense = curvopt.diagonal_operator(jnp.ones(3))
  conv = _conv_operator()
  assert resolve_loop("unroll", conv) == UNROLL
  assert resolve_loop("lax", conv) == LAX
  assert resolve_loop("auto", dense) == LAX
  monkeypatch.setattr(_xla_cpu, "active", lambda: True)
  assert resolve_loop("auto", conv) == CHANNELS_LAST
  monkeypatch.setattr(_xla_cpu, "active", lambda: False)
  assert resolve_loop("auto", conv) == LAX


def test_resolve_loop_names_an_unknown_mode():
  with pytest.raises(ValueError, match=r"^loop must be one of 'auto', 'lax', 'unroll'"):
    resolve_loop("scan", curvopt.diagonal_operator(jnp.ones(3)))


@pytest.mark.parametrize("loop", [UNROLL, LAX])
def test_iterate_runs_every_step_without_a_stopping_rule(loop):
  seen = []
  body = lambda i, s: (seen.append(type(i)), s + i)[1]
  state, steps = iterate(5, body, jnp.int32(0), loop=loop)
  assert (int(state), int(steps)) == (10, 5)
  assert steps.dtype == jnp.int32
  if loop.unroll:
    assert seen == [int] * 5  # static indices: bodies may slice by them


def test_iterate_stops_a_lax_loop_once_done_and_checks_before_the_first_step():
  body = lambda i, s: s + i
  state, steps = iterate(10, body, jnp.int32(0), loop=LAX, done=lambda s: s >= 3)
  assert (int(state), int(steps)) == (3, 3)  # 0 -> 0 -> 1 -> 3
  state, steps = iterate(10, body, jnp.int32(7), loop=LAX, done=lambda s: s >= 3)
  assert (int(state), int(steps)) == (7, 0)
  state, steps = iterate(10, body, jnp.int32(0), loop=LAX, done=lambda s: s >= 1000)
  assert (int(state), int(steps)) == (45, 10)  # never done: every step
  state, steps = iterate(4, body, jnp.int32(0), loop=UNROLL, done=lambda s: s >= 3)
  assert (int(state), int(steps)) == (6, 4)  # unrolled loops do not stop early


def test_iterate_rewrites_the_body_channels_last_only_when_asked(monkeypatch):
  wrapped = []

  def spy(fn):
    wrapped.append(fn)
    return fn

  monkeypatch.setattr(_loops._xla_cpu, "with_channels_last_convolutions", spy)
  body = lambda i, s: s + 1
  iterate(3, body, jnp.int32(0), loop=LAX)
  assert wrapped == []
  state, steps = iterate(3, body, jnp.int32(0), loop=CHANNELS_LAST)
  assert wrapped == [body] and (int(state), int(steps)) == (3, 3)
