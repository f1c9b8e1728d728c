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
