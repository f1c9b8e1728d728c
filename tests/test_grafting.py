"""Shampoo's grafting choices against their formulas, step by step (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.transforms.kronecker._grafting import GRAFTINGS, grafting_transform


def _directions(tx, grads):
  state, out = tx.init(grads[0]), []
  for g in grads:
    u, state = tx.update(g, state)
    out.append(np.asarray(u))
  return out


def _reference(name, grads, b2, eps):
  """The second-moment-only directions: what each grafting divides the gradient by."""
  v, out = np.zeros_like(grads[0]), []
  for t, g in enumerate(grads, start=1):
    if name == "sgd":
      out.append(g)
      continue
    if name == "adagrad":  # optax's scale_by_rss: eps inside the root
      v = v + g**2
      out.append(g / np.sqrt(v + eps))
      continue
    v = b2 * v + (1 - b2) * g**2
    scale = v / (1 - b2**t) if name == "adam" else v
    out.append(g / (np.sqrt(scale) + eps))
  return out


@pytest.mark.parametrize("name", GRAFTINGS)
def test_each_grafting_is_its_formula(name):
  grads = [np.asarray(jax.random.normal(jax.random.key(t), (5,))) for t in range(4)]
  b2, eps = 0.8, 1e-3  # not optax's 0.9; eps large enough that its placement shows
  got = _directions(grafting_transform(name, b2, eps), [jnp.asarray(g) for g in grads])
  for a, b in zip(got, _reference(name, grads, b2, eps), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_a_transform_is_used_as_given_and_none_means_no_grafting():
  custom = optax.scale_by_adam()
  assert grafting_transform(custom, 0.9, 1e-8) is custom
  assert grafting_transform(None, 0.9, 1e-8) is None


@pytest.mark.parametrize("bad", ["adamw", "Adam", 3])
def test_an_unknown_grafting_is_named_with_the_choices(bad):
  message = r"grafting must be one of 'adam', 'rmsprop', 'adagrad', 'sgd', an optax"
  with pytest.raises(ValueError, match=message) as error:
    grafting_transform(bad, 0.9, 1e-8)
  assert f"got {bad!r}." in str(error.value)
