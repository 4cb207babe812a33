#!/usr/bin/env bash
# One-shot GPU check: everything the GPU path needs verified, in one call on the GPU machine, in <= 8 minutes.
#
#   scripts/gpu_check.sh --dry-run        print the steps it would run and the wheels it would carry (any machine)
#   scripts/gpu_check.sh --fetch-wheels   download the wheels of scripts/gpu_wheels.txt into .whl/ (machine with PyPI)
#   scripts/gpu_check.sh                  run it (GPU machine; writes $OUT/gpu_check.json, or ./gpu_check_out/)
#   GPU_CHECK_STEPS=tests,memcheck scripts/gpu_check.sh   rerun some steps only
#
# Assumes only the GPU machine's image: Python 3.12, torch (CUDA), torchvision, cuda-bindings, cupy, OpenCV, onnx,
# onnxruntime (CPU), pytest; no TensorRT, no internet. What edgedeploy needs beyond it travels as wheels in .whl/
# (scripts/gpu_wheels.txt), installed with --no-index. The device call, from the repository root:
#   run(carry=[".whl"], timeout_s=540, command="bash scripts/gpu_check.sh")
# Steps, in priority order (each bounded; later steps are skipped when the time budget runs out):
#   env, install, the one GPU pipeline on PyTorch CUDA / ORT CUDA (tests/test_gpu_pipelines_cuda.py), the other
#   gpu+emulated_gpu tests, runtime_targets --device cuda (its overhead and camera figures include PyTorch CUDA
#   with GPU preprocessing + CUDA graph, the GPU backend this machine has), short GPU training, FP16 accuracy on GPU,
#   10,000-frame soak (host and GPU memory flat), compute-sanitizer memcheck and racecheck on preprocessing+NMS
#   (where compute-sanitizer exists and works).
# Output: one JSON ($OUT/gpu_check.json) with every step's status, time and figures; the "GPU check" section of
# docs/BENCHMARKS.md (plus runtime_targets' own section), copied to $OUT so they come back.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
OUTDIR=${OUT:-$ROOT/gpu_check_out}
WHEELS_DIR=$ROOT/.whl
WORK=${GPU_CHECK_WORK:-/tmp/edgedeploy_gpu_check}
DOC=${GPU_CHECK_DOC:-$ROOT/docs/BENCHMARKS.md}
ONLY=${GPU_CHECK_STEPS:-}  # e.g. "tests,memcheck" to rerun some steps only
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --fetch-wheels or nothing)" >&2; exit 2 ;;
esac

wheels() { grep -v '^\s*#' "$ROOT/scripts/gpu_wheels.txt" | sed '/^\s*$/d'; }

# ---- the steps: name | time limit (s) | command ------------------------------------------------------------------
STEPS=(
  "env|30|rc=0; nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader || rc=1; $PY -c 'import torch,sys;print(sys.version.split()[0],torch.__version__,torch.version.cuda,torch.cuda.get_device_name(0))' || rc=1; $PY -m edgedeploy.cli doctor --json > $WORK/doctor.json || rc=1; cat $WORK/doctor.json; exit \$rc"
  "install|90|$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $WORK/site $WHEELS_DIR/*.whl && $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target $WORK/site . && $PY -c 'import edgedeploy,onnxslim,onnxconverter_common,pycocotools;print(edgedeploy.__file__)'"
  "gpu_pipelines|60|$PY -m pytest -q -p no:cacheprovider -m gpu --timeout 50 -o addopts='-ra' --junitxml=$WORK/gpu_pipelines.xml tests/test_gpu_pipelines_cuda.py"
  "tests|160|$PY -m pytest -q -p no:cacheprovider -m 'gpu or emulated_gpu' --continue-on-collection-errors --timeout 120 -o addopts='-ra' --junitxml=$WORK/tests.xml --ignore=tests/test_gpu_pipelines_cuda.py tests"
  "runtime_targets|150|$PY benchmarks/runtime_targets.py --device cuda --iters 30 --rounds 3 --frames 200 --out $WORK/bench"
  "train|75|$PY -m edgedeploy.cli train --model mobilenetv3_small --data synthetic --epochs 2 --device cuda --quiet --workers 4 --out $WORK/train"
  "fp16_accuracy|45|$PY scripts/gpu_fp16_accuracy.py $WORK/train/best.pt $WORK/fp16_accuracy.json"
  "soak|45|$PY scripts/gpu_soak.py $WORK/soak.json 10000"
  "memcheck|60|compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all $PY scripts/gpu_sanitize_target.py"
  "racecheck|60|compute-sanitizer --tool racecheck --error-exitcode 3 --target-processes all $PY scripts/gpu_sanitize_target.py"
)

if [ "$MODE" = dry ]; then
  echo "gpu_check.sh --dry-run: nothing is executed"
  echo "root: $ROOT   output: $OUTDIR   work: $WORK   time budget: ${BUDGET_S}s${ONLY:+   steps: $ONLY}"
  echo
  echo "wheels it would carry (.whl/, installed with --no-index --no-deps; scripts/gpu_wheels.txt):"
  total=0
  while read -r req; do
    name=${req%%==*}; ver=${req#*==}
    pat=$(echo "$name" | tr '-' '_')
    f=$(ls "$WHEELS_DIR"/${pat}-${ver}-*.whl "$WHEELS_DIR"/${name}-${ver}-*.whl 2>/dev/null | head -1)
    if [ -n "$f" ]; then
      sz=$(stat -c %s "$f"); total=$((total + sz))
      printf '  %-32s %s (%d KiB)\n' "$req" "$(basename "$f")" $((sz / 1024))
    else
      printf '  %-32s MISSING in .whl/ (run scripts/gpu_check.sh --fetch-wheels)\n' "$req"
    fi
  done < <(wheels)
  printf '  total %d KiB of the 64 MiB a device call carries\n\n' $((total / 1024))
  echo "steps it would run, in order (limit in s; skipped when the ${BUDGET_S}s budget runs out):"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$s"
    printf '  [%s] %ss\n      %s\n' "$name" "$limit" "$cmd"
  done
  echo
  echo "then: $WORK/* -> $OUTDIR/gpu_check.json and the 'GPU check' section of $DOC (copied to $OUTDIR)"
  echo "device call: run(carry=[\".whl\"], timeout_s=540, command=\"bash scripts/gpu_check.sh\")"
  exit 0
fi

if [ "$MODE" = fetch ]; then
  mkdir -p "$WHEELS_DIR"
  excl=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)  # worktrees: the common one
  mkdir -p "$(dirname "$excl")"
  grep -qxF '/.whl/' "$excl" 2>/dev/null || echo '/.whl/' >> "$excl"
  plat=(); for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
  plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  # shellcheck disable=SC2046
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$WHEELS_DIR" $(wheels)
  du -sh "$WHEELS_DIR"
  exit 0
fi

# ---- run ----------------------------------------------------------------------------------------------------------
rm -rf "$WORK"; mkdir -p "$WORK" "$OUTDIR"
export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
START=$(date +%s)
: > "$WORK/steps.tsv"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    printf '%s\tnot-selected\t0\tGPU_CHECK_STEPS=%s\n' "$name" "$ONLY" >> "$WORK/steps.tsv"; continue
  fi
  left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$name" = memcheck ] || [ "$name" = racecheck ]; then
    if ! command -v compute-sanitizer >/dev/null; then
      printf '%s\tabsent\t0\tcompute-sanitizer not on PATH\n' "$name" >> "$WORK/steps.tsv"; continue
    fi
  fi
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\ttime budget spent\n' "$name" >> "$WORK/steps.tsv"; continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] (limit ${limit}s, ${left}s of the budget left)"
  t0=$(date +%s)
  timeout -k 5 "$limit" bash -c "$cmd" > "$WORK/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  tail -n 25 "$WORK/$name.log"
  status=ok; [ $rc -ne 0 ] && status=failed; [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  printf '%s\t%s\t%s\trc=%s\n' "$name" "$status" "$dt" "$rc" >> "$WORK/steps.tsv"
  echo "=== [$name] $status in ${dt}s"
done

$PY scripts/gpu_check_report.py "$WORK" "$OUTDIR" "$DOC"
cp "$DOC" "$OUTDIR/BENCHMARKS.md" 2>/dev/null
tar -czf "$OUTDIR/gpu_check_logs.tgz" -C "$WORK" --exclude=site --exclude=train --exclude='*.pt' . 2>/dev/null
echo "total $(($(date +%s) - START))s; results in $OUTDIR"
