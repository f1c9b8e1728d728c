"""Test configuration.

- float64 on, so exactness checks reach 1e-10. Tests of float32 and bfloat16 behaviour
  build their arrays with explicit dtypes.
- Two tiers: the default run leaves out tests marked `slow` (statistical tests, the
  notebooks, multi-device subprocesses, end-to-end resumes, and the registry's variant
  optimizers in the generic checks); `--runslow` adds them, and `-m slow --runslow` runs
  them alone (CI runs both).
- Compiled programs are dropped from memory after each module: a worker otherwise keeps
  every executable it ever compiled (about 5 GB by the end of the suite). They stay in a
  persistent compilation cache that lives for one run and is shared by the xdist workers,
  so a program dropped after one module, or compiled by the other worker, is read back
  rather than compiled again (its saving was not measured apart from the other changes).
"""

import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)

_CACHE_VARIABLE = "CURVOPT_TEST_COMPILATION_CACHE"


def pytest_configure(config):
  # The controller (or a run without xdist) makes the folder; workers inherit the variable.
  if not hasattr(config, "workerinput") and _CACHE_VARIABLE not in os.environ:
    os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="curvopt-test-jax-cache-")
    config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(_CACHE_VARIABLE), True))
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
  # The runner's own cache (curvopt-bench run) is the same folder, not the user's.
  os.environ["CURVOPT_COMPILATION_CACHE"] = os.environ[_CACHE_VARIABLE]
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_addoption(parser):
  parser.addoption(
    "--runslow",
    action="store_true",
    default=False,
    help="also run the slow tier (tests marked slow)",
  )


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  slow = [item for item in items if item.get_closest_marker("slow")]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config):
  if not config.getoption("--runslow"):
    return "slow tier left out: add --runslow to run it"
  return None


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
  yield
  jax.clear_caches()


@pytest.fixture
def key():
  return jax.random.key(0)
