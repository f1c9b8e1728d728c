"""The runner's numbers can be trusted: each silent wrong result of issue 18, and the protocol."""

import csv
import fcntl
import json
import math
import shutil
import statistics
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import curvopt
from curvopt.bench import cli, config, optimizers, results, runner

SMALL = """
[benchmark]
name = "small"
seeds = [0]
steps = {steps}
eval_every = 10

[workloads.breast_cancer_logreg]

[optimizers.adam]
learning_rates = [0.01]
b1 = {b1}
"""


def _write(tmp_path, text, name="config.toml"):
  path = tmp_path / name
  path.write_text(text)
  return path


def _run(cfg, out) -> int:
  with jax.enable_x64(False):
    return cli.main(["run", str(cfg), "--out", str(out), "--quiet"])


def _summary_rows(out):
  return results.read_summary_csv(out / "summary.csv")


# 1. A changed spec is a new run; old results are never reported under a new config.


def test_a_changed_config_is_a_new_run_and_old_results_are_not_reported(tmp_path):
  out = tmp_path / "out"
  assert _run(_write(tmp_path, SMALL.format(steps=20, b1=0.9)), out) == 0
  (first,) = _summary_rows(out)
  assert first["steps_run"] == 20
  assert _run(_write(tmp_path, SMALL.format(steps=30, b1=0.9)), out) == 0
  (second,) = _summary_rows(out)  # only the new config's run is reported
  assert second["steps_run"] == 30 and second["run_id"] != first["run_id"]
  assert _run(_write(tmp_path, SMALL.format(steps=30, b1=0.5)), out) == 0
  (third,) = _summary_rows(out)
  assert third["spec"]["hyperparameters"]["b1"] == 0.5
  assert len({first["run_id"], second["run_id"], third["run_id"]}) == 3
  assert len(list((out / "runs").glob("*.jsonl"))) == 3


def _interrupted(spec, out, after):
  done = [0]

  class Stop(Exception):
    pass

  def count(n):
    done[0] += n
    if done[0] >= after:
      raise Stop

  with pytest.raises(Stop), jax.enable_x64(False):
    runner.run(spec, out, count)


def _shampoo_spec(block_size):
  raw = {
    "benchmark": {"steps": 40, "eval_every": 10, "checkpoint_every": 10, "seeds": [0]},
    "workloads": {"digits_mlp": {}},
    "optimizers": {"shampoo": {"learning_rates": [0.01], "block_size": block_size}},
  }
  (spec,) = config.parse(raw).runs
  return spec


def test_a_checkpoint_of_another_spec_is_never_resumed(tmp_path):
  old, new = _shampoo_spec(32), _shampoo_spec(16)
  assert old.run_id != new.run_id
  _interrupted(old, tmp_path / "a", after=25)
  assert (tmp_path / "a" / "runs" / f"{old.run_id}.ckpt.npz").exists()
  # Planted under the new run's name (as a hand-copied or colliding file would be): the
  # spec recorded inside it differs, so the run starts afresh instead of crashing.
  runs = tmp_path / "a" / "runs"
  shutil.copy(runs / f"{old.run_id}.ckpt.npz", runs / f"{new.run_id}.ckpt.npz")
  shutil.copy(runs / f"{old.run_id}.jsonl", runs / f"{new.run_id}.jsonl")
  with jax.enable_x64(False):
    planted = runner.run(new, tmp_path / "a")
    clean = runner.run(new, tmp_path / "b")
  assert planted["steps_run"] == 40
  assert planted["final_train_loss"] == clean["final_train_loss"]
  records = results.read_records(runs / f"{new.run_id}.jsonl")
  assert records[0]["spec"]["hyperparameters"]["block_size"] == 16


# 2. Distinct grid values are distinct runs.


def test_close_learning_rates_are_distinct_runs():
  raw = {
    "benchmark": {"steps": 10, "seeds": [0, 1]},
    "workloads": {"digits_mlp": {}},
    "optimizers": {"sgd": {"learning_rates": [0.1000001, 0.1000004]}},
  }
  runs = config.parse(raw).runs
  assert len({r.run_id for r in runs}) == 4
  assert len({r.trial_id for r in runs}) == 2
  assert {r.learning_rate for r in runs} == {0.1000001, 0.1000004}


def test_repeated_grid_values_are_rejected():
  raw = {
    "benchmark": {"steps": 10},
    "workloads": {"digits_mlp": {}},
    "optimizers": {"sgd": {"learning_rates": [0.1, 0.1]}},
  }
  with pytest.raises(config.ConfigError, match=r"optimizers.sgd.learning_rates has repeated"):
    config.parse(raw)


# 3. A run whose steps the guard skipped is failed, visibly.


def test_a_run_whose_steps_were_all_skipped_is_marked_failed(tmp_path, monkeypatch):
  # A learning rate of NaN that passed every check: each update is NaN, so the guard skips it.
  poisoned = optimizers.OptimizerSpec(
    "poisoned",
    "SGD whose learning rate is NaN, inside the guard",
    lambda learning_rate: curvopt.transforms.skip_nonfinite(optax.sgd(math.nan)),
  )
  monkeypatch.setitem(optimizers.OPTIMIZERS, "poisoned", poisoned)
  monkeypatch.setitem(config.OPTIMIZERS, "poisoned", poisoned)
  monkeypatch.setitem(runner.OPTIMIZERS, "poisoned", poisoned)
  raw = """
[benchmark]
seeds = [0, 1, 2]
steps = 20
eval_every = 10
schedule = "constant"
baseline = "adam"

[workloads.breast_cancer_logreg]

[optimizers.adam]
learning_rates = [0.01]

[optimizers.poisoned]
learning_rates = [0.01]
"""
  out = tmp_path / "out"
  assert _run(_write(tmp_path, raw), out) == 0
  rows = {r["optimizer"]: r for r in _summary_rows(out) if r["seed"] == 0}
  bad = rows["poisoned"]
  assert bad["failed"] and bad["failure"] == "guard skipped 20 of 20 steps"
  assert bad["guard_skipped"] == 20 and bad["steps_to_target"] is None
  assert not rows["adam"]["failed"] and rows["adam"]["guard_skipped"] == 0
  log = results.read_records(out / "runs" / f"{bad['run_id']}.jsonl")
  assert [r["guard_skipped"] for r in log if "step" in r] == [0, 10, 20]
  table = (out / "results.md").read_text()
  line = next(line for line in table.splitlines() if "| poisoned |" in line)
  assert "3/3: seed 0: guard skipped 20 of 20 steps" in line and "| 60 / 0 of 60 |" in line


# 4. Everything is validated before anything trains or any folder is created.


@pytest.mark.parametrize(
  ("edit", "message"),
  [
    (
      ("optimizers", "shampoo", {"learning_rates": [0.01], "block_size": 0}),
      r"optimizers.shampoo cannot be built .*block_size",
    ),
    (("workloads", "digits_mlp", {"batch_size": 0}), r"workloads.digits_mlp: batch_size must be"),
    (("benchmark", "max_seconds", -1), r"benchmark.max_seconds must be a positive number"),
    (("workloads", "digits_mlp", {"max_seconds": -1}), r"digits_mlp.max_seconds must be"),
    (("workloads", "digits_mlp", {"target": math.nan}), r"digits_mlp.target .* not a finite"),
    (("optimizers", "sgd", {"learning_rates": [math.inf]}), r"sgd.learning_rates\[0\] .*finite"),
    (("optimizers", "adam", {"learning_rates": [0.1], "b1": math.nan}), r"adam.b1 .*not a finite"),
    (
      ("workloads", "quadratic", {"condition_number": -10.0}),
      r"workloads.quadratic: condition_number must be a finite number >= 1",
    ),
    (("benchmark", "name", "../../x"), r"benchmark.name must be letters"),
    (("benchmark", "schedule", "cosine"), r"benchmark.schedule must be one of constant"),
    (
      ("optimizers", "egn", {"learning_rates": [1.0], "schedule": "warmup_cosine"}),
      r"optimizers.egn.schedule: egn takes a constant learning rate only",
    ),
  ],
)
def test_bad_configs_exit_2_before_any_training_or_folder(tmp_path, capsys, edit, message):
  raw = {
    "benchmark": {"steps": 10, "seeds": [0]},
    "workloads": {"digits_mlp": {}},
    "optimizers": {"sgd": {"learning_rates": [0.1]}},
  }
  section, key, value = edit
  if section == "workloads" and key not in raw["workloads"]:
    raw["workloads"][key] = {}
  if isinstance(value, dict):
    raw[section].setdefault(key, {}).update(value)
  else:
    raw[section][key] = value
  cfg = tmp_path / "config.json"
  cfg.write_text(json.dumps(raw))
  toml = tmp_path / "config.toml"
  toml.write_text(_to_toml(raw))
  out = tmp_path / "out"
  assert cli.main(["run", str(toml), "--out", str(out), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  assert __import__("re").search(message, err), err
  assert not out.exists()


def _to_toml(raw: dict) -> str:
  def value(v):
    if isinstance(v, float) and math.isnan(v):
      return "nan"
    if isinstance(v, float) and math.isinf(v):
      return "inf"
    return json.dumps(v)

  lines = []
  for section, table in raw.items():
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if scalars:
      lines.append(f"[{section}]")
      lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
    for name, sub in table.items():
      if isinstance(sub, dict):
        lines.append(f"[{section}.{name}]")
        lines += [
          f"{k} = {value(v) if not isinstance(v, list) else _list(v)}" for k, v in sub.items()
        ]
  return "\n".join(lines) + "\n"


def _list(values):
  return "[" + ", ".join("inf" if v == math.inf else json.dumps(v) for v in values) + "]"


# 5. One process per results folder.


def test_a_second_process_on_the_same_folder_stops_with_a_clear_message(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import fcntl, sys, time\n"
      f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
      "f.write('pid 4242'); f.flush(); print('locked', flush=True); time.sleep(60)",
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    assert _run(_write(tmp_path, SMALL.format(steps=10, b1=0.9)), out) == 2
    err = capsys.readouterr().err
    assert "is in use by another curvopt-bench run (pid 4242)" in err
    assert not (out / "runs").exists()
  finally:
    holder.kill()
    holder.wait()
  # Released when its holder dies (even by a kill): the folder is usable again.
  assert _run(_write(tmp_path, SMALL.format(steps=10, b1=0.9)), out) == 0


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
  with cli._locked(tmp_path), pytest.raises(cli._FolderBusy, match="in use"):  # noqa: SIM117
    with cli._locked(tmp_path):
      pass
  with open(tmp_path / ".lock") as f:  # released after the block
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# 6. Wall-clock noise is not a win.


def _summary(optimizer, seed, steps, median_ms, measured_s, trial_id=None):
  spec = {
    "workload": "w",
    "workload_options": {},
    "steps": 200,
    "max_seconds": None,
    "eval_every": 25,
    "target": 0.5,
  }
  return {
    "run_id": f"w__{optimizer}__{seed}",
    "trial_id": trial_id or optimizer,
    "workload": "w",
    "optimizer": optimizer,
    "trial": 0,
    "learning_rate": 0.01,
    "tuned": {"learning_rate": 0.01},
    "schedule": "warmup_cosine",
    "seed": seed,
    "steps_run": 200,
    "final_train_loss": 0.1,
    "test_metric": "acc",
    "final_test_metric": 0.9,
    "target": 0.5,
    "steps_to_target": steps,
    "time_to_target_s": measured_s,
    "robust_time_to_target_s": steps * median_ms / 1e3,
    "median_step_ms": median_ms,
    "robust_step_ms": median_ms,
    "compile_s": 1.0,
    "optimizer_state_bytes": 1024,
    "guard_skipped": 0,
    "guard_resets": 0,
    "failed": False,
    "failure": None,
    "spec": spec,
  }


def test_a_few_slow_steps_do_not_make_a_win():
  # The committed Shampoo table's case: both reach the target in 100 steps at 3.55 and
  # 3.71 ms per step, but Adam's measured sum includes a few slow steps (0.512 s).
  summaries = [
    *(_summary("shampoo", s, 100, 3.55 + 0.2 * (s - 1), 0.351) for s in range(3)),
    *(_summary("adam", s, 100, 3.71 + 0.2 * (s - 1), 0.512) for s in range(3)),
  ]
  best = results.best_per_optimizer(summaries)["w"]
  assert results.verdict(best["shampoo"], best["adam"]) == "not distinguishable"
  table = results.markdown_table(summaries, baseline="adam")
  shampoo = next(line for line in table.splitlines() if "| shampoo |" in line)
  assert "0.96x, not distinguishable" in shampoo


def test_ranking_uses_the_robust_time_not_the_measured_sum():
  summaries = [
    *(_summary("a", s, 100, 1.0, 0.5) for s in range(3)),  # robust 0.1 s, measured 0.5 s
    *(_summary("b", s, 200, 1.0, 0.3) for s in range(3)),  # robust 0.2 s, measured 0.3 s
  ]
  table = results.markdown_table(summaries, baseline="b")
  assert "| 1 | a |" in table and "| 2 | b |" in table
  line_a = next(line for line in table.splitlines() if "| 1 | a |" in line)
  assert "0.50x, faster" in line_a


def test_fewer_than_three_seeds_never_claim_a_win():
  summaries = [_summary("a", 0, 100, 1.0, 0.1), _summary("b", 0, 300, 1.0, 0.3)]
  best = results.best_per_optimizer(summaries)["w"]
  assert results.verdict(best["a"], best["b"]).startswith("not distinguishable")


def test_bootstrap_interval_of_the_median():
  median, low, high = results.median_interval([1.0, 2.0, 3.0, 4.0, 100.0])
  assert median == 3.0 and low in (1.0, 2.0) and high in (4.0, 100.0)
  assert results.median_interval([5.0]) == (5.0, 5.0, 5.0)
  median, low, high = results.median_interval([1.0, 2.0, math.inf])
  assert median == 2.0 and low == 1.0 and high == math.inf


def test_performance_profile_and_area_score_are_exact():
  # Ratios to the fastest of 1, 2.5 and a miss: area = (3 + 1.5 + 0) / (3 * 3).
  assert results.profile_score([1.0, 2.5, math.inf]) == pytest.approx(4.5 / 9)
  assert results.profile_score([5.0]) == 0.0 and results.profile_score([1.0]) == 1.0


# 7. Unusable output folders and interrupted writes.


def test_an_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  cfg = _write(tmp_path, SMALL.format(steps=10, b1=0.9))
  for out in (blocker, blocker / "inside"):
    assert _run(cfg, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(blocker) in err


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0, reason="root")
def test_an_out_without_write_permission_is_a_one_line_error(tmp_path, capsys):
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o500)
  assert _run(_write(tmp_path, SMALL.format(steps=10, b1=0.9)), locked / "out") == 2
  assert capsys.readouterr().err.startswith("error: cannot write")


def test_leftover_temporary_files_are_removed_on_the_next_run(tmp_path):
  out = tmp_path / "out"
  (out / "plots").mkdir(parents=True)
  (out / "plots" / "tmpabc.tmp").write_bytes(b"half a png")
  (out / "tmpdef.tmp").write_text("{")
  assert _run(_write(tmp_path, SMALL.format(steps=10, b1=0.9)), out) == 0
  assert not list(out.rglob("*.tmp"))


def test_plots_are_written_atomically(tmp_path, monkeypatch):
  from curvopt.bench import plots

  written = []
  real = results.write_atomic
  monkeypatch.setattr(results, "write_atomic", lambda p, t: (written.append(p), real(p, t)))
  summaries = [*(_summary("a", s, 100, 1.0, 0.1) for s in range(3))]
  plots.write_profile_plot(tmp_path / "profile.png", results.best_per_optimizer(summaries))
  assert written == [tmp_path / "profile.png"]


# The protocol: schedules, search spaces, seeds, score, compare.


def test_schedules_warm_up_and_decay_to_zero():
  cosine = optimizers.learning_rate_schedule(0.1, "warmup_cosine", 100, 0.1)
  linear = optimizers.learning_rate_schedule(0.1, "warmup_linear", 100, 0.1)
  for schedule in (cosine, linear):
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
  assert float(cosine(55)) == pytest.approx(0.05, rel=1e-5)  # half way through the cosine
  assert float(linear(55)) == pytest.approx(0.05, rel=1e-5)
  assert optimizers.learning_rate_schedule(0.1, "constant", 100, 0.1) == 0.1


def test_search_space_trials_are_quasi_random_reproducible_and_in_range():
  raw = {
    "benchmark": {"steps": 10, "seeds": [0]},
    "workloads": {"digits_mlp": {}},
    "optimizers": {
      "adam": {
        "search": {
          "trials": 6,
          "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
          "b1": [0.8, 0.9, 0.95],
          "b2": {"low": 0.99, "high": 0.999},
        }
      },
      "sgd": {"search": {"learning_rate": [0.1, 0.3]}},
    },
  }
  runs = config.parse(raw).runs
  adam = [r for r in runs if r.optimizer == "adam"]
  assert len(adam) == 6 and len({r.trial_id for r in adam}) == 6
  assert all(1e-4 <= r.learning_rate <= 1e-1 for r in adam)
  hypers = [dict(r.hyperparameters) for r in adam]
  assert {h["b1"] for h in hypers} <= {0.8, 0.9, 0.95} and len({h["b1"] for h in hypers}) > 1
  assert all(0.99 <= h["b2"] <= 0.999 and h["eps"] == 1e-8 for h in hypers)
  assert adam[0].tuned == ("b1", "b2", "learning_rate")
  # Low-discrepancy: the 6 learning rates spread over the log range, not clumped.
  logs = sorted(np.log10([r.learning_rate for r in adam]))
  assert logs[0] < -3.0 and logs[-1] > -2.0
  assert [r.run_id for r in config.parse(raw).runs] == [r.run_id for r in runs]
  # The benchmark-wide trial budget applies where a search space does not set its own.
  # A space of two choices is searched exhaustively: two trials, not four.
  assert sorted(r.learning_rate for r in runs if r.optimizer == "sgd") == [0.1, 0.3]


@pytest.mark.parametrize(
  ("search", "message"),
  [
    ({"trials": 2}, r"search.learning_rate is required"),
    ({"learning_rate": {"low": 0.1, "high": 0.01}}, r"low must be below high"),
    ({"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, r"log range needs low > 0"),
    ({"learning_rate": [0.1], "b3": [0.9]}, r"unknown key optimizers.adahessian.search.b3"),
    ({"learning_rate": [0.1], "b1": {"low": 0.5, "high": 2.0}}, r"cannot be built .*b1"),
  ],
)
def test_bad_search_spaces_are_named(search, message):
  raw = {
    "benchmark": {"steps": 10, "seeds": [0]},
    "workloads": {"digits_mlp": {}},
    "optimizers": {"adahessian": {"search": search}},
  }
  with pytest.raises(config.ConfigError, match=message):
    config.check_buildable(config.parse(raw))


def test_compare_combines_folders_and_refuses_different_protocols(tmp_path, capsys):
  a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  assert _run(_write(tmp_path, SMALL.format(steps=20, b1=0.9)), a) == 0
  other = SMALL.format(steps=20, b1=0.9).replace("[optimizers.adam]", "[optimizers.sgd]")
  assert _run(_write(tmp_path, other.replace("b1 = 0.9\n", "")), b) == 0
  merged = tmp_path / "merged"
  code = cli.main(["compare", str(a), str(b), "--baseline", "adam", "--out", str(merged)])
  assert code == 0
  table = (merged / "results.md").read_text()
  assert "| adam |" in table and "| sgd |" in table and "vs adam" in table
  assert (merged / "performance_profile.png").stat().st_size > 1000
  assert _run(_write(tmp_path, SMALL.format(steps=30, b1=0.9)), c) == 0
  capsys.readouterr()
  assert cli.main(["compare", str(a), str(c), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "breast_cancer_logreg was run under different protocols" in err and "steps" in err


def test_compare_with_the_baseline_in_both_folders_takes_the_first_folders(tmp_path, capsys):
  import shutil

  a, b = tmp_path / "a", tmp_path / "b"
  assert _run(_write(tmp_path, SMALL.format(steps=20, b1=0.9)), a) == 0
  shutil.copytree(a, b)
  capsys.readouterr()
  assert (
    cli.main(
      ["compare", str(a), str(b), "--baseline", "adam", "--quiet", "--out", str(tmp_path / "m")]
    )
    == 0
  )
  table = (tmp_path / "m" / "results.md").read_text()
  assert (
    "The baseline is adam from a (the first folder named that ran it; it also ran in b)" in table
  )
  row = next(
    line for line in table.splitlines() if line.startswith("| ") and "| adam [b] |" in line
  )
  cells = [c.strip() for c in row.split("|")]
  assert cells[11] not in ("—", "baseline"), row  # compared with adam [a], not left empty
  assert "| adam [a] |" in table and "| baseline |" in table
  assert cli.main(["compare", str(a), "--baseline", "adamw", "--quiet"]) == 2
  assert "--baseline 'adamw' ran in none of the folders" in capsys.readouterr().err


def _timed(step_seconds, eval_every=25):
  """Evaluation records of a run whose step `i` (1-based) took `step_seconds[i - 1]`."""
  elapsed = np.concatenate([[0.0], np.cumsum(step_seconds)])
  steps = [*range(0, len(step_seconds), eval_every), len(step_seconds)]
  return [{"step": s, "time": float(elapsed[s])} for s in dict.fromkeys(steps)]


def test_robust_step_time_counts_periodic_refreshes_at_their_frequency():
  # A 10x step every 10 steps: the median of single steps (1 ms) drops it; the true
  # cost is 1.9 ms a step, which every 50-step window carries.
  times = np.where(np.arange(1, 301) % 10 == 0, 10e-3, 1e-3)
  assert statistics.median(times) == 1e-3
  assert results.robust_step_seconds(_timed(times)) == pytest.approx(1.9e-3)
  # Evaluated every 30 steps: windows of 60 steps, still whole periods.
  assert results.robust_step_seconds(_timed(times, 30)) == pytest.approx(1.9e-3)


def test_robust_step_time_ignores_a_few_slow_windows_and_keeps_the_remainder():
  times = np.full(300, 1e-3)
  times[60:90] = 50e-3  # the machine stalled for 30 steps: one window of six
  assert results.robust_step_seconds(_timed(times)) == pytest.approx(1e-3)
  assert math.fsum(times) / 300 > 5e-3  # the measured mean moved fivefold
  # 130 steps: windows of 50 and 80 (the 30-step remainder joins the last window).
  times = np.concatenate([np.full(50, 1e-3), np.full(80, 2e-3)])
  assert results.robust_step_seconds(_timed(times)) == pytest.approx(1.5e-3)
  # Under one window: the plain mean.
  assert results.robust_step_seconds(_timed(np.full(20, 3e-3))) == pytest.approx(3e-3)
  assert math.isnan(results.robust_step_seconds([{"step": 0, "time": 0.0}]))
  assert math.isnan(results.robust_step_seconds([]))


def test_summaries_read_back_use_the_windowed_step_time(tmp_path):
  # A log written before the windowed step time: its summary holds steps x the median
  # step; reading it back recomputes the robust time from its records.
  times = np.where(np.arange(1, 201) % 10 == 0, 10e-3, 1e-3)
  summary = {**_summary("shampoo", 0, 100, 1.0, 0.19), "event": "done"}
  del summary["robust_step_ms"]
  (tmp_path / "runs").mkdir()
  lines = [{"event": "spec"}, *_timed(times), summary]
  (tmp_path / "runs" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  [read] = results.run_summaries(tmp_path)
  assert read["robust_step_ms"] == pytest.approx(1.9)
  assert read["robust_time_to_target_s"] == pytest.approx(0.19)
  failed = {**summary, "failed": True, "failure": "guard skipped 150 of 200 steps"}
  (tmp_path / "runs" / "r.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in [*lines[:-1], failed])
  )
  assert results.run_summaries(tmp_path)[0]["robust_time_to_target_s"] is None


def test_without_matplotlib_the_report_says_the_plots_were_skipped(tmp_path, monkeypatch, capsys):
  from curvopt.bench import plots

  monkeypatch.setattr(plots, "available", lambda: False)
  out = tmp_path / "out"
  assert _run(_write(tmp_path, SMALL.format(steps=20, b1=0.9)), out) == 0
  assert "plots not drawn: matplotlib is not installed" in (out / "results.md").read_text()
  assert "plots not drawn" in capsys.readouterr().err
  assert not list(out.glob("plots/*.png"))
  assert cli.main(["compare", str(out), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
  assert not (tmp_path / "merged" / "performance_profile.png").exists()


def test_compare_refuses_a_summary_written_before_the_windowed_step_time(tmp_path, capsys):
  out = tmp_path / "out"
  assert _run(_write(tmp_path, SMALL.format(steps=20, b1=0.9)), out) == 0
  with open(out / "summary.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  with open(out / "summary.csv", "w", newline="") as f:
    columns = [c for c in rows[0] if c != "robust_step_ms"]
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  capsys.readouterr()
  assert cli.main(["compare", str(out), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "lacks the columns robust_step_ms" in err and "curvopt-bench report" in err
