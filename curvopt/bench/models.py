"""Small models in plain JAX, with parameters as nested dicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Params = Any


def init_mlp(key: jax.Array, sizes: Sequence[int], dtype: Any = jnp.float32) -> Params:
  """LeCun-normal weights and zero biases for an MLP with layer widths `sizes`."""
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"dense{i}": {
      "kernel": jax.random.normal(k, (m, n), dtype) * (1.0 / m) ** 0.5,
      "bias": jnp.zeros(n, dtype),
    }
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
  }


def mlp(params: Params, x: jax.Array, activation: Any = jnp.tanh) -> jax.Array:
  layers = [params[f"dense{i}"] for i in range(len(params))]
  for layer in layers[:-1]:
    x = activation(x @ layer["kernel"] + layer["bias"])
  return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def init_cnn1d(
  key: jax.Array,
  length: int = 40,
  channels: Sequence[int] = (32, 32, 32),
  kernel_size: int = 5,
  num_classes: int = 10,
) -> Params:
  """A 1-D CNN in flax's layout: kernels `(width, in, out)`, inputs `(batch, length, channels)`."""
  keys = jax.random.split(key, len(channels) + 1)
  params, fan_in = {}, 1
  for i, (k, c) in enumerate(zip(keys, channels, strict=False)):
    params[f"conv{i}"] = {
      "kernel": jax.random.normal(k, (kernel_size, fan_in, c))
      * (1.0 / (kernel_size * fan_in)) ** 0.5,
      "bias": jnp.zeros(c),
    }
    fan_in = c
  params["head"] = init_mlp(keys[-1], (length * fan_in, num_classes))["dense0"]
  return params


def cnn1d(params: Params, x: jax.Array) -> jax.Array:
  h = x[..., None]
  for i in range(len(params) - 1):
    layer = params[f"conv{i}"]
    h = jax.lax.conv_general_dilated(
      h, layer["kernel"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    h = jax.nn.relu(h + layer["bias"])
  h = h.reshape(h.shape[0], -1)
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def init_transformer(
  key: jax.Array,
  vocab_size: int,
  *,
  context: int = 64,
  width: int = 64,
  depth: int = 2,
  heads: int = 4,
) -> Params:
  """A pre-norm decoder-only transformer with learned positions."""
  keys = iter(jax.random.split(key, 3 + 4 * depth))
  normal = lambda shape, scale: jax.random.normal(next(keys), shape) * scale
  params = {
    "embed": normal((vocab_size, width), 0.02),
    "position": normal((context, width), 0.02),
    "final_norm": jnp.ones(width),
    "unembed": normal((width, vocab_size), width**-0.5),
  }
  for i in range(depth):
    params[f"block{i}"] = {
      "norm1": jnp.ones(width),
      "qkv": normal((width, 3 * width), width**-0.5),
      "proj": normal((width, width), (2 * depth * width) ** -0.5),
      "norm2": jnp.ones(width),
      "up": normal((width, 4 * width), width**-0.5),
      "down": normal((4 * width, width), (2 * depth * 4 * width) ** -0.5),
    }
  return params


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def transformer(params: Params, tokens: jax.Array, heads: int = 4) -> jax.Array:
  """Logits `(batch, time, vocab)` for integer `tokens` `(batch, time)`, causal."""
  _, time = tokens.shape
  x = params["embed"][tokens] + params["position"][:time]
  mask = jnp.tril(jnp.ones((time, time), bool))
  depth = sum(name.startswith("block") for name in params)
  for i in range(depth):
    block = params[f"block{i}"]
    q, k, v = jnp.split(_rms_norm(x, block["norm1"]) @ block["qkv"], 3, axis=-1)
    split = lambda t: t.reshape(*t.shape[:-1], heads, -1)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / (q.shape[-1] // heads) ** 0.5
    weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(x.shape)
    x = x + attended @ block["proj"]
    x = x + jax.nn.gelu(_rms_norm(x, block["norm2"]) @ block["up"]) @ block["down"]
  return _rms_norm(x, params["final_norm"]) @ params["unembed"]


def sequence_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy over every position of every sequence."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


def binary_logistic_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean logistic loss for one logit per example and labels in {0, 1}."""
  logits = logits[:, 0]
  return jnp.mean(jax.nn.softplus(logits) - labels * logits)


def half_mean_squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """`0.5 * mean over examples of ||outputs - targets||^2`."""
  return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))
