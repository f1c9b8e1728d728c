"""Test configuration: float64 on, so exactness checks reach 1e-10.

Tests of float32 and bfloat16 behaviour build their arrays with explicit dtypes.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
  return jax.random.key(0)
