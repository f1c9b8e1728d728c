"""Every optimizer and estimator on 8 simulated devices equals one device (float64, 1e-5).

The checks run in `tests/multidevice_checks.py`, in a fresh process started
with `XLA_FLAGS=--xla_force_host_platform_device_count=8` (the flag must be
set before JAX initializes, so it cannot run inside this process).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from test_conformance import OPTIMIZERS

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]
TESTS = pathlib.Path(__file__).parent


def _checks(which: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  done = subprocess.run(
    [sys.executable, "multidevice_checks.py", which],
    cwd=TESTS,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line.removeprefix("RESULT "))


def test_every_optimizer_on_a_mesh_equals_one_device():
  # One test (one subprocess) for the whole registry: under pytest-xdist a
  # shared fixture would run once per worker.
  results = _checks("optimizers")
  assert sorted(results) == sorted(OPTIMIZERS)
  for name, row in results.items():
    assert row["single"]["compilations_after_the_first_step"] == 0, (name, row)
    for layout in ("replicated", "fsdp"):
      assert row[layout]["max_difference"] < 1e-5, (name, layout, row)
      assert row[layout]["state_shardings_as_asked"], (name, layout, row)
      assert row[layout]["params_shardings_as_asked"], (name, layout, row)
      assert row[layout]["compilations_after_the_first_step"] == 0, (name, layout, row)


def test_estimators_and_probes_on_a_mesh_equal_one_device():
  results = _checks("estimators")
  for layout, differences in results.items():
    assert differences["probe"] == 0.0, layout  # identical on every replica by construction
    for name, difference in differences.items():
      assert difference < 1e-10, (layout, name, difference)


def test_per_shard_sam_perturbations_on_a_mesh_equal_one_device():
  assert _checks("sam")["max_difference"] < 1e-12


def test_shampoo_and_soap_blocks_distributed_over_the_mesh_equal_one_device():
  results = _checks("blocks")
  for name, row in results.items():
    for layout in ("replicated", "distributed"):
      assert row[layout]["max_difference"] < 1e-10, (name, layout, row)
      assert row[layout]["compilations_after_the_first_step"] == 0, (name, layout, row)
    # Twelve 16 x 16 factors: every device holds all of them when replicated; with
    # block_sharding the stack is padded to 16 and each of the 8 devices works on 2.
    assert 12 in row["replicated"]["factor_stacks_per_device"], row
    assert 2 not in row["replicated"]["factor_stacks_per_device"], row
    assert 2 in row["distributed"]["factor_stacks_per_device"], row
