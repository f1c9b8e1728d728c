#!/usr/bin/env bash
# Device check, run from the repository root on a machine with an accelerator:
# the oracle and estimator tests, then the oracle speed table.
# Writes to ${OUT:-/tmp/curvopt-gpu}.
set -uo pipefail
out="${OUT:-/tmp/curvopt-gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' 2>&1 | tee "$out/env.txt"
import jax, optax, sys
print(sys.version.split()[0], "jax", jax.__version__, "optax", optax.__version__)
print(jax.devices())
PY
if python -c "import pytest, chex" 2>/dev/null; then
  timeout 300 python -m pytest tests/test_oracles.py tests/test_estimators.py -q -x -p no:cacheprovider \
    2>&1 | tail -25 | tee "$out/tests.txt"
else
  echo "pytest or chex missing: tests skipped" | tee "$out/tests.txt"
fi
timeout 240 python benchmarks/oracle_speed.py --synthetic --repeats 50 --out "$out/oracle_speed_gpu.md" \
  2>&1 | tail -40 | tee "$out/bench.txt"
