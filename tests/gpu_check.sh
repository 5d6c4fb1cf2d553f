#!/usr/bin/env bash
# GPU check for moco_ext, for the lent H200 machine (torch 2.11, Python 3.12, nvcc 13).
# Runs in the repository root and writes everything under $OUT:
#   build.txt  JIT build of csrc/ with the CUDA kernels (MOCO_EXT_JIT=1, MAX_JOBS=16)
#   tests.txt  python -m pytest -q tests/test_ext.py   (CPU and CUDA tests)
#   bench.txt  python tests/bench_infonce.py           (CPU row, then the GPU rows)
# Usage: OUT=/path/to/dir bash tests/gpu_check.sh     (exit status: that of the tests)
set -uo pipefail
OUT=${OUT:-/tmp/moco_ext_gpu_check}
mkdir -p "$OUT"
export MOCO_EXT_JIT=1 MAX_JOBS=16 MOCO_EXT_EXPECT_CUDA=1 MOCO_EXT_VERBOSE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/moco_ext_jit}  # build files stay out of $OUT

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  start=$(date +%s)
  timeout 900 python -c "import moco_ext; print('moco_ext HAS_CUDA =', moco_ext.HAS_CUDA)"
  echo "build+import rc=$? in $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/build.txt"

timeout 600 python -m pytest -q -rs --durations=10 tests/test_ext.py 2>&1 | tee "$OUT/tests.txt"
rc=${PIPESTATUS[0]}

timeout 300 python tests/bench_infonce.py 2>&1 | tee "$OUT/bench.txt"
echo "tests rc=$rc" | tee -a "$OUT/tests.txt"
exit "$rc"
