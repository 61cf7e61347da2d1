#!/usr/bin/env bash
# One GPU check of the torch CUDA paths, for a machine with torch + CUDA (no TensorRT needed, no network, no venv):
# `pytest -m gpu`, the golden end-to-end cases in fp32 / fp16 autocast / --cuda-graph against the CPU fp32
# goldens, the latency of the full-size U-Net/CFG step and decoder, and eager vs CUDA graph vs torch.compile
# (U-Net, decoder, a 50-step PLMS image, PSNR against fp32 eager in the same run). Each step has its own timeout
# and a failing step does not stop the others. All steps: up to 12 minutes (about 2 minutes without the compiled
# step on an H100/H200; its first compiles are not measured yet); --only runs some (env and report always run).
#
#   bash scripts/gpu_check.sh                       # on the GPU machine, from any directory
#   bash scripts/gpu_check.sh --only compiled       # steps of pytest,e2e,latency,compiled
#   bash scripts/gpu_check.sh --cpu-dry-run         # the same code on the CPU, small and short (results in /tmp)
#
# Results: $OUT/<gpu-slug>/gpu-check-<time>.{json,md} when $OUT is set (a device tool returns what is under $OUT,
# two folders deep at most), else benchmarks/results/<gpu-slug>/; the log goes to $OUT/gpu_check.log too.
# Python: $PYTHON, else python3 (the one that has torch); the package is imported from the source tree.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=()
ONLY=pytest,e2e,latency,compiled
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-dry-run) DRY=(--cpu-dry-run) ;;
    --only) ONLY=$2; shift ;;
    *) echo "usage: $0 [--cpu-dry-run] [--only STEP,...]" >&2; exit 2 ;;
  esac
  shift
done
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }
export PYTHONPATH="export:engines:runtime:benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
  ROOT=$OUT
elif [ ${#DRY[@]} -gt 0 ]; then
  ROOT=/tmp/gpu-check-dry-run
else
  ROOT=benchmarks/results
fi
mkdir -p "$ROOT"
TEE=
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; TEE=$!; fi
PARTS=$(mktemp -d /tmp/gpu-check-parts.XXXXXX)
RCS=()
START=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a timeout, record its exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s, at $((SECONDS - START))s)"
  timeout -k 5 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s"
  echo "== $name: exit status $rc"
  RCS+=(--rc "$name=$rc")
}

step env 40 "$PY" scripts/gpu_check.py env --parts "$PARTS" "${DRY[@]}"
PYTEST_RAN=()
mapfile -t GPU_TESTS < <(grep -l "mark\.gpu" tests/test_*.py)
if ! wanted pytest; then
  echo "== pytest: not asked for"
elif [ ${#GPU_TESTS[@]} -eq 0 ]; then
  echo "== pytest: no test file has a GPU test"
elif "$PY" -c "import pytest" 2>/dev/null; then
  PYTEST_RAN=(--pytest-ran)
  # only the files with GPU tests; a file whose imports fail here (a missing optional package) must not stop them
  step pytest 120 "$PY" -m pytest -m gpu -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$PARTS/pytest.xml" "${GPU_TESTS[@]}"
else
  echo "== pytest: not installed; skipped (the e2e step's --cuda-graph modes cover the shape checks)"
fi
wanted e2e && step e2e 150 "$PY" scripts/gpu_check.py e2e --parts "$PARTS" "${DRY[@]}"
wanted latency && step latency 110 "$PY" scripts/gpu_check.py latency --parts "$PARTS" "${DRY[@]}"
# a CPU compiles for minutes (more on a shared one), a GPU host's 16 cores in far less
wanted compiled && step compiled "$([ ${#DRY[@]} -gt 0 ] && echo 900 || echo 270)" "$PY" scripts/gpu_check.py compiled \
  --parts "$PARTS" "${DRY[@]}"
step report 30 "$PY" scripts/gpu_check.py report --parts "$PARTS" --output "$ROOT" "${RCS[@]}" "${PYTEST_RAN[@]}" \
  "${DRY[@]}"
RC=${RCS[-1]#*=}
if [ "$RC" -gt 1 ] && [ -n "${OUT:-}" ]; then  # the report itself broke: keep the raw parts
  mkdir -p "$OUT/parts" && cp "$PARTS"/*.json "$PARTS"/*.xml "$OUT/parts/" 2>/dev/null
fi
echo "gpu_check: done in $((SECONDS - START))s"
if [ -n "$TEE" ]; then exec >&- 2>&-; wait "$TEE"; fi  # the log is complete before the script returns
exit "$RC"
