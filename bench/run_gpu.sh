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
  python -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_gpu_shapes.py tests/test_kernel.py} \
    >"$OUT/pytest.log" 2>&1 || status=$?
  tail -n 25 "$OUT/pytest.log"
fi
if [[ $what == bench || $what == all ]]; then
  python bench/bench_decode.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 30
  cp "$OUT/bench.json" bench/results/ 2>/dev/null || true
fi
exit $status
