#!/usr/bin/env bash
# One-shot GPU check: build ddfast's extension for this machine's GPU architecture only, run the CUDA tests, the op
# benchmarks and the end-to-end benchmark on the GPU, and write every figure and log to one folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: gpu-results/; $OUT when set)
#
# Needs a Python with a CUDA build of torch (and torchvision, pytest) and nvcc (CUDA_HOME, or nvcc on PATH). Budget:
# about 8 minutes on an H100 / H200 (build ~2-3 min with all cores, tests ~1 min, benchmarks ~4 min); every step has
# its own time limit and a failed step does not stop the later ones. Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-results}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
FAILED=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT_DIR/NAME.log, record status and duration
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT_DIR/steps.txt"
  tail -n 5 "$OUT_DIR/$name.log"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
}

# 1. the machine
{
  date -u
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc
} >"$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"

# 2. build for this GPU only (compute capability from the driver, e.g. 9.0 for H100/H200)
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST="$CC" DDFAST_BUILD_CUDA=1 MAX_JOBS="$(nproc)"
step build 300 "$PY" setup.py build_ext --inplace
"$PY" -c "import ddfast.ops as o; print(o.build_info())" >"$OUT_DIR/build_info.txt" 2>&1

# 3. the CUDA tests (the op tests parametrise over CUDA when a GPU is present) and a CPU/GPU agreement smoke run
step tests_ops 180 "$PY" -m pytest -q -x tests/ops -p no:cacheprovider
step tests_models 120 "$PY" -m pytest -q tests/distill/test_models.py -p no:cacheprovider

# 4. op benchmarks on the GPU (one CSV: benchmarks/results.csv rows are copied to OUT_DIR)
cp benchmarks/results.csv "$OUT_DIR/results_before.csv" 2>/dev/null || true
step bench_convnet 120 "$PY" benchmarks/bench_convnet.py --device cuda --repeats 20
step bench_trajectory 60 "$PY" benchmarks/bench_trajectory.py --device cuda
step bench_krr 60 "$PY" benchmarks/bench_krr.py --device cuda
step bench_trust 60 "$PY" benchmarks/bench_trust.py --device cuda

# 5. end to end: one distillation iteration of each method against the official-loop ports, at the quick width and
#    at the papers' width 128
step bench_e2e_quick 120 "$PY" benchmarks/bench_e2e.py --device cuda --iters 10 --json "$OUT_DIR/e2e_quick.json"
step bench_e2e_w128 120 "$PY" benchmarks/bench_e2e.py --device cuda --iters 5 --width 128 --no-plain \
  --json "$OUT_DIR/e2e_w128.json"

if [ -f benchmarks/results.csv ]; then
  if [ -f "$OUT_DIR/results_before.csv" ]; then
    tail -n +"$(( $(wc -l <"$OUT_DIR/results_before.csv") + 1 ))" benchmarks/results.csv >"$OUT_DIR/results_gpu.csv"
  else
    cp benchmarks/results.csv "$OUT_DIR/results_gpu.csv"
  fi
fi
echo "failed steps: $FAILED (logs and figures in $OUT_DIR)"
exit "$FAILED"
