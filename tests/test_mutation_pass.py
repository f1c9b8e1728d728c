"""The mutation-pass script never reports a pass on changed code, or a failed run, as current."""

import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import mutation_pass

MODULE = "curvopt/transforms/_cadence.py"


def _workspace_with(tmp_path, text):
  copy = tmp_path / MODULE
  copy.parent.mkdir(parents=True)
  copy.write_text(text)
  return tmp_path


def test_a_docstring_or_comment_edit_is_not_a_code_change_but_an_edit_is(tmp_path):
  source = (mutation_pass.REPO / MODULE).read_text()
  assert not mutation_pass._stale(MODULE, _workspace_with(tmp_path / "same", source))
  reworded = source.replace('"""', '"""Reworded. ', 1) + "\n# a comment\n"
  assert not mutation_pass._stale(MODULE, _workspace_with(tmp_path / "docs", reworded))
  changed = source + "\n\ndef added():\n  return 1\n"
  assert mutation_pass._stale(MODULE, _workspace_with(tmp_path / "code", changed))
  assert mutation_pass._stale(MODULE, tmp_path / "missing")


def test_a_rerun_of_a_changed_module_is_refused(tmp_path, monkeypatch):
  workspace = _workspace_with(tmp_path, "x = 1\n")
  monkeypatch.setattr(mutation_pass, "_workspace_of", lambda module: workspace)
  with pytest.raises(SystemExit, match=r"changed since its pass.*only a full pass"):
    mutation_pass.run_module(MODULE, 1, rerun=True)


def test_a_failed_mutmut_run_raises_instead_of_reporting_old_statuses(tmp_path, monkeypatch):
  monkeypatch.setattr(mutation_pass, "_workspace", lambda module: tmp_path)

  def failing(*args, stdout, **kwargs):
    stdout.write("failed to collect stats. runner returned 1\n")
    return subprocess.CompletedProcess(args, 1)

  monkeypatch.setattr(mutation_pass.subprocess, "run", failing)
  with pytest.raises(SystemExit, match=r"(?s)mutmut failed on .*exit 1.*failed to collect stats"):
    mutation_pass.run_module(MODULE, 1)
