"""The loss Hessian on a batch of outputs, per example, in square-root form.

Gauss-Newton methods need, for the outputs `f_i` of each example, the Hessian
`B_i` of the batch loss with respect to `f_i` and the gradient `gamma_i`. They
use them factored: `B_i = S_i S_i^T` and `gamma_i = S_i w_i + n_i`, where
`n_i` is the part of the gradient along directions without curvature. Then the
Gauss-Newton matrix is `A^T A` with `A = S^T J`, and the parameter gradient is
`J^T (S w + n)` (Korbit et al. 2024; somax's symmetric form).

The built-in losses give exact closed forms (no jitter, `n = 0`); any other
`loss_fn` is factored by autodiff: `c` output-space Hessian-vector products
and one batched `c x c` eigendecomposition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvopt import _checks


class OutputCurvature(NamedTuple):
  """`B_i = root_i root_i^T` and `gamma_i = root_i coefficients_i + null_gradient_i`.

  Attributes:
    root: `(b, c, k)`, a square root of each example's loss Hessian on its
      `c` outputs (of the batch loss, so a mean loss's `1/b` is inside).
    coefficients: `(b, k)`.
    null_gradient: `(b, c)`, the gradient where `B_i` has no (or negative)
      curvature; None where it is zero by construction (the built-in losses).
  """

  root: jax.Array
  coefficients: jax.Array
  null_gradient: jax.Array | None = None


def _as_matrix(outputs: jax.Array) -> jax.Array:
  """Outputs as `(b, c)`: the leading axis is the example axis."""
  if not isinstance(outputs, jax.Array) or outputs.ndim == 0:
    raise ValueError(
      "model_fn must return one array of outputs with a leading example axis, shape (b,) or "
      f"(b, c, ...); got {type(outputs).__name__} with shape {getattr(outputs, 'shape', None)}."
    )
  if not jnp.issubdtype(outputs.dtype, jnp.floating):
    raise TypeError(f"model_fn must return floating-point outputs, got {outputs.dtype}.")
  return outputs.reshape(outputs.shape[0], -1)


class SquaredError(NamedTuple):
  """Half the squared error, summed over outputs and averaged over examples.

  `loss(f) = (1/b) sum_i 0.5 ||f_i - y_i||^2`; `B_i = I / b`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> loss = curvopt.oracles.SquaredError(jnp.zeros((2, 1)))
    >>> loss(jnp.array([[1.0], [3.0]]))
    Array(2.5, dtype=float32)
  """

  targets: jax.Array

  def __call__(self, outputs: jax.Array) -> jax.Array:
    residuals = _as_matrix(outputs) - self.targets.reshape(outputs.shape[0], -1)
    return 0.5 * jnp.mean(jnp.sum(residuals**2, axis=-1))

  def output_curvature(self, outputs: jax.Array) -> OutputCurvature:
    f = _as_matrix(outputs)
    b, c = f.shape
    scale = jnp.sqrt(jnp.asarray(b, f.dtype))
    residuals = f - self.targets.reshape(b, -1).astype(f.dtype)
    root = jnp.broadcast_to(jnp.eye(c, dtype=f.dtype) / scale, (b, c, c))
    return OutputCurvature(root, residuals / scale)


class SoftmaxCrossEntropy(NamedTuple):
  """Softmax cross-entropy averaged over examples; labels are integers or probabilities.

  With `p_i = softmax(f_i)`: `gamma_i = (p_i - y_i)/b` and
  `B_i = (diag(p_i) - p_i p_i^T)/b`, factored exactly (rank `c - 1`, no
  jitter) as `S_i = (diag(sqrt p_i) - p_i sqrt(p_i)^T)/sqrt(b)`, with
  `w_i = (p_i - y_i)/sqrt(b p_i)` (probability labels must sum to one).

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> loss = curvopt.oracles.SoftmaxCrossEntropy(jnp.array([0, 1]))
    >>> round(float(loss(jnp.zeros((2, 2)))), 4)  # log 2
    0.6931
  """

  labels: jax.Array

  def _targets(self, logits: jax.Array) -> jax.Array:
    if jnp.issubdtype(self.labels.dtype, jnp.integer):
      return jax.nn.one_hot(self.labels.reshape(-1), logits.shape[-1], dtype=logits.dtype)
    return self.labels.reshape(logits.shape).astype(logits.dtype)

  def __call__(self, outputs: jax.Array) -> jax.Array:
    logits = _as_matrix(outputs)
    return -jnp.mean(jnp.sum(self._targets(logits) * jax.nn.log_softmax(logits), axis=-1))

  def output_curvature(self, outputs: jax.Array) -> OutputCurvature:
    logits = _as_matrix(outputs)
    b = logits.shape[0]
    log_p = jax.nn.log_softmax(logits)
    p, sqrt_p = jnp.exp(log_p), jnp.exp(0.5 * log_p)  # no underflow before exp(-87) of sqrt
    scale = jnp.sqrt(jnp.asarray(b, logits.dtype))
    root = (jax.vmap(jnp.diag)(sqrt_p) - p[:, :, None] * sqrt_p[:, None, :]) / scale
    coefficients = (p - self._targets(logits)) / (sqrt_p * scale)
    return OutputCurvature(root, coefficients)


class SigmoidCrossEntropy(NamedTuple):
  """Binary logistic loss on one logit per example, labels in [0, 1], averaged.

  `gamma_i = (s_i - y_i)/b` and `B_i = s_i (1 - s_i)/b` with `s = sigmoid(f)`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> loss = curvopt.oracles.SigmoidCrossEntropy(jnp.array([1.0, 0.0]))
    >>> round(float(loss(jnp.zeros(2))), 4)  # log 2
    0.6931
  """

  labels: jax.Array

  def __call__(self, outputs: jax.Array) -> jax.Array:
    logits = _as_matrix(outputs)[:, 0]
    return jnp.mean(jax.nn.softplus(logits) - self.labels.reshape(-1) * logits)

  def output_curvature(self, outputs: jax.Array) -> OutputCurvature:
    logits = _as_matrix(outputs)
    b = logits.shape[0]
    labels = self.labels.reshape(b, 1).astype(logits.dtype)
    # sqrt(s (1 - s)) from log-sigmoids: finite where s or 1 - s underflows.
    sqrt_curvature = jnp.exp(0.5 * (jax.nn.log_sigmoid(logits) + jax.nn.log_sigmoid(-logits)))
    scale = jnp.sqrt(jnp.asarray(b, logits.dtype))
    coefficients = (jax.nn.sigmoid(logits) - labels) / (sqrt_curvature * scale)
    return OutputCurvature((sqrt_curvature / scale)[:, :, None], coefficients)


def output_curvature(loss_fn: Callable[[jax.Array], jax.Array], outputs: Any) -> OutputCurvature:
  """The per-example loss Hessian on `outputs` in square-root form.

  Closed form for `SquaredError`, `SoftmaxCrossEntropy` and
  `SigmoidCrossEntropy`; for any other `loss_fn`, exact by autodiff under one
  assumption: the loss is a sum (or mean) of terms that each depend on one
  example's outputs, so its Hessian is block-diagonal over the leading axis
  (true of every per-example loss; not of a contrastive loss over the batch).
  The blocks come from `c` output-space Hessian-vector products, each probing
  one output coordinate of every example at once; their negative and
  round-off-sized eigenvalues count as no curvature (`null_gradient`).

  Args:
    loss_fn: `outputs -> scalar`, the batch loss.
    outputs: `(b,)` or `(b, c, ...)` model outputs; axis 0 is the example axis.

  Returns:
    An `OutputCurvature` with `c` the product of the trailing dimensions.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curv = curvopt.oracles.output_curvature(lambda f: jnp.sum(f**2), jnp.array([1.0, 2.0]))
    >>> curv.root[:, :, 0], curv.coefficients[:, 0]  # B_i = 2, gamma_i = 2 f_i
    (Array([[1.4142135],
           [1.4142135]], dtype=float32), Array([1.4142135, 2.828427 ], dtype=float32))

  References:
    Korbit, Adeoye, Bemporad, Zanon, "Exact Gauss-Newton Optimization for
    Training Deep Neural Networks", 2024 (arXiv 2405.14402).
  """
  _checks.callable_arg("loss_fn", loss_fn)
  flat = _as_matrix(outputs)
  if hasattr(loss_fn, "output_curvature"):
    return loss_fn.output_curvature(outputs)
  _checks.scalar_function("loss_fn", loss_fn, outputs)
  return _autodiff_curvature(loss_fn, outputs.shape, flat)


def _autodiff_curvature(loss_fn: Callable, shape: tuple, flat: jax.Array) -> OutputCurvature:
  b, c = flat.shape
  grad_fn = jax.grad(lambda f: loss_fn(f.reshape(shape)))
  gradient = grad_fn(flat)
  probes = jnp.broadcast_to(jnp.eye(c, dtype=flat.dtype)[:, None, :], (c, b, c))
  columns = jax.vmap(lambda e: jax.jvp(grad_fn, (flat,), (e,))[1])(probes)  # (c, b, c)
  blocks = jnp.moveaxis(columns, 0, -1)
  blocks = 0.5 * (blocks + jnp.swapaxes(blocks, -1, -2))
  eigenvalues, vectors = jnp.linalg.eigh(blocks)
  tolerance = 10 * c * jnp.finfo(flat.dtype).eps * jnp.max(jnp.abs(eigenvalues))
  kept = eigenvalues > tolerance
  sqrt_values = jnp.sqrt(jnp.where(kept, eigenvalues, 1.0))
  along = jnp.einsum("bck,bc->bk", vectors, gradient)  # gradient in each eigenbasis
  root = vectors * jnp.where(kept, sqrt_values, 0.0)[:, None, :]
  coefficients = jnp.where(kept, along / sqrt_values, 0.0)
  null_gradient = jnp.einsum("bck,bk->bc", vectors, jnp.where(kept, 0.0, along))
  return OutputCurvature(root, coefficients, null_gradient)
