"""The docs run, the code is ruff-clean, and the layers import downward only."""

import ast
import contextlib
import doctest
import functools
import importlib
import inspect
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys

import jax
import pytest

import curvopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
  m.name
  for m in pkgutil.walk_packages(curvopt.__path__, "curvopt.")
  if not m.name.endswith(("demo", "__main__"))
)


def _float32_context():
  """Docstring examples show float32 outputs: run them with x64 off."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(False)
  return jax.experimental.disable_x64()  # older jax


@pytest.mark.parametrize("name", ["curvopt", *MODULES])
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  with _float32_context():
    for test in doctest.DocTestFinder().find(module, name):
      runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0


def _public_functions():
  for module in (curvopt, curvopt.transforms):
    for name in dir(module):
      obj = getattr(module, name)
      is_function = inspect.isfunction(obj) or isinstance(obj, functools.partial)
      if callable(obj) and not name.startswith("_") and is_function:
        yield name, obj


@pytest.mark.parametrize("name, fn", list(_public_functions()))
def test_public_functions_have_an_example_and_a_reference(name, fn):
  doc = fn.__doc__ or ""
  assert ">>>" in doc, f"{name} has no runnable example"
  assert "References:" in doc or name in _NO_PAPER, f"{name} cites no paper"


# Plain linear-algebra plumbing with no paper behind it.
_NO_PAPER = {
  "all_finite",
  "flax_averaging_axes",
  "spatial_average",
  "compose",
  "diagonal_operator",
  "linear_operator",
  "random_vector",
  "restrict",
  "hvp",
  "value_grad_hvp",
  "is_symmetric",
  "is_positive_semidefinite",
  "dataset_operator",
  "preconditioned",
  "masked",
  "multi_transform",
}


def test_readme_quickstart_runs():
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.S).group(1)
  namespace: dict = {}
  with _float32_context():
    exec(compile(block, "README quick start", "exec"), namespace)
    import jax.numpy as jnp

    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jnp.arange(16) % 3
    sharp, top5, trace = namespace["curvature"](params, x, y, jax.random.key(1))
  assert top5.shape == (5,) and float(sharp.sharpness) == pytest.approx(float(top5[0]), rel=1e-4)
  assert int(sharp.num_examples) == 16 and float(trace) > 0


def test_readme_test_command_is_what_ci_runs():
  readme = (ROOT / "README.md").read_text()
  lines = readme.splitlines()
  marker = next(i for i, line in enumerate(lines) if line.startswith("<!-- test-command"))
  assert lines[marker + 1] == "```bash" and "pytest" in lines[marker + 2]
  assert "README.md" in (ROOT / ".ci" / "run").read_text()


# --- Layers import downward only. ------------------------------------------

# Layer 0 modules (helpers) may import the helpers listed before them; every
# layer after them may import layer 0 and the layers before it, never one after it.
_LAYER_ZERO = (
  "curvopt._checks",
  "curvopt._jaxpr",
  "curvopt._xla_cpu",
  "curvopt._tree",
  "curvopt._matrix_roots",
  "curvopt._cubic_subproblem",
)
_LAYERS = ("curvopt.oracles", "curvopt.estimators", "curvopt.transforms", "curvopt.alias")
_ALLOWED = {
  **{module: set(_LAYER_ZERO[:i]) for i, module in enumerate(_LAYER_ZERO)},
  **{layer: {*_LAYER_ZERO, *_LAYERS[: i + 1]} for i, layer in enumerate(_LAYERS)},
}


def _curvopt_imports(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("curvopt"):
      found |= {f"{node.module}.{alias.name}" for alias in node.names}
    elif isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name.startswith("curvopt")}
  return found


@pytest.mark.parametrize("layer", sorted(_ALLOWED))
def test_layer_imports_only_lower_layers(layer):
  parts = layer.split(".")[1:]
  base = ROOT / "curvopt" / pathlib.Path(*parts)
  files = (
    [base.with_suffix(".py")] if base.with_suffix(".py").exists() else sorted(base.glob("*.py"))
  )
  allowed = _ALLOWED[layer]
  for path in files:
    for name in _curvopt_imports(path):
      assert any(name == a or name.startswith(a + ".") for a in allowed), (
        f"{path.name} imports {name}"
      )


def test_core_never_imports_bench():
  for path in (ROOT / "curvopt").rglob("*.py"):
    if "bench" in path.parts:
      continue
    assert not any("bench" in name for name in _curvopt_imports(path)), path


@pytest.mark.skipif(
  shutil.which("ruff") is None and not (pathlib.Path(sys.executable).parent / "ruff").exists(),
  reason="ruff is not installed",
)
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(args):
  ruff = pathlib.Path(sys.executable).parent / "ruff"
  executable = str(ruff) if ruff.exists() else "ruff"
  result = subprocess.run([executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.subprocess
def test_demo_runs():
  with contextlib.suppress(ImportError):
    import sklearn  # noqa: F401
  result = subprocess.run(
    [sys.executable, "-m", "curvopt.bench.demo", "--steps", "30"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  assert "sharpness (largest Hessian eigenvalue) on 1438 examples" in result.stdout
  assert "top-5 eigenvalues" in result.stdout


def test_no_module_imports_a_private_name_from_another():
  """Private modules (`_tree`, `_checks`) are the internal API; their `_names` are not."""
  offenders = []
  for path in sorted((ROOT / "curvopt").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("curvopt")):
        continue
      for alias in node.names:
        module = ROOT / pathlib.Path(*f"{node.module}.{alias.name}".split("."))
        is_module = module.with_suffix(".py").exists() or (module / "__init__.py").exists()
        if alias.name.startswith("_") and not is_module:
          offenders.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
  assert not offenders, offenders


def test_named_optimizers_use_only_the_public_transforms():
  for path in sorted((ROOT / "curvopt" / "alias").glob("*.py")):
    private = re.findall(r"from curvopt\.transforms\.(_\w+)", path.read_text())
    assert not private, f"{path.name} imports curvopt.transforms.{private[0]}"
