#!/usr/bin/env bash
# Device check, run from the repository root on a machine with an accelerator, in about
# 12 minutes: the oracle and estimator tests, the configs/gpu.toml comparison (step time,
# peak memory from memory_stats, compile time, time to target), the compile-time table
# at full size, SOAP's eigenbasis refresh (eigh against power + QR: the per-backend
# default), then the oracle speed table. Writes to ${OUT:-/tmp/curvopt-gpu}; commit
# what it wrote with the device named (env.txt names it).
set -uo pipefail
out="${OUT:-/tmp/curvopt-gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' 2>&1 | tee "$out/env.txt"
import jax, optax, sys
print(sys.version.split()[0], "jax", jax.__version__, "optax", optax.__version__)
print(jax.devices(), jax.devices()[0].device_kind)
PY
if python -c "import pytest, chex" 2>/dev/null; then
  timeout 150 python -m pytest tests/test_oracles.py tests/test_estimators.py -q -x -p no:cacheprovider \
    2>&1 | tail -25 | tee "$out/tests.txt"
else
  echo "pytest or chex missing: tests skipped" | tee "$out/tests.txt"
fi
timeout 420 python -m curvopt.bench run configs/gpu.toml --out "$out/gpu" --quiet 2>&1 | tail -20 \
  | tee "$out/gpu_run.txt"
timeout 150 python benchmarks/compile_time.py --workloads gpt_lm --size full --repeats 1 \
  --optimizers adamw,soap,shampoo,psgd_kron,sophia_h --out "$out/compile_time_gpu.md" 2>&1 | tail -12 \
  | tee "$out/compile.txt"
timeout 60 python benchmarks/soap_refresh.py --sizes 256,512,1024 --out "$out/soap_refresh_gpu.md" \
  2>&1 | tail -8 | tee "$out/soap_refresh.txt"
timeout 90 python benchmarks/oracle_speed.py --synthetic --repeats 50 --out "$out/oracle_speed_gpu.md" \
  2>&1 | tail -40 | tee "$out/bench.txt"
