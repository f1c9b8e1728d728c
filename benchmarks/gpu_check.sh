#!/usr/bin/env bash
# Device check, run from the repository root on a machine with an accelerator, in at most
# about 9.5 minutes (one device command is limited to 10): the oracle and estimator tests,
# the configs/gpu.toml comparison (time to target, compile time; reported from whatever
# runs finished if its stage runs out of time), a table of each run's step time with and
# without its refreshes, compiled-step memory and the device's peak memory (memory_stats),
# the compile-time table at full size, the Kronecker refreshes (eigh against power + QR
# and coupled Newton: the per-backend default), then the oracle speed table. Each stage
# has its own time limit, the most important first; the exit status is 1 if any stage
# failed or ran out of time, and the last line names them. Writes to
# ${OUT:-/tmp/curvopt-gpu}; commit what it wrote with the device named (env.txt names it).
#
# SMOKE=1 runs every stage at tiny size on a CPU in about two minutes (the oracle speed
# stage only imports), to check the script before device time is spent on it
# (tests/test_gpu_check.py does, without the packages the accelerator image lacks).
set -uo pipefail
out="${OUT:-/tmp/curvopt-gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
config=configs/gpu.toml size=full sizes=256,512,1024 pytest_args=(-x) scale=1
oracle_speed=(--synthetic --repeats 50 --out "$out/oracle_speed_gpu.md")
if [ "${SMOKE:-0}" = 1 ]; then
  # Time limits x4: a smoke run checks that every stage works, on a CPU that may be busy.
  config="$out/gpu_smoke.toml" size=tiny sizes=16 pytest_args=(--collect-only) oracle_speed=(--help)
  scale=4
  sed -e 's/size = "full"/size = "tiny"/' -e 's/^steps = .*/steps = 12/' \
    -e 's/^eval_every = .*/eval_every = 4/' configs/gpu.toml > "$config"
fi
failed=()
python - <<'PY' 2>&1 | tee "$out/env.txt" || failed+=(env)
import jax, optax, sys
print(sys.version.split()[0], "jax", jax.__version__, "optax", optax.__version__)
print(jax.devices(), jax.devices()[0].device_kind)
PY
if python -c "import pytest, chex" 2>/dev/null; then
  timeout $((45 * scale)) python -m pytest tests/test_oracles.py tests/test_estimators.py -q -p no:cacheprovider -p no:hypothesispytest \
    "${pytest_args[@]}" 2>&1 | tail -25 | tee "$out/tests.txt" || failed+=(tests)
else
  echo "pytest or chex missing: tests skipped" | tee "$out/tests.txt"
fi
timeout $((300 * scale)) python -m curvopt.bench run "$config" --out "$out/gpu" --quiet 2>&1 | tail -20 \
  | tee "$out/gpu_run.txt" || failed+=(comparison)
# The report again, from the runs that finished, in case the stage above ran out of time.
timeout $((30 * scale)) python -m curvopt.bench report "$out/gpu" --quiet 2>&1 | tail -5 \
  | tee -a "$out/gpu_run.txt" || failed+=(report)
python - "$out/gpu/summary.csv" <<'PY' 2>&1 | tee "$out/steps.md" || failed+=(steps)
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
mib = lambda x: f"{float(x) / 2**20:.0f}" if x not in ("", "None") else "—"
print("| workload | optimizer | seed | compile (s) | median step (ms) | step with refreshes (ms)"
      " | refreshes' share | compiled step (MiB) | device peak so far (MiB) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
  median, robust = float(r["median_step_ms"]), float(r["robust_step_ms"])
  share = f"{robust / median - 1:+.0%}" if math.isfinite(robust / median) else "—"
  print(f"| {r['workload']} | {r['optimizer']} | {r['seed']} | {float(r['compile_s']):.1f} "
        f"| {median:.2f} | {robust:.2f} | {share} | {mib(r['step_memory_bytes'])} "
        f"| {mib(r['peak_device_bytes'])} |")
PY
timeout $((95 * scale)) python benchmarks/compile_time.py --workloads gpt_lm --size "$size" --repeats 1 \
  --optimizers adamw,muon,psgd_muon,soap,shampoo,psgd_kron,sophia_h --out "$out/compile_time_gpu.md" 2>&1 \
  | tail -12 | tee "$out/compile.txt" || failed+=(compile_time)
timeout $((45 * scale)) python benchmarks/kronecker_refresh.py --sizes "$sizes" \
  --out "$out/kronecker_refresh_gpu.md" 2>&1 | tail -8 | tee "$out/kronecker_refresh.txt" \
  || failed+=(kronecker_refresh)
timeout $((50 * scale)) python benchmarks/oracle_speed.py "${oracle_speed[@]}" 2>&1 | tail -40 \
  | tee "$out/bench.txt" || failed+=(oracle_speed)
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: stages that failed or ran out of time: ${failed[*]}" | tee "$out/failed.txt"
  exit 1
fi
echo "gpu_check: every stage finished"
