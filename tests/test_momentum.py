"""`curvopt.transforms.ema_momentum` against its recurrences, computed by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.transforms import ema_momentum

UPDATES = [np.array([1.0, -2.0]), np.array([0.5, 4.0]), np.array([-3.0, 1.0])]


def _run(tx, updates=UPDATES, dtype=jnp.float64):
  state = tx.init(jnp.zeros(2, dtype))
  outs = []
  for u in updates:
    out, state = tx.update(jnp.asarray(u, dtype), state)
    outs.append(np.asarray(out, np.float64))
  return outs, state


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("debias", [False, True])
def test_outputs_follow_the_ema_nesterov_and_debiasing_recurrences(nesterov, debias):
  decay = 0.7
  outs, state = _run(ema_momentum(decay, nesterov=nesterov, debias=debias))
  m = np.zeros(2)
  for t, (u, out) in enumerate(zip(UPDATES, outs, strict=True), start=1):
    m = decay * m + (1 - decay) * u
    expected = decay * m + (1 - decay) * u if nesterov else m
    if debias:
      expected = expected / (1 - decay**t)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
  np.testing.assert_allclose(state.momentum, m, rtol=1e-12)
  assert int(state.count) == len(UPDATES)


def test_the_defaults_are_a_plain_ema_at_0_9_with_an_integer_count():
  outs, state = _run(ema_momentum())
  m = np.zeros(2)
  for u, out in zip(UPDATES, outs, strict=True):
    m = 0.9 * m + 0.1 * u
    np.testing.assert_allclose(out, m, rtol=1e-12)
  assert state.count.dtype == jnp.int32


@pytest.mark.parametrize("argument", ["nesterov", "debias"])
def test_a_switch_that_is_not_a_bool_is_named(argument):
  with pytest.raises(TypeError, match=f"{argument} must be True or False"):
    ema_momentum(0.9, **{argument: 1})


def test_the_state_is_float32_for_bfloat16_updates_and_outputs_keep_their_dtype():
  _, state = _run(ema_momentum(0.9), dtype=jnp.bfloat16)
  assert state.momentum.dtype == jnp.float32
  tx = ema_momentum(0.9)
  out, _ = tx.update(jnp.ones(2, jnp.bfloat16), tx.init(jnp.zeros(2, jnp.bfloat16)))
  assert out.dtype == jnp.bfloat16
