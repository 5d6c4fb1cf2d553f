#!/usr/bin/env bash
# One-shot GPU check for the lent H200 machine (torch 2.11, Python 3.12, nvcc 13), written to fit one
# 10-minute call; never run on a GPU yet.
# Runs in the repository root; every step has a time limit inside an overall deadline (DEADLINE_S, default 560 s),
# in order of priority, and writes its output under $OUT:
#   build.txt  JIT build of csrc/ with the CUDA kernels (MOCO_EXT_JIT=1, MAX_JOBS=16)
#   tests.txt  python -m pytest -q tests/test_ext.py        (CPU and CUDA kernel tests)
#   infonce.txt python tests/bench_infonce.py               (fused InfoNCE vs eager; CPU row, then GPU rows)
#   train.txt  python tests/bench_train.py                  (ours vs the official-style step, ResNet-50 v2 etc.)
#   e2e.txt    python tests/bench_e2e.py (--amp, then --amp --compile): 200 CIFAR-sized epochs, estimated
# Usage: OUT=/path/to/dir bash tests/gpu_check.sh     (exit status: that of the kernel tests)
set -uo pipefail
OUT=${OUT:-/tmp/moco_gpu_check}
mkdir -p "$OUT"
export MOCO_EXT_JIT=1 MAX_JOBS=16 MOCO_EXT_EXPECT_CUDA=1 MOCO_EXT_VERBOSE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/moco_ext_jit}  # build files stay out of $OUT
end=$(( $(date +%s) + ${DEADLINE_S:-560} ))
left() { local l=$(( end - $(date +%s) )); (( l < $1 )) && echo $(( l > 1 ? l : 1 )) || echo "$1"; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
                                     'cuda', torch.version.cuda)"
  start=$(date +%s)
  timeout "$(left 300)" python -c "import moco_ext; print('moco_ext HAS_CUDA =', moco_ext.HAS_CUDA)"
  echo "build+import rc=$? in $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/build.txt"

timeout "$(left 150)" python -m pytest -q -rs --durations=10 tests/test_ext.py 2>&1 | tee "$OUT/tests.txt"
rc=${PIPESTATUS[0]}
echo "tests rc=$rc" | tee -a "$OUT/tests.txt"

timeout "$(left 90)" python tests/bench_infonce.py 2>&1 | tee "$OUT/infonce.txt"
timeout "$(left 200)" python tests/bench_train.py 2>&1 | tee "$OUT/train.txt"
timeout "$(left 100)" python tests/bench_e2e.py --epochs 3 --flags "--amp" 2>&1 | tee "$OUT/e2e.txt"
timeout "$(left 200)" python tests/bench_e2e.py --epochs 3 --flags "--amp --compile" 2>&1 | tee -a "$OUT/e2e.txt"
echo "gpu_check done at $(date -u), $(( end - $(date +%s) )) s before the deadline"
exit "$rc"
