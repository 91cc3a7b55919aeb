#!/usr/bin/env bash
# One-shot GPU check: build ddfast's extension for this machine's GPU architecture only, run the CUDA tests, the op
# benchmarks and the end-to-end benchmark on the GPU, and write every figure and log to one folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: gpu-results/; $OUT when set)
#
# GPU_CHECK_TARBALL=path.tar.gz: also pack OUT_DIR into that archive after every step (so that a run stopped at an
# outer time limit still hands back every finished step's logs and figures).
#
# Needs a Python with a CUDA build of torch (and torchvision, pytest; pytest-xdist is used when present) and nvcc
# (CUDA_HOME, or nvcc on PATH). Measured on an H200 with 16 cores (2026-12-04): build 41 s, op tests 151 s with 8
# workers, the CUDA-graph benchmark 36 s, the op benchmarks 66 s; with the end-to-end runs and the DATM graph test
# about 8-9 minutes. Steps run in order of value; each has its own time limit, and a failed step does not stop
# the later ones. Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-results}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks and the tests' subprocesses import ddfast from here
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
  [ -z "${GPU_CHECK_TARBALL:-}" ] || tar czf "$GPU_CHECK_TARBALL" -C "$OUT_DIR" .
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
# (not named CC: torch's extension builder passes $CC to nvcc as the host compiler, -ccbin)
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST="$CAP" DDFAST_BUILD_CUDA=1 MAX_JOBS="$(nproc)"
step build 240 "$PY" setup.py build_ext --inplace
"$PY" -c "import ddfast.ops as o; print(o.build_info())" >"$OUT_DIR/build_info.txt" 2>&1

# 2b. an error raised inside a compiled kernel must reach Python as an exception, not end the process; each case
#     in its own interpreter (exit status < 0: killed by that signal), with the toolchain that built the extension
step error_path 60 "$PY" - <<'PYEOF'
import os, subprocess, sys
pre = "import torch, ddfast.ops; x = torch.randn(3, 4)\n"
cases = {
    "aten_error": "torch.ones(2) @ torch.ones(3)",
    "ddfast_cpu_value_error": "torch.ops.ddfast.trajectory_matching_loss_forward(x[0], x[0], x[0])",
    "ddfast_cpu_type_error": "torch.ops.ddfast.trajectory_matching_loss_forward(x, x.double(), x)",
    "ddfast_cuda_value_error": "y = x.cuda(); torch.ops.ddfast.trajectory_matching_loss_forward(y[0], y[0], y[0])",
}
bad = 0
for name, code in cases.items():
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", pre + "try:\n    " + code +
                        "\nexcept Exception as e:\n    print('raised', type(e).__name__)"],
                       capture_output=True, text=True, timeout=50)
    ok = r.returncode == 0 and "raised" in r.stdout
    bad += not ok
    print(f"{name}: exit {r.returncode} {'OK' if ok else 'FAILED'} {r.stdout.strip()}")
    if not ok:
        print("  stderr:", "\n  ".join(r.stderr.strip().splitlines()[-12:]))
for cmd in ("${CXX:-g++} --version", "/usr/bin/g++ --version", "ldd ddfast/_C*.so",
            "readelf -S --wide ddfast/_C*.so"):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines()
             if "readelf" not in cmd or "eh_frame" in ln or "gcc_except" in ln]
    print("$", cmd, "\n  " + "\n  ".join(lines[:12]))
sys.exit(bad)
PYEOF

# 3. the CUDA tests (the op tests parametrise over CUDA when a GPU is present), in parallel when pytest-xdist is there
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step tests_ops 180 "$PY" -m pytest -q tests/ops -p no:cacheprovider "${XDIST[@]}"
# DATM with cuda_graph=True against the eager loop (its static iteration is checked on the CPU in CI)
step tests_datm_graph 120 "$PY" -m pytest -q tests/distill/test_distill_datm.py -k graph -p no:cacheprovider

# 4. the DATM iteration captured in a CUDA graph against the same loop run eagerly
cp benchmarks/results.csv "$OUT_DIR/results_before.csv" 2>/dev/null || true
step bench_cuda_graph 120 "$PY" benchmarks/bench_cuda_graph.py --iters 10 --json "$OUT_DIR/cuda_graph.json"

# 5. end to end: one distillation iteration of each method against the official-loop ports, at the quick width and
#    at the papers' width 128
step bench_e2e_quick 150 "$PY" benchmarks/bench_e2e.py --device cuda --iters 10 --no-mem \
  --json "$OUT_DIR/e2e_quick.json"

# 6. op benchmarks on the GPU (the compiled op against the eager reference)
step bench_convnet 90 "$PY" benchmarks/bench_convnet.py --device cuda --repeats 20 --providers ddfast,eager
step bench_trajectory 45 "$PY" benchmarks/bench_trajectory.py --device cuda --providers ddfast,eager
step bench_krr 45 "$PY" benchmarks/bench_krr.py --device cuda --providers ddfast,eager
step bench_trust 45 "$PY" benchmarks/bench_trust.py --device cuda --providers ddfast,eager
step bench_e2e_w128 120 "$PY" benchmarks/bench_e2e.py --device cuda --iters 5 --width 128 --no-plain --mem-iters 1 \
  --json "$OUT_DIR/e2e_w128.json"

if [ -f benchmarks/results.csv ]; then
  if [ -f "$OUT_DIR/results_before.csv" ]; then
    tail -n +"$(( $(wc -l <"$OUT_DIR/results_before.csv") + 1 ))" benchmarks/results.csv >"$OUT_DIR/results_gpu.csv"
  else
    cp benchmarks/results.csv "$OUT_DIR/results_gpu.csv"
  fi
fi
echo "failed steps: $FAILED (logs and figures in $OUT_DIR)"
[ -z "${GPU_CHECK_TARBALL:-}" ] || tar czf "$GPU_CHECK_TARBALL" -C "$OUT_DIR" .
exit "$FAILED"
