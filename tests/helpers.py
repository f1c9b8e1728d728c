"""Small models with dense references, shared by the tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


class Problem(NamedTuple):
  params: Any
  model_fn: Any  # params -> (n, c) outputs
  loss_fn: Any  # outputs -> scalar
  per_example_loss_fn: Any  # params -> (n,)
  value_fn: Any  # params -> scalar
  inputs: Any
  targets: Any


def mlp_params(key, sizes=(8, 24, 3), dtype=jnp.float64):
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
    wk, bk = jax.random.split(k)
    params[f"layer{i}"] = {
      "w": jax.random.normal(wk, (m, n), dtype) / float(np.sqrt(m)),
      "b": 0.1 * jax.random.normal(bk, (n,), dtype),
    }
  return params


def mlp(params, x):
  layers = [params[name] for name in sorted(params)]
  for layer in layers[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ layers[-1]["w"] + layers[-1]["b"]


def softmax_xent(logits, labels):
  return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, logits.shape[-1]), axis=-1)


def half_squared_error(outputs, targets):
  return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1)


def mlp_problem(
  loss: str = "xent", *, n: int = 32, sizes=(8, 24, 3), seed: int = 0, dtype=jnp.float64
):
  """A 2-layer tanh MLP with dict params and biases (d = 291 by default)."""
  k_params, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
  params = mlp_params(k_params, sizes, dtype)
  x = jax.random.normal(k_x, (n, sizes[0]), dtype)
  if loss == "xent":
    y = jax.random.randint(k_y, (n,), 0, sizes[-1])
    per_example = softmax_xent
  else:
    y = jax.random.normal(k_y, (n, sizes[-1]), dtype)
    per_example = half_squared_error
  model_fn = lambda p: mlp(p, x)
  loss_fn = lambda out: jnp.mean(per_example(out, y))
  per_example_loss_fn = lambda p: per_example(model_fn(p), y)
  value_fn = lambda p: loss_fn(model_fn(p))
  return Problem(params, model_fn, loss_fn, per_example_loss_fn, value_fn, x, y)


# The dense references are jitted: run eagerly, each primitive of a batched Jacobian is
# compiled on its own (about a hundred small compiles per reference).
def dense_hessian(value_fn, params):
  flat, unravel = ravel_pytree(params)
  return jax.jit(jax.hessian(lambda f: value_fn(unravel(f))))(flat)


def dense_ggn(model_fn, loss_fn, params):
  flat, unravel = ravel_pytree(params)
  outputs = model_fn(params)
  jac = jax.jit(jax.jacfwd(lambda f: model_fn(unravel(f)).ravel()))(flat)
  loss_hessian = jax.jit(jax.hessian(lambda o: loss_fn(o.reshape(outputs.shape))))(outputs.ravel())
  return jac.T @ loss_hessian @ jac


def dense_empirical_fisher(per_example_loss_fn, params):
  flat, unravel = ravel_pytree(params)
  grads = jax.jit(jax.jacrev(lambda f: per_example_loss_fn(unravel(f))))(flat)
  return grads.T @ grads / grads.shape[0]


def ravel(tree):
  return ravel_pytree(tree)[0]


def random_like(key, params):
  flat, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def quadratic_with_spectrum(eigenvalues, seed=0):
  """`value_fn(w) = w^T A w / 2` with a random orthogonal eigenbasis; returns (value_fn, A)."""
  eigenvalues = np.asarray(eigenvalues, np.float64)
  d = eigenvalues.size
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  matrix = (q * eigenvalues) @ q.T
  matrix = 0.5 * (matrix + matrix.T)
  a = jnp.asarray(matrix)
  return (lambda w: 0.5 * w @ a @ w), matrix


class _CompileCounter(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages: list[str] = []

  def emit(self, record):
    message = record.getMessage()
    if "Compiling" in message:
      self.messages.append(message)


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
  """Collects JAX's "Compiling ..." log lines raised inside the block."""
  handler = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield handler.messages
  finally:
    logger.removeHandler(handler)
