"""The XLA:CPU workarounds: exact, all behind one switch, and the only backend checks."""

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt import _xla_cpu
from curvopt.estimators._loops import Loop, resolve_loop

ON_CPU = jax.default_backend() == "cpu"


# Two spatial axes, channels last: batch-spatial-feature, spatial-in-out.
CHANNELS_LAST = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _layouts(fn, *args):
  """The dimension numbers of every convolution `fn(*args)` runs, nested calls included."""
  specs, stack = [], [jax.make_jaxpr(fn)(*args).jaxpr]
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        specs.append(tuple(map(tuple, eqn.params["dimension_numbers"])))
      stack.extend(jax.extend.core.jaxprs_in_params(eqn.params))
  return specs


def _nchw_conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
  )


def test_channels_last_rewrite_is_exact_and_leaves_only_channels_last_convolutions():
  def conv(x, w):  # every layout non-canonical, with strides, padding, dilations and groups
    return jax.lax.conv_general_dilated(
      x,
      w,
      (2, 1),
      [(1, 1), (0, 2)],
      lhs_dilation=(1, 2),
      rhs_dilation=(2, 1),
      dimension_numbers=("NCHW", "OIHW", "NHCW"),
      feature_group_count=2,
    )

  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(2), (3, 4, 9, 7), jnp.float64)
    w = jax.random.normal(jax.random.key(3), (6, 2, 3, 3), jnp.float64)
    # A convolution inside `jax.jit` too: the rewrite must look inside calls.
    loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w)) + jnp.cos(jax.jit(conv)(x, w)))
    hvp = lambda: jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, w), (0.3 * x, 0.7 * w))
    rewritten = _xla_cpu.with_channels_last_convolutions(hvp)
    chex.assert_trees_all_close(rewritten(), hvp(), rtol=1e-12, atol=1e-12)

    assert any(spec != CHANNELS_LAST for spec in _layouts(hvp))  # forward and both transposes
    assert len(_layouts(rewritten)) == len(_layouts(hvp)) >= 8
    assert set(_layouts(rewritten)) == {CHANNELS_LAST}


def test_the_rewrite_reaches_into_closures_and_checkpoints():
  """A jitted call's closed-over kernel (its jaxpr's constants) and `jax.checkpoint`'s body."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 6, 5))
  kernel = jax.random.normal(jax.random.key(1), (4, 3, 3, 3))
  closed = jax.jit(lambda x: _nchw_conv(x, kernel))  # `kernel` is a constant of its jaxpr
  remat = jax.checkpoint(lambda x, w: jnp.tanh(_nchw_conv(x, w)))

  def fn(x, w):
    return jnp.sum(closed(x) ** 2) + jnp.sum(jnp.sin(remat(x, w))), closed(2.0 * x)

  rewritten = _xla_cpu.with_channels_last_convolutions(fn)
  chex.assert_trees_all_close(rewritten(x, kernel), fn(x, kernel), rtol=1e-12, atol=1e-12)
  assert len(_layouts(rewritten, x, kernel)) == len(_layouts(fn, x, kernel)) == 3
  assert set(_layouts(rewritten, x, kernel)) == {CHANNELS_LAST}


def test_bind_parameters_given_as_a_pair_are_bound_with_their_leading_operands():
  """Older jax's `get_bind_params` returns `(subfuns, params)`: the first bound before the rest."""

  class PairPrimitive(jax.extend.core.Primitive):
    def get_bind_params(self, params):
      return (jnp.asarray(params["scale"]),), {}

  scaled = PairPrimitive("scaled_for_test")
  # Bound as traced: `scale` a parameter; as older jax re-binds it: the leading operand.
  scaled.def_impl(
    lambda *operands, scale=None: (operands[0] if scale is None else scale) * operands[-1]
  )
  scaled.def_abstract_eval(lambda *operands, **params: operands[-1])
  fn = lambda x: jnp.sin(scaled.bind(x, scale=2.0))
  x = jnp.array([0.5, 3.0])
  rewritten = _xla_cpu.with_channels_last_convolutions(fn)
  np.testing.assert_array_equal(rewritten(x), fn(x))
  np.testing.assert_array_equal(fn(x), jnp.sin(2.0 * x))


@pytest.mark.skipif(not ON_CPU, reason="the workarounds are for XLA:CPU")
def test_for_control_flow_rewrites_only_programs_with_a_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 3, 6, 5))
  w = jax.random.normal(jax.random.key(1), (4, 3, 3, 3))
  plain = lambda x, w: jnp.sum(jnp.tanh(x) * jnp.sum(w))
  assert _xla_cpu.for_control_flow(plain, x, w) is plain
  grad = jax.grad(lambda w, x: jnp.sum(_nchw_conv(x, w) ** 2))
  rewritten = _xla_cpu.for_control_flow(grad, w, x)
  assert rewritten is not grad
  chex.assert_trees_all_close(rewritten(w, x), grad(w, x), rtol=1e-12, atol=1e-12)
  assert set(_layouts(rewritten, w, x)) == {CHANNELS_LAST}


@pytest.mark.skipif(not ON_CPU, reason="the workarounds are for XLA:CPU")
@pytest.mark.parametrize("devices", [1, 2, 8])
def test_lapack_calls_go_one_at_a_time_only_over_several_cpu_devices(monkeypatch, devices):
  monkeypatch.setattr(jax, "device_count", lambda: devices)
  assert _xla_cpu.lapack_one_at_a_time() == (devices > 1)
  monkeypatch.setenv(_xla_cpu.SWITCH, "0")
  assert not _xla_cpu.lapack_one_at_a_time()


def test_the_rewrite_keeps_custom_derivative_rules():
  """A `jax.custom_vjp` layer's rule survives: the rewritten function's gradient uses it."""

  @jax.custom_vjp
  def clipped_relu(x):
    return jnp.maximum(x, 0.0)

  def forward(x):
    return clipped_relu(x), x

  def backward(x, g):  # deliberately not the derivative: 3x the gradient where x > 0
    return (3.0 * g * (x > 0),)

  clipped_relu.defvjp(forward, backward)

  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NCW", "OIW", "NCW"))
    return jnp.sum(clipped_relu(y) ** 2)

  w = jax.random.normal(jax.random.key(0), (4, 2, 3))
  x = jax.random.normal(jax.random.key(1), (5, 2, 8))
  rewritten = _xla_cpu.with_channels_last_convolutions(lambda w: loss(w, x))
  expected = jax.grad(loss)(w, x)
  plain = jax.grad(
    lambda w: jnp.sum(
      jnp.maximum(
        jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NCW", "OIW", "NCW")),
        0.0,
      )
      ** 2
    )
  )(w)
  assert not np.allclose(expected, plain)  # the rule matters, so the test can fail
  chex.assert_trees_all_close(jax.grad(rewritten)(w), expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.jit(jax.grad(rewritten))(w), expected, rtol=1e-5, atol=1e-6)


def _conv_problem():
  kernel = jax.random.normal(jax.random.key(0), (3, 2, 4)) * 0.5  # (width, in, out)
  x = jax.random.normal(jax.random.key(1), (6, 10, 2))

  def loss(params):
    y = jax.lax.conv_general_dilated(
      x, params["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    return jnp.mean(jnp.tanh(y) ** 2) + 0.1 * jnp.sum(params["b"] ** 2)

  return loss, {"w": kernel, "b": jnp.ones(3)}


def _results() -> dict:
  """Estimators in loops, conditional Hessian refreshes and Shampoo's ordered roots."""
  loss, params = _conv_problem()
  op = curvopt.hessian(loss, params)
  key = jax.random.key(3)
  out = {
    "lanczos": curvopt.estimators.lanczos_eigenpairs(op, key, k=2, num_iterations=6).eigenvalues,
    "trace": curvopt.estimators.hutchinson_trace(op, key, num_probes=4, probes_per_step=2).trace,
  }
  for name, opt in [
    ("sophia_h", curvopt.sophia_h(0.01, refresh_every=2)),
    ("adahessian", curvopt.adahessian(0.01, refresh_every=2)),
    ("shampoo", curvopt.shampoo(0.01, precondition_frequency=2)),
  ]:
    p, state = params, opt.init(params)

    @jax.jit
    def step(p, state, opt=opt):
      grads = jax.grad(loss)(p)
      updates, state = opt.update(grads, state, p, value_fn=loss)
      return optax.apply_updates(p, updates), state

    for _ in range(4):
      p, state = step(p, state)
    out[name] = p
  return out


@pytest.mark.slow  # five estimators and optimizers compiled twice
def test_results_are_the_same_with_the_workarounds_off(monkeypatch):
  with jax.enable_x64(False):
    on = _results()
    assert _xla_cpu.active() == ON_CPU
    monkeypatch.setenv(_xla_cpu.SWITCH, "0")
    jax.clear_caches()
    assert not _xla_cpu.active()
    off = _results()
  jax.clear_caches()
  for name in on:
    chex.assert_trees_all_close(on[name], off[name], rtol=2e-5, atol=1e-6, custom_message=name)


def test_the_switch_turns_every_workaround_off(monkeypatch):
  loss, params = _conv_problem()
  op = curvopt.hessian(loss, params)
  assert resolve_loop("auto", op) == Loop(unroll=False, channels_last=ON_CPU)
  assert _xla_cpu.order_lapack_calls() == ON_CPU
  monkeypatch.setenv(_xla_cpu.SWITCH, "0")
  assert resolve_loop("auto", op) == Loop(unroll=False, channels_last=False)
  assert not _xla_cpu.order_lapack_calls() and not _xla_cpu.lapack_one_at_a_time()
  refresh = lambda: jax.grad(loss)(params)
  assert _xla_cpu.for_control_flow(refresh) is refresh


def test_backend_checks_live_in_one_module_and_the_runner():
  root = pathlib.Path(curvopt.__file__).parent
  pattern = re.compile(r"default_backend|\.platform\b|\"cpu\"")
  found = sorted(
    str(path.relative_to(root)) for path in root.rglob("*.py") if pattern.search(path.read_text())
  )
  assert all(path == "_xla_cpu.py" or path.startswith("bench/") for path in found), found
  assert "_xla_cpu.py" in found
