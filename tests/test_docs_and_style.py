"""The docs run, the code is ruff-clean, and the layers import downward only."""

import ast
import contextlib
import doctest
import functools
import importlib
import inspect
import math
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
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
    state = namespace["opt"].init(params)
    before = float(namespace["loss"](params, x, y))
    for _ in range(20):
      params, state = namespace["train_step"](params, state, x, y)
    after = float(namespace["loss"](params, x, y))
  assert top5.shape == (5,) and float(sharp.sharpness) == pytest.approx(float(top5[0]), rel=1e-4)
  assert int(sharp.num_examples) == 16 and float(trace) > 0
  assert math.isfinite(after) and after < 0.9 * before, (before, after)


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
    [base.with_suffix(".py")] if base.with_suffix(".py").exists() else sorted(base.rglob("*.py"))
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


@pytest.mark.slow  # the demo end to end in a subprocess
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
    private = re.findall(r"from curvopt\.transforms\.((?:\w+\.)*_\w+)", path.read_text())
    assert not private, f"{path.name} imports curvopt.transforms.{private[0]}"


# --- The README's tables are true of the code. ------------------------------


def _readme_table(marker: str) -> list[list[str]]:
  """The rows (cells) of the README table right after `<!-- marker ... -->`."""
  lines = (ROOT / "README.md").read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- {marker}"))
  rows = []
  for line in lines[start + 3 :]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
  return rows


def _named_optimizers() -> set[str]:
  import curvopt.alias

  return {name for name in dir(curvopt.alias) if inspect.isfunction(getattr(curvopt.alias, name))}


def _optimizer_rows() -> dict[str, str]:
  rows = {}
  for cells in _readme_table("optimizer-table"):
    name = re.match(r"\[`(\w+)`\]\(docs/choosing-an-optimizer\.md#(\w+)\)", cells[0])
    assert name and name.group(1) == name.group(2), f"malformed optimizer row {cells[0]!r}"
    rows[name.group(1)] = cells[2]
  return rows


def test_readme_optimizer_table_lists_exactly_the_named_optimizers():
  rows = _optimizer_rows()
  assert set(rows) == _named_optimizers()
  guide = (ROOT / "docs" / "choosing-an-optimizer.md").read_text()
  for name in rows:
    assert f"### `{name}`\n" in guide, f"the README links to a missing section: {name}"


def _build(name: str):
  fn = getattr(curvopt, name)
  if name in ("sam", "gam"):
    return fn(optax.sgd(0.1))
  return fn(0.1)


@pytest.mark.parametrize("name", sorted(_named_optimizers()))
def test_readme_optimizer_table_names_the_extra_arguments_update_needs(name):
  """An update without extra arguments fails naming what the README's row lists, and
  succeeds when the row lists none (or only under a non-default setting)."""
  listed = _optimizer_rows()[name]
  needed = [arg for arg in ("value_fn", "model_fn") if f"`{arg}`" in listed]
  conditional = "with" in listed or listed.startswith("as ")
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  opt = _build(name)
  state = opt.init(params)
  call = lambda: jax.eval_shape(lambda s: opt.update(params, s, params), state)
  if needed and not conditional:
    with pytest.raises((TypeError, ValueError), match=needed[0]):
      call()
  else:
    call()


def test_readme_estimator_table_names_real_functions_and_covers_every_estimator():
  listed = set()
  for cells in _readme_table("estimator-table"):
    listed |= set(re.findall(r"`(\w+)`", cells[0]))
  for name in listed:
    assert callable(getattr(curvopt, name, None) or getattr(curvopt.estimators, name)), name
  estimators = {
    name
    for name in dir(curvopt.estimators)
    if inspect.isfunction(getattr(curvopt.estimators, name))
  }
  assert estimators <= listed, f"missing from the README: {sorted(estimators - listed)}"


def test_readme_fits_on_a_screen():
  assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


def test_getting_started_guide_runs():
  """The guide's code blocks, in order, as one program (the flax.nnx step included)."""
  guide = (ROOT / "docs" / "getting-started.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
  namespace: dict = {}
  with _float32_context():
    exec(compile("\n".join(blocks), "getting-started.md", "exec"), namespace)
    loss = namespace["train_step"](namespace["model"], namespace["optimizer"], *_xy(namespace))
    sharpness = namespace["curvature"](namespace["params"], *_xy(namespace), jax.random.key(0))
  assert math.isfinite(float(loss)) and float(sharpness) > 0
  assert float(namespace["value"]) < 0.69  # the loop trained: below log(2) at the start


def _xy(namespace):
  return namespace["x"], namespace["y"]
