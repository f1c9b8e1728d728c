"""Runs every optimizer and estimator on an 8-device mesh and on one device; prints JSON.

Run by `tests/test_multidevice.py` in its own process, with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` set before JAX starts.
Data parallel: the batch is sharded over the mesh axis "data". Parameters
are replicated, or sharded FSDP-style (the first axis of every leaf whose
first dimension divides by 8); the optimizer state is asked for the same
layout leaf by leaf (param-shaped leaves like their parameter, the rest
replicated) through `out_shardings`.
"""

from __future__ import annotations

import json
import re
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from helpers import count_compilations  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from test_conformance import OPTIMIZERS  # noqa: E402

import curvopt  # noqa: E402

DEVICES = 8
mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
replicated = NamedSharding(mesh, P())
by_rows = NamedSharding(mesh, P("data"))


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
    "hidden": {"kernel": jax.random.normal(k1, (16, 24)) / 4, "bias": jnp.zeros(24)},
    "out": {"kernel": jax.random.normal(k2, (24, 8)) / 5, "bias": jnp.zeros(8)},
  }
  x = jax.random.normal(k3, (64, 16))
  y = jnp.arange(64) % 8
  return params, (x, y)


def model(params, x):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def loss(outputs, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(outputs), y[:, None], axis=-1))


def extra_args(batch):
  x, y = batch
  model_fn = lambda p: model(p, x)
  loss_fn = lambda out: loss(out, y)
  return {"value_fn": lambda p: loss_fn(model_fn(p)), "model_fn": model_fn, "loss_fn": loss_fn}


def fsdp(tree):
  """Shard the first axis of leaves whose first dimension divides by the device count."""
  return jax.tree.map(
    lambda x: by_rows if jnp.ndim(x) >= 1 and jnp.shape(x)[0] % DEVICES == 0 else replicated,
    tree,
  )


def state_shardings(state, params, param_shardings):
  """Param-shaped state leaves like their parameter; everything else replicated."""
  by_shape = {
    tuple(p.shape): s
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings), strict=True)
  }
  return jax.tree.map(lambda x: by_shape.get(tuple(jnp.shape(x)), replicated), state)


def run_optimizer(opt, params, batch, steps, shardings=None):
  def step(params, state, batch):
    extra = extra_args(batch)
    grads = jax.grad(extra["value_fn"])(params)
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  if shardings is None:
    jitted = jax.jit(step)
    state = jax.jit(opt.init)(params)
  else:
    param_shardings, batch_sharding = shardings
    params = jax.device_put(params, param_shardings)
    batch = jax.device_put(batch, batch_sharding)
    abstract = jax.eval_shape(opt.init, params)
    wanted = state_shardings(abstract, params, param_shardings)
    state = jax.jit(opt.init, out_shardings=wanted)(params)
    jitted = jax.jit(step, out_shardings=(param_shardings, wanted))
  params, state = jitted(params, state, batch)
  with count_compilations() as compiled:
    for _ in range(steps - 1):
      params, state = jitted(params, state, batch)
    jax.block_until_ready(params)
  report = {"compilations_after_the_first_step": len(compiled)}
  if shardings is not None:
    report["state_shardings_as_asked"] = all(
      a.sharding.is_equivalent_to(w, a.ndim)
      for a, w in zip(jax.tree.leaves(state), jax.tree.leaves(wanted), strict=True)
      if hasattr(a, "sharding")
    )
    report["params_shardings_as_asked"] = all(
      a.sharding.is_equivalent_to(w, a.ndim)
      for a, w in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings), strict=True)
    )
  return params, report


def max_difference(a, b):
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def optimizer_share(part: int, parts: int) -> list[str]:
  """Every `parts`-th optimizer name from `part`: the registry split into even shares."""
  return sorted(OPTIMIZERS)[part::parts]


def check_optimizers(part: str = "0/1"):
  params, batch = _problem()
  out = {}
  for name in optimizer_share(*map(int, part.split("/"))):
    entry = OPTIMIZERS[name]
    opt = entry.make()
    single, single_report = run_optimizer(opt, params, batch, 3)
    row = {"single": single_report}
    for layout, param_shardings in (
      ("replicated", jax.tree.map(lambda _: replicated, params)),
      ("fsdp", fsdp(params)),
    ):
      mesh_params, report = run_optimizer(opt, params, batch, 3, (param_shardings, by_rows))
      row[layout] = {"max_difference": max_difference(single, mesh_params), **report}
    out[name] = row
  return out


def check_estimators():
  params, batch = _problem()
  key = jax.random.key(3)

  def estimates(params, batch):
    extra = extra_args(batch)
    hessian = curvopt.hessian(extra["value_fn"], params)
    ggn = curvopt.gauss_newton(extra["model_fn"], extra["loss_fn"], params)
    probe = curvopt.random_vector(key, params)
    pairs = curvopt.lanczos_eigenpairs(hessian, key, k=3, num_iterations=20)
    return {
      "probe": probe,
      "hvp": hessian.mv(probe),
      "ggn_mv": ggn.mv(probe),
      "sharpness": curvopt.sharpness(extra["value_fn"], params, key=key, num_iterations=20),
      "top3": pairs.eigenvalues,
      "hutchinson_trace": curvopt.hutchinson_trace(hessian, key, num_probes=16).trace,
      "hutchinson_diagonal": curvopt.hutchinson_diagonal(ggn, key, num_probes=16).diagonal,
      "slq_trace": curvopt.spectral_density(hessian, key, num_iterations=15).trace(),
    }

  single = jax.jit(estimates)(params, batch)
  out = {}
  for layout, param_shardings in (
    ("replicated", jax.tree.map(lambda _: replicated, params)),
    ("fsdp", fsdp(params)),
  ):
    sharded = jax.jit(estimates)(
      jax.device_put(params, param_shardings), jax.device_put(batch, by_rows)
    )
    out[layout] = {k: max_difference(single[k], sharded[k]) for k in single}
  return out


def check_per_group_sam():
  """m-sharpness: one perturbation per data shard, against the same groups on one device."""
  params, batch = _problem()
  groups = DEVICES
  opt = curvopt.sam(optax.sgd(0.1), 0.05, perturbation="per_group", num_groups=groups)

  def step(params, state, batch):
    extra = extra_args(batch)
    x, y = batch
    size = x.shape[0] // groups

    def group_value_fn(p, i):
      rows = slice(i * size, (i + 1) * size)
      return loss(model(p, x[rows]), y[rows])

    grads = jax.grad(extra["value_fn"])(params)
    updates, state = opt.update(
      grads, state, params, value_fn=extra["value_fn"], group_value_fn=group_value_fn
    )
    return optax.apply_updates(params, updates), state

  single = jax.jit(step)(params, opt.init(params), batch)[0]
  sharded = jax.jit(step)(
    jax.device_put(params, replicated), opt.init(params), jax.device_put(batch, by_rows)
  )[0]
  return {"max_difference": max_difference(single, sharded)}


def _factor_stacks(step, *args, size=16) -> list[int]:
  """The lengths of the stacks of `size x size` factors in the compiled per-device program."""
  text = step.lower(*args).compile().as_text()
  return sorted({int(n) for n in re.findall(rf"f64\[(\d+),{size},{size}\]", text)})


def _deep_problem(layers=6, width=16):
  """Six 16 x 16 layers: twelve factors of size 16, one stack."""
  keys = jax.random.split(jax.random.key(1), layers + 1)
  params = {f"l{i}": jax.random.normal(k, (width, width)) / 4 for i, k in enumerate(keys[1:])}
  x = jax.random.normal(keys[0], (64, width))
  return params, (x, jnp.arange(64) % width)


def deep_model(params, x):
  for i in range(len(params) - 1):
    x = jnp.tanh(x @ params[f"l{i}"])
  return x @ params[f"l{len(params) - 1}"]


def check_distributed_blocks():
  """Shampoo and SOAP with their stacked factors sharded over the mesh, against one device."""
  global model
  model, shallow = deep_model, model
  try:
    return _distributed_blocks(*_deep_problem())
  finally:
    model = shallow


def _distributed_blocks(params, batch):
  out = {}
  for name, factory in (("shampoo", curvopt.shampoo), ("soap", curvopt.soap)):
    row = {}
    for layout, sharding in (("replicated", None), ("distributed", by_rows)):
      opt = factory(0.01, precondition_frequency=1, block_sharding=sharding)
      single, _ = run_optimizer(factory(0.01, precondition_frequency=1), params, batch, 3)
      sharded, report = run_optimizer(
        opt, params, batch, 3, (jax.tree.map(lambda _: replicated, params), by_rows)
      )

      def step(params, state, batch, opt=opt):
        extra = extra_args(batch)
        updates, state = opt.update(jax.grad(extra["value_fn"])(params), state, params)
        return optax.apply_updates(params, updates), state

      p = jax.device_put(params, replicated)
      row[layout] = {
        "max_difference": max_difference(single, sharded),
        "factor_stacks_per_device": _factor_stacks(
          jax.jit(step), p, jax.jit(opt.init)(p), jax.device_put(batch, by_rows)
        ),
        **report,
      }
    out[name] = row
  return out


if __name__ == "__main__":
  assert jax.device_count() >= DEVICES, jax.devices()
  which, *args = sys.argv[1:]
  result = {
    "optimizers": check_optimizers,
    "estimators": check_estimators,
    "sam": check_per_group_sam,
    "blocks": check_distributed_blocks,
  }[which](*args)
  print("RESULT " + json.dumps(result))
