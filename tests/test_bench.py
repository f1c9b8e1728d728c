"""The benchmark runner: workloads, configs, outputs, report and resume."""

import inspect
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.bench import cli, config, runner
from curvopt.bench.optimizers import OPTIMIZERS, build_optimizer
from curvopt.bench.workloads import WORKLOADS

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (train inputs shape, train targets shape, number of parameters)
SHAPES = {
  "digits_mlp": ((1438, 64), (1438,), 4810),
  "mnist1d_cnn": ((4000, 40), (4000,), 23306),
  "breast_cancer_logreg": ((455, 30), (455,), 31),
  "diabetes_mlp": ((354, 10), (354, 1), 385),
  "char_transformer": ((93083, 1), (93083, 1), 111296),
  "quadratic": ((1, 1), (1, 1), 20),
  "rosenbrock": ((1, 1), (1, 1), 2),
  # At size "tiny"; the corpus's length depends on the Python version.
  "noisy_quadratic": ((1, 16), (1, 16), 16),
  "gpt_lm": (None, None, 21600),
  "resnet_digits": ((1438, 8, 8, 1), (1438,), 5090),
}


# The practitioner-scale networks: test_workloads.py covers them at tiny size by default.
_NETWORKS = {"resnet_digits", "gpt_lm"}


@pytest.mark.parametrize(
  "name",
  [pytest.param(n, marks=pytest.mark.slow) if n in _NETWORKS else n for n in sorted(WORKLOADS)],
)
def test_workload_loads_offline_with_documented_shapes_and_adam_lowers_its_loss(name):
  with jax.enable_x64(False):
    sized = "size" in inspect.signature(WORKLOADS[name]).parameters
    workload = WORKLOADS[name](**({"size": "tiny"} if sized else {}))
    x_shape, y_shape, num_params = SHAPES[name]
    if x_shape is not None:
      assert workload.train[0].shape == x_shape and workload.train[1].shape == y_shape
    params = workload.init_params(jax.random.key(0))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == num_params
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, batch):
      grads = jax.grad(workload.value_fn)(params, batch)
      updates, state = optimizer.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    eval_batch = jax.tree.map(jnp.asarray, workload.eval_batch())
    before = float(workload.value_fn(params, eval_batch))
    for i in range(15):
      params, state = step(params, state, jax.tree.map(jnp.asarray, workload.batch(0, i)))
    after = float(workload.value_fn(params, eval_batch))
    assert after < before
    assert np.isfinite(float(workload.test_metric_fn(params)))


def test_batches_depend_only_on_seed_and_step():
  workload = WORKLOADS["digits_mlp"]()
  a, b = workload.batch(3, 17), workload.batch(3, 17)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(workload.batch(3, 18)[0], a[0])
  # An epoch visits every example at most once.
  per_epoch = workload.num_train // workload.batch_size
  labels = np.concatenate([workload.batch(0, i)[1] for i in range(per_epoch)])
  assert len(labels) == per_epoch * workload.batch_size


TINY = """
[benchmark]
name = "tiny"
seeds = [0]
schedule = "constant"
steps = 30
eval_every = 10
sharpness_every = 10

[workloads.breast_cancer_logreg]
[workloads.rosenbrock]
target = 0.5

[optimizers.sgd]
learning_rates = [0.001, 0.01]

[optimizers.adam]
learning_rates = [0.01]

[optimizers.lbfgs]
learning_rates = [1.0]

[optimizers.adahessian]
learning_rates = [0.1]
"""


def _write(tmp_path, text, name="config.toml"):
  path = tmp_path / name
  path.write_text(text)
  return path


def test_end_to_end_writes_every_output_and_report_reproduces_the_table(tmp_path, capsys):
  out = tmp_path / "results"
  with jax.enable_x64(False):
    assert cli.main(["run", str(_write(tmp_path, TINY)), "--out", str(out), "--quiet"]) == 0
  runs = sorted((out / "runs").glob("*.jsonl"))
  assert len(runs) == 10  # 2 workloads x 5 (optimizer, learning rate) pairs x 1 seed
  assert not list((out / "runs").glob("*.ckpt.npz"))  # checkpoints of finished runs are removed
  for name in ("config.json", "manifest.json", "results.md", "summary.csv"):
    assert (out / name).stat().st_size > 0
  for workload in ("breast_cancer_logreg", "rosenbrock"):
    for plot in ("loss_vs_step", "loss_vs_time", "sharpness"):
      assert (out / "plots" / f"{workload}_{plot}.png").stat().st_size > 1000
  assert (out / "plots" / "performance_profile.png").stat().st_size > 1000
  assert not list(out.rglob("*.tmp"))
  records = [json.loads(line) for line in runs[0].read_text().splitlines()]
  assert records[0]["event"] == "spec" and records[0]["spec"]["steps"] == 30
  assert [r["step"] for r in records[1:-1]] == [0, 10, 20, 30]
  assert records[-1]["event"] == "done" and "sharpness" in records[2]
  assert all(r["guard_skipped"] == 0 for r in records[1:-1])
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["jax"] == jax.__version__ and "hostname" not in manifest
  table = (out / "results.md").read_text()
  assert "| 1 | lbfgs |" in table  # L-BFGS wins on a convex logistic regression
  csv_text = (out / "summary.csv").read_text()
  (out / "results.md").unlink()
  (out / "summary.csv").unlink()
  assert cli.main(["report", str(out), "--quiet"]) == 0
  assert (out / "results.md").read_text() == table
  assert (out / "summary.csv").read_text() == csv_text


def test_rerun_skips_finished_runs(tmp_path):
  out = tmp_path / "results"
  cfg = _write(tmp_path, TINY.replace("[workloads.rosenbrock]\ntarget = 0.5\n", ""))
  with jax.enable_x64(False):
    cli.main(["run", str(cfg), "--out", str(out), "--quiet"])
    logs = {p: p.read_text() for p in (out / "runs").glob("*.jsonl")}
    cli.main(["run", str(cfg), "--out", str(out), "--quiet"])
  assert {p: p.read_text() for p in (out / "runs").glob("*.jsonl")} == logs  # nothing re-ran


RESUME = """
[benchmark]
name = "resume"
seeds = [0]
steps = 600
eval_every = 20

[workloads.mnist1d_cnn]

[optimizers.momentum]
learning_rates = [0.05]
"""


def _run_cli(cfg, out):
  return subprocess.Popen(
    [sys.executable, "-m", "curvopt.bench", "run", str(cfg), "--out", str(out), "--quiet"],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )


@pytest.mark.slow  # a subprocess killed and resumed end to end
@pytest.mark.subprocess
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
  cfg = _write(tmp_path, RESUME)
  killed, clean = tmp_path / "killed", tmp_path / "clean"
  process = _run_cli(cfg, killed)
  (spec,) = config.load(cfg).runs
  log = killed / "runs" / f"{spec.run_id}.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if log.exists() and len(log.read_text().splitlines()) >= 5:
      break
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  partial = log.read_text().splitlines()
  assert '"event": "done"' not in log.read_text(), "the run finished before it could be killed"
  assert (killed / "runs" / f"{spec.run_id}.ckpt.npz").exists()
  for out in (killed, clean):
    finished = _run_cli(cfg, out)
    assert finished.wait(timeout=600) == 0, finished.stderr.read().decode()
  resumed = [json.loads(line) for line in log.read_text().splitlines()]
  reference = [json.loads(line) for line in (clean / "runs" / log.name).read_text().splitlines()]
  assert len(partial) < len(resumed)
  assert [r["step"] for r in resumed[1:-1]] == list(range(0, 601, 20))
  for a, b in zip(resumed[1:-1], reference[1:-1], strict=True):
    assert a["step"] == b["step"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
  for key in ("final_train_loss", "steps_to_target", "steps_run", "nonfinite_steps"):
    assert resumed[-1][key] == pytest.approx(reference[-1][key], rel=1e-6)


GOOD = {
  "benchmark": {"steps": 10},
  "workloads": {"digits_mlp": {}},
  "optimizers": {"adam": {"learning_rates": [1e-3]}},
}


def _with(section, key, value):
  raw = json.loads(json.dumps(GOOD))
  if key is None:
    raw[section] = value
  else:
    raw[section][key] = value
  return raw


@pytest.mark.parametrize(
  "raw, message",
  [
    (_with("workloads", "digits", {}), r"unknown workload 'digits'; valid workloads: .*digits_mlp"),
    (
      _with("optimizers", "adamm", {"learning_rates": [1.0]}),
      r"unknown optimizer 'adamm'; valid optimizers: adahessian, adam, adamw",
    ),
    (_with("benchmark", "stepz", 3), r"unknown key benchmark.stepz; valid keys: .*steps"),
    (_with("benchmark", "steps", "100"), r"benchmark.steps must be a positive integer, got '100'"),
    (_with("benchmark", "steps", 0), r"benchmark.steps must be a positive integer, got 0"),
    (_with("benchmark", "seeds", []), r"benchmark.seeds must be a non-empty list"),
    (
      _with("optimizers", "adam", {"learning_rates": []}),
      r"optimizers.adam.learning_rates is empty",
    ),
    (
      _with("optimizers", "adam", {"learning_rates": [-1e-3]}),
      r"learning_rates\[0\] must be a finite positive number",
    ),
    (
      _with("optimizers", "adam", {"learning_rates": [1e-3], "beta1": 0.9}),
      r"unknown key optimizers.adam.beta1; valid keys: .*b1",
    ),
    (_with("optimizers", "adam", {}), r"optimizers.adam.learning_rates is required"),
    (
      _with("workloads", "digits_mlp", {"batch_size": "big"}),
      r"workloads.digits_mlp.batch_size must be",
    ),
    (
      _with("workloads", "digits_mlp", {"target": "low"}),
      r"workloads.digits_mlp.target must be a number",
    ),
    (
      _with("workloads", "digits_mlp", {"target": -1.0}),
      r"workloads.digits_mlp.target = -1.0: the training loss of digits_mlp "
      r"\(softmax_cross_entropy\) is never below 0",
    ),
    (
      {**GOOD, "extra": {}},
      r"unknown key \(top level\).extra; valid keys: benchmark, optimizers, workloads",
    ),
    ({k: v for k, v in GOOD.items() if k != "optimizers"}, r"\[optimizers\] is required"),
  ],
)
def test_bad_config_is_rejected_naming_the_key(raw, message):
  with pytest.raises(config.ConfigError, match=message):
    config.parse(raw)


def test_bad_config_fails_before_training_with_exit_code_2(tmp_path, capsys):
  bad = _write(
    tmp_path,
    "[benchmark]\nsteps = 10\n[workloads.nope]\n[optimizers.adam]\nlearning_rates = [0.1]\n",
  )
  assert cli.main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
  assert "unknown workload 'nope'" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_invalid_toml_and_missing_file_are_reported(tmp_path):
  with pytest.raises(config.ConfigError, match="is not valid TOML"):
    config.load(_write(tmp_path, "[benchmark\nsteps = 1"))
  with pytest.raises(config.ConfigError, match="does not exist"):
    config.load(tmp_path / "missing.toml")


def test_shipped_configs_are_valid():
  for path in sorted((ROOT / "configs").glob("*.toml")):
    assert config.load(path).runs, path


def test_list_names_every_workload_and_optimizer(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  for name in [*WORKLOADS, "sgd", "momentum", "adam", "adamw", "lbfgs"]:
    assert name in out


def test_checkpoints_round_trip_prng_keys(tmp_path):
  from curvopt.bench import runner

  tree = {"w": jnp.arange(3.0), "key": jax.random.key(7), "count": jnp.int32(4)}
  runner._save_checkpoint(tmp_path / "c.npz", tree, {"step": 4})
  restored, meta = runner._load_checkpoint(tmp_path / "c.npz", tree)
  assert meta == {"step": 4}
  np.testing.assert_array_equal(
    jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"])
  )
  np.testing.assert_array_equal(restored["w"], tree["w"])


@pytest.mark.slow  # a benchmark script end to end
def test_step_time_benchmark_script_runs(tmp_path):
  """The script behind the README's step-time tables (one short block, one workload)."""
  out = tmp_path / "step_time.md"
  done = subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks" / "step_time.py"),
      "--blocks=1",
      "--workloads=digits_mlp",
      "--optimizers=shampoo,soap",
      "--set=shampoo.block_size=32",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  table = out.read_text()
  assert "| shampoo |" in table and "| soap |" in table and "'block_size': 32" in table


def test_egn_sees_the_workload_penalty_and_solves_regularized_logistic_regression():
  workload = WORKLOADS["breast_cancer_logreg"]()
  spec = OPTIMIZERS["egn"]
  optimizer = build_optimizer(spec, workload, 1.0, {"damping": 1e-3})
  step = jax.jit(runner.make_step(workload, spec, optimizer))
  batch = jax.tree.map(jnp.asarray, workload.batch(0, 0))
  params = workload.init_params(jax.random.key(0))
  state = optimizer.init(params)
  for _ in range(40):
    params, state, _, finite = step(params, state, batch)
    assert bool(finite)
  grad = jax.grad(lambda p: workload.value_fn(p, batch))(params)
  # Without the penalty EGN would chase the unregularized optimum: the gradient would not vanish.
  assert float(optax.tree.norm(grad)) < 1e-5


def test_shipped_digits_equal_scikit_learns():
  from sklearn.datasets import load_digits

  from curvopt.bench import data

  shipped = data.digits(standardize=False)
  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(x))
  test, train = order[:359], order[359:]  # 20% held out
  np.testing.assert_array_equal(shipped.x_train, x[train])
  np.testing.assert_array_equal(shipped.x_test, x[test])
  np.testing.assert_array_equal(shipped.y_train, bunch.target[train])
  np.testing.assert_array_equal(shipped.y_test, bunch.target[test])
  assert shipped.y_train.dtype == np.int32


def test_the_runner_turns_on_the_persistent_compilation_cache_with_a_switch(monkeypatch, tmp_path):
  from curvopt.bench import cli

  monkeypatch.setenv("CURVOPT_COMPILATION_CACHE", str(tmp_path / "cache"))
  assert cli.compilation_cache_dir() == tmp_path / "cache"
  for off in ("off", "0", "false", ""):
    monkeypatch.setenv("CURVOPT_COMPILATION_CACHE", off)
    assert cli.compilation_cache_dir() is None
  monkeypatch.delenv("CURVOPT_COMPILATION_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cli.compilation_cache_dir() == tmp_path / "xdg" / "curvopt" / "jax"
