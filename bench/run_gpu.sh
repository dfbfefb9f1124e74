#!/usr/bin/env bash
# One device call: GPU tests and benchmarks, each step in its own process under its own time
# limit, all steps within BUDGET_S seconds. Logs, JSON and the table go to $OUT (or bench/out).
#   bash bench/run_gpu.sh [tests|bench|decode|generate|pytest|autotune|profile|suite|all] \
#       [extra bench_decode.py arguments...]
#
#   tests     GPU tests ($TESTS)
#   bench     = decode: bench_decode.py, one process per shape (kernel + peers, one table)
#   generate  bench_generate.py: 128 + 256 greedy tokens, kernel vs peers
#   pytest    the pytest-benchmark suites (pytest bench/ --benchmark-only)
#   autotune  flashformer-triton autotune into $OUT/tuning.json
#   profile   flashformer-triton profile: per-op summary + Gantt PNG
#   quant     bench_quant.py (bf16/int8/int4 kernel steps vs the int8 compile peer)
#   suite     decode generate profile pytest autotune (autotune last: its budget takes what is left)
#   all       the steps in $STEPS (default: tests decode)
#
# Environment (default in brackets):
#   BUDGET_S [570]  the whole call; a step gets min(its timeout, time left - 10 s) and is
#                   skipped below 30 s; the Python steps stop starting rows 20 s before that
#   STEPS [tests decode]                       what `all` runs, in order
#   TESTS, TEST_TIMEOUT [420]                  GPU tests (a cold machine: ~330 s for three files)
#   SHAPES [llama-3.2-1b llama-3.1-8b], BATCHES [1], POSITIONS [512],
#   PEERS [compile hf-eager hf-static; "none" for the kernel only], SHAPE_TIMEOUT [300]
#   GEN_SHAPES [llama-3.2-1b], GEN_BATCHES [1], GEN_PEERS [compile hf-eager hf-static],
#   GEN_TIMEOUT [300]
#   BENCH_SHAPES [llama-3.2-1b], BENCH_BATCH [1], BENCH_POS [512], BENCH_PEERS [compile],
#   BENCH_GEN_PEERS [compile], PYTEST_TIMEOUT [240]           (pytest-benchmark suites)
#   TUNE_MODEL [llama-3.2-1b], TUNE_BATCH [1], TUNE_BUDGET_S [150], TUNE_TIMEOUT [200]
#   PROFILE_MODEL [llama-3.2-1b], PROFILE_BATCH [1], PROFILE_POS [512], PROFILE_TIMEOUT [150]
#   QUANT_SHAPES [llama-3.2-1b llama-3.1-8b], QUANT_TIMEOUT [240]
#   FLASHFORMER_TUNING [off]  tuned tiles for the benchmarks (e.g. $OUT/tuning.json); rows
#                             record the tiles they ran with
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=src:tests:bench${PYTHONPATH:+:$PYTHONPATH}
export FLASHFORMER_TUNING=${FLASHFORMER_TUNING:-off}
BUDGET_S=${BUDGET_S:-570}
what=${1:-all}
shift || true
case $what in
  all) steps=${STEPS:-tests decode} ;;
  suite) steps="decode generate profile pytest autotune" ;;
  bench) steps=decode ;;
  tests|decode|generate|pytest|autotune|profile|quant) steps=$what ;;
  *) echo "unknown step '$what' (tests|bench|decode|generate|pytest|autotune|profile|quant|suite|all)" >&2
     exit 2 ;;
esac
none_to_empty() { [[ $1 == none ]] && echo "" || echo "$1"; }

python - <<'PY' 2>&1 | tee "$OUT/env.txt"
import importlib.metadata as md
import torch, triton
p = torch.cuda.get_device_properties(0)
try:
    tf = md.version("transformers")
except md.PackageNotFoundError:
    tf = "not installed"
print(f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
      f"torch {torch.__version__}, triton {triton.__version__}, transformers {tf}")
PY

# limit SECONDS -> the time limit a step gets now (0: too little left, skip it)
limit() {
  local want=$1 have=$((BUDGET_S - SECONDS - 10))
  ((have < want)) && want=$have
  ((want < 30)) && want=0
  echo "$want"
}
# step NAME LIMIT COMMAND... : run under `timeout`, log start, end and status
status=0
step() {
  local name=$1 t=$2 start=$SECONDS rc
  shift 2
  if ((t == 0)); then
    echo "[$name] skipped: $((BUDGET_S - SECONDS)) s left of BUDGET_S=$BUDGET_S" | tee -a "$OUT/steps.log"
    return 0
  fi
  echo "[$name] limit ${t}s: $*" >>"$OUT/steps.log"
  timeout -k 10 "$t" "$@"
  rc=$?
  echo "[$name] exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
  ((rc == 124 || rc == 137)) && echo "[$name] hit its time limit" | tee -a "$OUT/steps.log"
  return $rc
}

for s in $steps; do
  case $s in
  tests)
    t=$(limit "${TEST_TIMEOUT:-420}")
    step tests "$t" python -m pytest -q -x -p no:cacheprovider \
      ${TESTS:-tests/test_gpu_shapes.py tests/test_kernel.py} >"$OUT/pytest.log" 2>&1 || status=$?
    tail -n 25 "$OUT/pytest.log"
    ;;
  decode)
    # One process per shape, each under its own time limit, so one slow shape cannot eat the call.
    peers=$(none_to_empty "${PEERS:-compile hf-eager hf-static}")
    for shape in ${SHAPES:-llama-3.2-1b llama-3.1-8b}; do
      t=$(limit "${SHAPE_TIMEOUT:-300}")
      step "decode $shape" "$t" python bench/bench_decode.py --shapes "$shape" \
        --batch ${BATCHES:-1} --pos ${POSITIONS:-512} --peers $peers --budget-s $((t - 20)) \
        --json "$OUT/decode-$shape.json" "$@" 2>>"$OUT/decode.log" | tee -a "$OUT/decode.txt"
    done
    grep "^\[" "$OUT/decode.log" | tail -n 12
    ;;
  generate)
    peers=$(none_to_empty "${GEN_PEERS:-compile hf-eager hf-static}")
    for shape in ${GEN_SHAPES:-llama-3.2-1b}; do
      t=$(limit "${GEN_TIMEOUT:-300}")
      step "generate $shape" "$t" python bench/bench_generate.py --shapes "$shape" \
        --batch ${GEN_BATCHES:-1} --peers $peers --budget-s $((t - 20)) \
        --json "$OUT/generate-$shape.json" 2>>"$OUT/generate.log" | tee -a "$OUT/generate.txt"
    done
    grep "^\[" "$OUT/generate.log" | tail -n 8
    ;;
  pytest)
    t=$(limit "${PYTEST_TIMEOUT:-240}")
    step pytest-benchmark "$t" python -m pytest -q -p no:cacheprovider bench/ --benchmark-only \
      --benchmark-json "$OUT/pytest-benchmark.json" >"$OUT/pytest-benchmark.log" 2>&1
    tail -n 30 "$OUT/pytest-benchmark.log"
    ;;
  autotune)
    t=$(limit "${TUNE_TIMEOUT:-200}")
    budget=${TUNE_BUDGET_S:-150}
    ((budget > t - 30)) && budget=$((t - 30))
    step autotune "$t" python -m flashformer_triton.cli autotune --model "${TUNE_MODEL:-llama-3.2-1b}" \
      --batch ${TUNE_BATCH:-1} --budget-s "$budget" --output "$OUT/tuning.json" 2>&1 |
      tee "$OUT/autotune.log" | grep -v "^  " || true
    ;;
  profile)
    t=$(limit "${PROFILE_TIMEOUT:-150}")
    model=${PROFILE_MODEL:-llama-3.2-1b}
    step profile "$t" python -m flashformer_triton.cli profile --model "$model" \
      --batch "${PROFILE_BATCH:-1}" --pos "${PROFILE_POS:-512}" --out "$OUT/timeline-$model.png" \
      --json "$OUT/timeline-$model.json" 2>&1 | tee "$OUT/profile.log"
    ;;
  quant)
    for shape in ${QUANT_SHAPES:-llama-3.2-1b llama-3.1-8b}; do
      t=$(limit "${QUANT_TIMEOUT:-240}")
      step "quant $shape" "$t" python bench/bench_quant.py --shapes "$shape" \
        --json "$OUT/quant-$shape.json" 2>>"$OUT/quant.log" | tee -a "$OUT/quant.txt"
    done
    ;;
  *)
    echo "unknown step '$s' in STEPS" >&2
    status=2
    ;;
  esac
done

shopt -s nullglob
results=("$OUT"/decode-*.json "$OUT"/generate-*.json)
if ((${#results[@]})); then
  python bench/report.py "${results[@]}" >"$OUT/table.md" && cat "$OUT/table.md"
fi
echo "total $SECONDS s of BUDGET_S=$BUDGET_S" | tee -a "$OUT/steps.log"
exit $status
