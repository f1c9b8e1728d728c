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
  tied: bool = False,
) -> Params:
  """A pre-norm decoder-only transformer, learned positions; `tied`: unembedding = embedding^T."""
  keys = iter(jax.random.split(key, 3 + 4 * depth))
  normal = lambda shape, scale: jax.random.normal(next(keys), shape) * scale
  params = {
    "embed": normal((vocab_size, width), 0.02),
    "position": normal((context, width), 0.02),
    "final_norm": jnp.ones(width),
  }
  unembed = normal((width, vocab_size), width**-0.5)
  if not tied:
    params["unembed"] = unembed
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
  unembed = params["unembed"] if "unembed" in params else params["embed"].T
  return _rms_norm(x, params["final_norm"]) @ unembed


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


def _conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int) -> jax.Array:
  """Per example and group of channels: no batch statistics, so `value_fn` needs no state."""
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.var(g, axis=(1, 2, 4), keepdims=True)
  g = (g - mean) * jax.lax.rsqrt(var + 1e-5)
  return g.reshape(n, h, w, c) * scale + bias


def init_resnet(
  key: jax.Array,
  widths: Sequence[int],
  blocks_per_stage: int,
  *,
  in_channels: int = 1,
  classes: int = 10,
) -> Params:
  """A pre-activation-free ResNet (He et al. 2016) with GroupNorm: stem, stages, linear head."""
  keys = iter(jax.random.split(key, 2 + 3 * len(widths) * blocks_per_stage))

  def conv(shape):  # He initialization for ReLU
    fan_in = shape[0] * shape[1] * shape[2]
    return jax.random.normal(next(keys), shape, jnp.float32) * (2.0 / fan_in) ** 0.5

  def norm(c):
    return {"scale": jnp.ones(c, jnp.float32), "bias": jnp.zeros(c, jnp.float32)}

  params = {"stem": conv((3, 3, in_channels, widths[0])), "stem_norm": norm(widths[0])}
  previous = widths[0]
  for s, width in enumerate(widths):
    for b in range(blocks_per_stage):
      block = {
        "conv1": conv((3, 3, previous, width)),
        "norm1": norm(width),
        "conv2": conv((3, 3, width, width)),
        # The last norm of a branch starts at zero: each block starts as the identity.
        "norm2": {"scale": jnp.zeros(width, jnp.float32), "bias": jnp.zeros(width, jnp.float32)},
      }
      if previous != width or (s > 0 and b == 0):  # a shape change: a 1x1 projection
        block["project"] = conv((1, 1, previous, width))
      params[f"stage{s}_block{b}"] = block
      previous = width
  params["head"] = {
    "w": jax.random.normal(next(keys), (previous, classes), jnp.float32) * previous**-0.5,
    "b": jnp.zeros(classes, jnp.float32),
  }
  return params


def resnet(params: Params, x: jax.Array) -> jax.Array:
  """Logits for NHWC images: stages halve the resolution after the first."""
  groups = lambda c: min(8, c)
  x = jax.nn.relu(
    _group_norm(
      _conv(x, params["stem"]), **params["stem_norm"], groups=groups(params["stem"].shape[-1])
    )
  )
  stage_names = sorted({k.split("_")[0] for k in params if k.startswith("stage")})
  for s, stage in enumerate(stage_names):
    names = sorted(k for k in params if k.startswith(stage + "_"))
    for b, name in enumerate(names):
      block = params[name]
      stride = 2 if s > 0 and b == 0 else 1
      c = block["conv1"].shape[-1]
      y = jax.nn.relu(
        _group_norm(_conv(x, block["conv1"], stride), **block["norm1"], groups=groups(c))
      )
      y = _group_norm(_conv(y, block["conv2"]), **block["norm2"], groups=groups(c))
      shortcut = _conv(x, block["project"], stride) if "project" in block else x
      x = jax.nn.relu(shortcut + y)
  pooled = jnp.mean(x, axis=(1, 2))
  return pooled @ params["head"]["w"] + params["head"]["b"]
