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


def _checks(which: str, *args: str, script: str = "multidevice_checks.py") -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  done = subprocess.run(
    [sys.executable, script, which, *args],
    cwd=TESTS,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line.removeprefix("RESULT "))


# The registry in four shares, one subprocess each, so that pytest-xdist workers
# share the four minutes (a shared fixture would instead run once per worker).
_SHARES = 4


@pytest.mark.parametrize("part", range(_SHARES))
def test_every_optimizer_on_a_mesh_equals_one_device(part):
  results = _checks("optimizers", f"{part}/{_SHARES}")
  assert sorted(results) == sorted(OPTIMIZERS)[part::_SHARES]
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


_MESH_CONFIG = """
[benchmark]
name = "mesh"
steps = 12
eval_every = 4
seeds = [0]
schedule = "constant"
trials = 1

[workloads.digits_mlp]
batch_size = 64

[optimizers.adam]
learning_rates = [0.003]

[optimizers.shampoo]
learning_rates = [0.003]
"""


def _bench(config, out, *args) -> subprocess.CompletedProcess:
  """`curvopt-bench run CONFIG --out OUT ARGS` on 8 forced CPU devices."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  command = [sys.executable, "-m", "curvopt.bench", "run", str(config), "--out", str(out), *args]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _bench_losses(config, out, *mesh) -> dict:
  done = _bench(config, out, "--quiet", *mesh)
  assert done.returncode == 0, done.stderr[-3000:]
  losses = {}
  for log in sorted((out / "runs").glob("*.jsonl")):
    records = [json.loads(line) for line in log.read_text().splitlines()]
    optimizer = records[0]["spec"]["optimizer"]
    assert records[0]["spec"].get("mesh") == (mesh[1] if mesh else None)
    losses[optimizer] = [r["train_loss"] for r in records if "train_loss" in r]
  return losses


def test_the_runner_on_a_mesh_equals_one_device(tmp_path):
  config = tmp_path / "mesh.toml"
  config.write_text(_MESH_CONFIG)
  single = _bench_losses(config, tmp_path / "one")
  for mesh in ("data=8", "data=2,fsdp=4"):
    sharded = _bench_losses(config, tmp_path / mesh.replace(",", "_"), "--mesh", mesh)
    assert sorted(sharded) == ["adam", "shampoo"]
    for name, losses in single.items():
      assert len(losses) == len(sharded[name]) == 4
      for a, b in zip(losses, sharded[name], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (mesh, name, losses, sharded[name])


def test_a_mesh_the_batch_cannot_split_over_is_refused_by_name(tmp_path):
  config = tmp_path / "mesh.toml"
  config.write_text(_MESH_CONFIG.replace("batch_size = 64", "batch_size = 60"))
  done = _bench(config, tmp_path / "o", "--mesh", "data=8")
  assert done.returncode == 2
  assert "workloads.digits_mlp.batch_size" in done.stderr and "multiple of 8" in done.stderr


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  """Two `jax.distributed` processes of 4 CPU devices each train Shampoo, SOAP, PSGD-Kron and
  Sophia-H data-parallel on one 8-device mesh: the parameters equal one process with 8
  devices, and the orbax checkpoint both processes wrote restores in one."""
  port = str(_free_port())
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  workers = [
    subprocess.Popen(
      [sys.executable, "two_process_checks.py", "worker", str(i), port, str(tmp_path)],
      cwd=TESTS,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in (0, 1)
  ]
  for worker in workers:
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
  report = _checks("single", str(tmp_path), script="two_process_checks.py")
  assert set(report) == {"shampoo", "soap", "psgd_kron", "sophia_h", "checkpoint"}
  for name, difference in report.items():
    assert difference < 1e-10, (name, difference)
