"""The refresh cadence every curvature optimizer shares: which steps refresh, and how."""

import jax
import jax.numpy as jnp
import optax
import pytest

from curvopt.transforms._cadence import refresh_if_due, refresh_when, value_at


def test_value_at_reads_a_schedule_at_the_count_and_a_number_as_is():
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  assert float(value_at(schedule, jnp.int32(4))) == pytest.approx(0.6)
  assert value_at(0.25, jnp.int32(4)) == 0.25


@pytest.mark.parametrize("every", [1, 2, 3])
def test_refresh_if_due_refreshes_on_multiples_of_every_from_step_zero(every):
  step = jax.jit(lambda count: refresh_if_due(count, every, lambda: count, lambda: jnp.int32(-1)))
  got = [int(step(jnp.int32(c))) for c in range(7)]
  assert got == [c if c % every == 0 else -1 for c in range(7)]


def test_every_step_emits_no_conditional_and_a_longer_period_one_lax_cond():
  program = lambda every: str(
    jax.make_jaxpr(lambda c: refresh_if_due(c, every, lambda: c + 1, lambda: c))(jnp.int32(0))
  )
  assert "cond[" not in program(1)
  assert program(2).count("cond[") == 1


def test_refresh_when_branches_in_python_outside_jit_and_in_lax_cond_inside():
  calls = []
  refresh = lambda: calls.append("refresh") or jnp.float32(1.0)
  keep = lambda: calls.append("keep") or jnp.float32(0.0)
  assert float(refresh_when(jnp.bool_(True), refresh, keep)) == 1.0
  assert float(refresh_when(False, refresh, keep)) == 0.0
  assert calls == ["refresh", "keep"]  # eager: only the branch taken runs
  traced = jax.jit(lambda due: refresh_when(due, refresh, keep))
  assert [float(traced(d)) for d in (True, False)] == [1.0, 0.0]
  assert str(jax.make_jaxpr(lambda d: refresh_when(d, refresh, keep))(True)).count("cond[") == 1
