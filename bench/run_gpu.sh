#!/usr/bin/env bash
# One device call: GPU tests, then the benchmark table last. Logs go to $OUT (or bench/out).
#   bash bench/run_gpu.sh [tests|bench|all] [extra bench_decode.py arguments...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=src:tests${PYTHONPATH:+:$PYTHONPATH}
what=${1:-all}
shift || true
python - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
PY
status=0
if [[ $what == tests || $what == all ]]; then
  timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_gpu_shapes.py tests/test_kernel.py} \
    >"$OUT/pytest.log" 2>&1 || status=$?
  tail -n 25 "$OUT/pytest.log"
fi
if [[ $what == bench || $what == all ]]; then
  # One process per shape, each under its own time limit, so one slow shape cannot eat the call.
  for shape in ${SHAPES:-llama-3.2-1b llama-3.1-8b}; do
    timeout "${SHAPE_TIMEOUT:-240}" python bench/bench_decode.py --shapes "$shape" \
      --json "$OUT/bench-$shape.json" "$@" 2>&1 | tee -a "$OUT/bench.log" | grep -v "^\[" || true
  done
  grep "^\[" "$OUT/bench.log" | tail -n 12
fi
exit $status
