#!/usr/bin/env bash
# The one call to make on an H100/H200: every kernel against pk.reference at real shapes (kernel_correctness.py),
# then attention.py, quantized_attention.py, train.py and serve.py at their GPU defaults. Each script writes its
# JSON (with provenance) into the output folder and its log beside it; one summary table comes last. On a GPU each
# step has its own time limit (seconds, overridable as LIMIT_<STEP>), 480 s in all; --smoke steps get 600 s each
# (interpret mode on 2 CPU cores). Exits non-zero if any step failed.
#
#   bash bench/gpu_suite.sh [--smoke] [--out DIR]     # --smoke: tiny shapes on any machine (run by the CPU tests)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODE=()
SMOKE_LIMIT=
OUT=bench/results
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=(--smoke); SMOKE_LIMIT=600 ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: bash bench/gpu_suite.sh [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

STEPS=(kernel_correctness attention quantized_attention train serve)
declare -A LIMIT=([kernel_correctness]=120 [attention]=120 [quantized_attention]=90 [train]=90 [serve]=60)
failed=0
rows=()
for step in "${STEPS[@]}"; do
  var="LIMIT_${step^^}"
  limit=${!var:-${SMOKE_LIMIT:-${LIMIT[$step]}}}
  log="$OUT/${step}.log"
  start=$SECONDS
  timeout "$limit" "$PYTHON" "bench/${step}.py" "${MODE[@]}" --out "$OUT" >"$log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124) result="timed out after ${limit}s"; failed=1 ;;
    *) result="failed (exit $rc)"; failed=1 ;;
  esac
  json=$(grep -o "wrote .*\.json" "$log" | tail -1 | cut -c7-)
  rows+=("$(printf '%-20s %-24s %6ss  %s' "$step" "$result" "$((SECONDS - start))" "${json:--}")")
done

printf '\n%-20s %-24s %7s  %s\n' step result time json
printf '%s\n' "${rows[@]}"
exit $failed
