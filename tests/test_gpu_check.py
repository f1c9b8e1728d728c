"""benchmarks/gpu_check.sh, run at tiny size as the accelerator image would run it."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What the accelerator image lacks (it has jax, optax, flax and chex): each import fails.
_ABSENT = ("sklearn", "matplotlib", "mnist1d", "lineax", "hypothesis")
_BLOCKER = f"""
import importlib.abc, sys

class _Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in {_ABSENT!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    return None

sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_gpu_check_runs_every_stage_without_the_data_and_plot_packages(tmp_path):
  blocker = tmp_path / "blocker"
  blocker.mkdir()
  (blocker / "sitecustomize.py").write_text(_BLOCKER)
  out = tmp_path / "out"
  env = {
    **os.environ,
    "SMOKE": "1",
    "OUT": str(out),
    "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    "PYTHONPATH": str(blocker),
    "JAX_PLATFORMS": "cpu",
  }
  blocked = subprocess.run([sys.executable, "-c", "import sklearn"], env=env, capture_output=True)
  assert blocked.returncode != 0 and b"No module named 'sklearn'" in blocked.stderr
  done = subprocess.run(
    ["bash", "benchmarks/gpu_check.sh"],
    cwd=ROOT,
    env=env,
    timeout=1500,
    capture_output=True,
    text=True,
  )
  texts = {p.name: p.read_text() for p in out.iterdir() if p.suffix in (".txt", ".md")}
  assert done.returncode == 0, (texts.get("failed.txt"), done.stdout[-4000:], done.stderr[-2000:])
  for name, text in texts.items():
    assert "Traceback" not in text and "rror:" not in text, (name, text[-2000:])
  assert "collected" in texts["tests.txt"] or "tests collected" in texts["tests.txt"]
  steps = [line for line in texts["steps.md"].splitlines() if line.startswith("| gpt_lm")]
  optimizers = ("adamw", "muon", "psgd_muon", "psgd_kron", "soap", "shampoo", "sophia_h")
  # A header, its rule, and a row per optimizer on each of the two workloads.
  assert len(steps) == len(optimizers)
  assert len(texts["steps.md"].splitlines()) == 2 + 2 * len(optimizers)
  results = (out / "gpu" / "results.md").read_text()
  assert "plots not drawn: matplotlib is not installed" in results
  for optimizer in optimizers:
    assert f"| {optimizer} |" in texts["compile_time_gpu.md"]
  assert texts["kronecker_refresh_gpu.md"].count("\n| 16 |") == 1
  assert "--synthetic" in texts["bench.txt"]  # smoke mode only imports the oracle benchmark
