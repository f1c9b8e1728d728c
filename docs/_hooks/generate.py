"""mkdocs hook: pages generated from the repository at build time.

- `api/`: one page per public name, rendered by mkdocstrings from its docstring, and an
  index per module. A public name is one in the module's `__all__`, or, for modules that
  re-export with `from x import y as y`, every attribute not starting with `_` that is not
  a module.
- `notebooks/`: each jupytext notebook as a page, with the figures and numbers of its
  committed full-mode run (nothing is executed at build time).
- `results/`: the committed benchmark results (tables and plots), so the guides can link
  to them and the links are checked.
- `changelog.md`: `CHANGELOG.md`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pathlib
import re
import types

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (title, module): the API sections, in the order of the layers.
API_MODULES = [
  ("Optimizers and matrix functions", "curvopt"),
  ("Operators (curvopt.oracles)", "curvopt.oracles"),
  ("Estimators (curvopt.estimators)", "curvopt.estimators"),
  ("Transforms (curvopt.transforms)", "curvopt.transforms"),
  ("Checkpoints (curvopt.checkpoint)", "curvopt.checkpoint"),
  ("flax.nnx (curvopt.nnx)", "curvopt.nnx"),
  ("flax.linen (curvopt.linen)", "curvopt.linen"),
]


def public_names(module_name: str) -> list[str]:
  """The public names of a module (see the module docstring)."""
  module = importlib.import_module(module_name)
  if hasattr(module, "__all__"):
    return sorted(module.__all__)
  return sorted(
    name
    for name in dir(module)
    if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
  )


def api_entries() -> dict[str, list[str]]:
  """Module -> the names it documents. A top-level name that re-exports a submodule's
  object is documented once, under the submodule (the page says it is also top level)."""
  entries = {module: public_names(module) for _, module in API_MODULES}
  top = importlib.import_module("curvopt")
  documented_below = {
    id(getattr(importlib.import_module(module), name))
    for module, names in entries.items()
    if module != "curvopt"
    for name in names
  }
  entries["curvopt"] = [
    name for name in entries["curvopt"] if id(getattr(top, name)) not in documented_below
  ]
  return entries


def _summary(obj: object) -> str:
  doc = inspect.getdoc(obj) if callable(obj) or inspect.isclass(obj) else None
  return doc.strip().split("\n")[0].replace("|", "\\|") if doc else ""


def _api_pages(entries: dict[str, list[str]]) -> dict[str, str]:
  top = importlib.import_module("curvopt")
  pages = {}
  index = ["# API", "", "Every public name, generated from its docstring.", ""]
  for title, module_name in API_MODULES:
    module = importlib.import_module(module_name)
    names = entries[module_name]
    folder = module_name.replace(".", "/")
    index += [f"## {title}", "", "| name | summary |", "|---|---|"]
    for name in names:
      obj = getattr(module, name)
      also = ""
      if module_name != "curvopt" and getattr(top, name, None) is obj:
        also = f"\n\nAlso available as `curvopt.{name}`.\n"
      pages[f"api/{folder}/{name}.md"] = (
        f"# `{module_name}.{name}`{also}\n\n::: {module_name}.{name}\n"
        "    options:\n      show_root_heading: false\n"
      )
      index.append(f"| [`{module_name}.{name}`]({folder}/{name}.md) | {_summary(obj)} |")
    index.append("")
  pages["api/index.md"] = "\n".join(index)
  return pages


def _notebook_page(path: pathlib.Path) -> str:
  import jupytext

  notebook = jupytext.read(path)
  figures = ROOT / "notebooks" / "figures"
  out = [
    f"!!! note\n    Rendered from `notebooks/{path.name}` with the figures and numbers of its "
    f"committed full-mode run (not rerun when the site is built). Run it with "
    f"`cd notebooks && python {path.name}`; `CURVOPT_NOTEBOOK_FAST=1` is the small "
    "version the tests run.\n"
  ]
  for cell in notebook.cells:
    if cell.cell_type == "markdown":
      out.append(cell.source + "\n")
    elif cell.cell_type == "code" and cell.source.strip():
      out.append(f"```python\n{cell.source}\n```\n")
      for name in re.findall(r"save_figure\(\s*\w+\s*,\s*[\"']([\w-]+)[\"']", cell.source):
        if (figures / f"{name}.png").exists():
          out.append(f"![{name}](figures/{name}.png)\n")
  numbers = figures / f"{path.stem}.json"
  if numbers.exists():
    recorded = json.dumps(json.loads(numbers.read_text()), indent=2)
    out.append(f"## Numbers recorded by the full run\n\n```json\n{recorded}\n```\n")
  return "\n".join(out)


def _notebooks() -> tuple[dict[str, str], dict[str, pathlib.Path]]:
  pages, assets = {}, {}
  rows = []
  for path in sorted((ROOT / "notebooks").glob("[0-9]*.py")):
    pages[f"notebooks/{path.stem}.md"] = _notebook_page(path)
    rows.append(f"- [{path.stem}]({path.stem}.md)")
  for figure in sorted((ROOT / "notebooks" / "figures").glob("*.png")):
    assets[f"notebooks/figures/{figure.name}"] = figure
  readme = (ROOT / "notebooks" / "README.md").read_text()
  readme = re.sub(r"`(\d\d_\w+)\.py`", r"[`\1`](\1.md)", readme)
  pages["notebooks/index.md"] = readme
  return pages, assets


def _results() -> tuple[dict[str, str], dict[str, pathlib.Path]]:
  pages, assets = {}, {}
  base = ROOT / "benchmarks" / "results"
  listing = [
    "# Benchmark results",
    "",
    "The committed result folders of `benchmarks/results/`, as the runner and the timing",
    "scripts wrote them. Each says at its top how it was made.",
    "",
  ]
  for path in sorted(base.rglob("*")):
    relative = path.relative_to(base)
    if not path.is_file() or "runs" in relative.parts or path.suffix not in {".md", ".png"}:
      continue
    target = f"results/{relative.as_posix()}"
    if path.suffix == ".md":
      pages[target] = path.read_text()
      listing.append(f"- [{relative.as_posix()}]({relative.as_posix()})")
    else:
      assets[target] = path
  pages["results/index.md"] = "\n".join(listing) + "\n"
  return pages, assets


_generated: dict[str, str] = {}
_assets: dict[str, pathlib.Path] = {}


def on_config(config, **kwargs):
  _generated.clear()
  _assets.clear()
  for pages, assets in (_notebooks(), _results()):
    _generated.update(pages)
    _assets.update(assets)
  entries = api_entries()
  _generated.update(_api_pages(entries))
  _generated["changelog.md"] = (ROOT / "CHANGELOG.md").read_text()

  notebooks = [{"Overview": "notebooks/index.md"}] + [
    {page.split("/")[-1][:-3]: page}
    for page in sorted(_generated)
    if page.startswith("notebooks/") and page != "notebooks/index.md"
  ]
  api = [{"Overview": "api/index.md"}]
  for title, module_name in API_MODULES:
    folder = module_name.replace(".", "/")
    api.append({title: [f"api/{folder}/{name}.md" for name in entries[module_name]]})
  results = [
    "results/index.md",
    *sorted(p for p in _generated if p.startswith("results/") and p != "results/index.md"),
  ]
  sections = {"Notebooks": notebooks, "API": api, "Benchmark results": results}
  for entry in config["nav"]:
    for key in list(entry) if isinstance(entry, dict) else []:
      if key in sections:
        entry[key] = sections[key]
  return config


def on_files(files, config, **kwargs):
  for uri, content in _generated.items():
    files.append(File.generated(config, uri, content=content))
  for uri, source in _assets.items():
    files.append(File.generated(config, uri, abs_src_path=str(source)))
  return files
