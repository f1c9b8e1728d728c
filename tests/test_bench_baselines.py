"""The first-order baselines of the language-model contest: Muon, NAdamW, Schedule-Free AdamW."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.bench import cli, config, models, results, runner
from curvopt.bench.optimizers import OPTIMIZERS, build_optimizer, learning_rate_schedule
from curvopt.bench.workloads._base import default_hidden_matrices

BASELINES = ("muon", "nadamw", "schedule_free_adamw")


def _hidden_names(params) -> set[str]:
  mask = default_hidden_matrices(params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {jax.tree_util.keystr(path) for path, hidden in flat if hidden}


def test_list_names_the_contest_baselines(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  for name in (*BASELINES, "psgd_muon"):
    assert f"  {name} " in out


def _tiny_gpt(key):  # gpt_lm's tiny model without loading its corpus
  return models.init_transformer(key, 256, context=32, width=32, depth=1, heads=2, tied=True)


def test_hidden_matrices_leave_embeddings_heads_norms_and_biases_to_adam():
  with jax.enable_x64(False):
    gpt = _tiny_gpt(jax.random.key(0))
    resnet = models.init_resnet(jax.random.key(0), (8, 16), 1)  # resnet_digits' tiny model
  assert _hidden_names(gpt) == {
    f"['block0']['{name}']" for name in ("qkv", "proj", "up", "down")
  }  # not embed, position (the tied head) or the norms
  assert _hidden_names(resnet) == {
    "['stage0_block0']['conv1']",
    "['stage0_block0']['conv2']",
    "['stage1_block0']['conv1']",
    "['stage1_block0']['conv2']",
    "['stage1_block0']['project']",
  }  # not the stem, the head or the GroupNorm scales


def test_muon_orthogonalizes_hidden_matrices_and_runs_adamw_on_the_rest():
  with jax.enable_x64(False):
    params = _tiny_gpt(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, 256)
    loss = lambda p: models.sequence_cross_entropy(
      models.transformer(p, tokens[:, :-1], heads=2), tokens[:, 1:]
    )
    grads = jax.grad(loss)(params)
    lr = 0.1
    workload = types.SimpleNamespace(hidden_matrix_mask=default_hidden_matrices)
    muon = build_optimizer(OPTIMIZERS["muon"], workload, lr, {"weight_decay": 0.0})
    updates, _ = muon.update(grads, muon.init(params), params)
    # A hidden (in, out) matrix: the Newton-Schulz polar factor of the (Nesterov) momentum,
    # scaled to RMS 0.2 per entry: its singular values cluster around 0.2 sqrt(max(m, n)).
    up = np.asarray(updates["block0"]["up"], np.float64) / -lr
    scale = 0.2 * max(up.shape) ** 0.5
    singular = np.linalg.svd(up / scale, compute_uv=False)
    assert singular.min() > 0.6 and singular.max() < 1.25
    u, _, vt = np.linalg.svd(np.asarray(grads["block0"]["up"], np.float64), full_matrices=False)
    polar = u @ vt
    cosine = np.sum(up * polar) / (np.linalg.norm(up) * np.linalg.norm(polar))
    assert cosine > 0.95
    # Embeddings (the tied head) and norms: optax's AdamW with Nesterov momentum.
    adamw = optax.adamw(lr, weight_decay=0.0, nesterov=True)
    for name in ("embed", "final_norm"):
      expected, _ = adamw.update(grads[name], adamw.init(params[name]), params[name])
      np.testing.assert_allclose(updates[name], expected, rtol=1e-5, atol=1e-8)


def test_warmup_constant_schedule_rises_then_holds_its_peak():
  schedule = learning_rate_schedule(0.1, "warmup_constant", steps=100, warmup_fraction=0.1)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 50, 99)], [0, 0.05, 0.1, 0.1, 0.1])


def _write(tmp_path, text: str):
  path = tmp_path / "contest.toml"
  path.write_text(text)
  return path


_TINY = """
[benchmark]
name = "contest"
seeds = [0]
steps = 12
eval_every = 6
warmup_fraction = 0.25
[workloads.gpt_lm]
size = "tiny"
[optimizers.adamw]
learning_rates = [0.01]
[optimizers.muon]
learning_rates = [0.01]
[optimizers.nadamw]
learning_rates = [0.01]
[optimizers.schedule_free_adamw]
learning_rates = [0.01]
[optimizers.psgd_muon]
learning_rates = [0.01]
"""


def test_schedule_free_runs_warmup_constant_unless_its_table_names_a_schedule(tmp_path):
  runs = config.load(_write(tmp_path, _TINY)).runs
  schedules = {r.optimizer: (r.schedule, r.warmup_fraction) for r in runs}
  assert schedules["schedule_free_adamw"] == ("warmup_constant", 0.25)
  assert schedules["muon"] == ("warmup_cosine", 0.25)
  own = _TINY.replace(
    "[optimizers.schedule_free_adamw]", '[optimizers.schedule_free_adamw]\nschedule = "constant"'
  )
  runs = config.load(_write(tmp_path, own)).runs
  assert {r.schedule for r in runs if r.optimizer == "schedule_free_adamw"} == {"constant"}


@pytest.mark.slow  # end to end through the runner: about a minute
def test_baselines_lower_the_loss_at_tiny_size_and_schedule_free_is_evaluated_at_its_average(
  tmp_path,
):
  out = tmp_path / "out"
  with jax.enable_x64(False):
    assert cli.main(["run", str(_write(tmp_path, _TINY)), "--out", str(out), "--quiet"]) == 0
    by_optimizer = {}
    for path in (out / "runs").glob("*.jsonl"):
      records = [json.loads(line) for line in path.read_text().splitlines()]
      by_optimizer[records[-1]["optimizer"]] = records
    assert set(by_optimizer) == {"adamw", "psgd_muon", *BASELINES}
    for name, records in by_optimizer.items():
      losses = [r["train_loss"] for r in records[1:-1]]
      assert records[-1]["failed"] is False, name
      assert np.isfinite(losses).all() and losses[-1] < losses[0], name

    # Replay Schedule-Free AdamW's 12 steps: the logged loss is the average's, not the iterate's.
    spec = next(r for r in config.load(_write(tmp_path, _TINY)).runs if r.optimizer == BASELINES[2])
    workload = config.build_workload(spec.workload, spec.workload_options)
    optimizer = runner._optimizer(spec, workload)
    step = jax.jit(runner.make_step(workload, OPTIMIZERS[spec.optimizer], optimizer))
    params = workload.init_params(jax.random.key(spec.seed))
    state = optimizer.init(params)
    for i in range(spec.steps):
      params, state, _, _ = step(params, state, jax.tree.map(jnp.asarray, workload.batch(0, i)))
    eval_batch = jax.tree.map(jnp.asarray, workload.eval_batch())
    average = optax.contrib.schedule_free_eval_params(state, params)
    at_average = float(workload.value_fn(average, eval_batch))
    at_iterate = float(workload.value_fn(params, eval_batch))
  logged = by_optimizer[BASELINES[2]][-2]["train_loss"]
  assert logged == pytest.approx(at_average, rel=1e-5)
  assert abs(at_iterate - at_average) > 1e-3  # the test can tell the two apart


def _entry(time: float, steps: float) -> dict:
  return {
    "robust_time_to_target_s": time,
    "robust_interval": (0.9 * time, 1.1 * time),
    "steps_to_target": steps,
    "seeds": 3,
  }


def test_a_time_verdict_the_step_counts_contradict_is_called_out():
  base = _entry(10.0, 200)
  assert results._versus(_entry(5.0, 150), base) == "0.50x, faster"
  assert results._versus(_entry(5.0, 250), base) == "0.50x, faster but in more steps (250 vs 200)"
  assert results._versus(_entry(20.0, 150), base) == "2.00x, slower but in fewer steps (150 vs 200)"
  assert results._versus(_entry(20.0, 250), base) == "2.00x, slower"


def test_a_time_to_target_of_milliseconds_gets_no_time_verdict():
  # A quickstart headline, "0.37x, faster" at 7 ms against 18 ms, read 1.85x on a rerun.
  base = _entry(0.018, 100)
  assert results._versus(_entry(0.0067, 25), base) == "0.37x, host-overhead bound: 25 vs 100 steps"
  assert results._versus(_entry(0.5, 25), base) == "27.78x, slower but in fewer steps (25 vs 100)"


def test_loss_thresholds_take_the_rate_that_reaches_each_level_first(tmp_path):
  import pathlib
  import sys

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  import loss_thresholds

  (tmp_path / "runs").mkdir()

  def write(name, lr, seed, losses, step_ms):
    records = [{"event": "spec"}]
    records += [
      {"step": 10 * i, "time": 10 * i * step_ms / 1e3, "train_loss": loss}
      for i, loss in enumerate(losses)
    ]
    records.append(
      {
        "event": "done",
        "workload": "w",
        "optimizer": name,
        "learning_rate": lr,
        "seed": seed,
        "robust_step_ms": step_ms,
      }
    )
    path = tmp_path / "runs" / f"{name}_{lr}_{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

  for seed in range(3):
    write("fast_start", 0.1, seed, [3.0, 2.4, 2.3, 2.25, 2.2], 1.0)  # 2.5 at step 10
    write("slow_start", 0.1, seed, [3.0, 2.8, 2.4, 2.1, 1.9], 2.0)  # 2.5 at 20, 2.0 at 40
    write("slow_start", 0.2, seed, [3.0, 2.6, 2.45, 2.3, float("nan")], 2.0)
  text = loss_thresholds.table(tmp_path, [2.5, 2.0])
  assert "| fast_start | 10 (3/3, lr 0.1, 0.01 s) | — |" in text
  assert "| slow_start | 20 (3/3, lr 0.1, 0.04 s) | 40 (3/3, lr 0.1, 0.08 s) |" in text
