#!/usr/bin/env bash
# The GPU check, in three stages, each one call of the device tool's `run` on a lent H100/H200 (python3 there is
# Python 3.12 with torch 2.11 and torchvision; nvcc 13; 16 cores). One budget is 15 minutes of device time in all,
# machine starts (a minute or more each) and idle warmth (about 30 s after each call) included; every call finds a
# fresh machine, so each stage first builds moco_ext just in time. Stages 1 and 2 fit one budget, in this order,
# each followed by give_back; stage 3 is the next budget's first call:
#
#   run(command="OUT=$OUT GPU_CHECK_REQUIRE_GPU=1 bash tests/gpu_check.sh 1", timeout_s=330)  # the kernels
#   run(command="OUT=$OUT GPU_CHECK_REQUIRE_GPU=1 bash tests/gpu_check.sh 2", timeout_s=330)  # the scripts
#   run(command="OUT=$OUT GPU_CHECK_REQUIRE_GPU=1 bash tests/gpu_check.sh 3", timeout_s=330)  # compile, e2e
#
# Each stage has a deadline of 300 s (DEADLINE_S) and its steps' time limits add up to it, so that no step is cut
# unless DEADLINE_S is lowered; the steps run in order of priority. A step that passes its own limit is a TIMEOUT
# (a failure); one cut because the stage's deadline came first is reported as cut, and one not started for that
# reason as skipped, neither a failure. The limits are set from the CPU dry runs and estimates, not yet from a GPU.
#   1: s1_build.txt    versions, nvidia-smi; the JIT build (MOCO_EXT_JIT=1, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
#      s1_kernels.txt  tests/check_kernels.py --device cuda: moco_ext.unusable_reason('cuda') is None (the real
#                      check), loss, n_beat, dq, dk against float64 at N 256/4096, C 128, K 65536, T 0.07/0.2 for
#                      fp32, TF32 and bf16 inputs; enqueue_ at N 4096 with wrap-around, and C = 0
#      s1_infonce.txt  tests/bench_infonce.py --device cuda: fused against moco.py's own eager path for fp32, TF32
#                      and bf16 at K 65536 (N 256, 4096) and K 4096 (N 256, 512), floors from this GPU, and what
#                      moco.py --fused auto chooses at each shape
#      s1_tests.txt    python -m pytest -k cuda tests/test_ext.py (the CUDA kernel tests, MOCO_EXT_EXPECT_CUDA=1)
#      s1_sanitizer.txt  compute-sanitizer memcheck and racecheck on check_kernels.py --sanitize (small odd shapes),
#                      limited to the project's kernels (--kernel-name kns=moco_ext); a sanitizer that cannot run
#                      here ("Device not supported", error 999) is reported as unusable, not as a failure
#   2: s2_build.txt    the JIT build; every moco.py/dim.py/eval_linear.py command of the stage parsed by its parser
#      s2_fused.txt    moco.py --fused on against off (and off again) for 20 steps at --lr 1e-30, where the weights
#                      never move (the updates are far below fp32 resolution), so each step compares the two losses
#                      on the same state: 1e-5 relative (fp32 dot products of 128 terms and a logsumexp over 4097
#                      logits: ~1e-7 measured on the CPU), or twice the spread between the two --fused off runs
#      s2_moco.txt     moco.py --amp --gpu-aug off (--fused auto: its measurement and choice, also in the summary);
#                      eval_linear.py on its checkpoint
#      s2_ddp.txt      torchrun --standalone --nproc_per_node=1 moco.py (NCCL)
#      s2_dim.txt      dim.py --amp
#   3: s3_build.txt, s3_moco.txt (moco.py --amp --compile --gpu-aug on), s3_ddp.txt (torchrun with --bn sync),
#      s3_tests.txt (python -m pytest -k cuda tests/test_gpu_aug.py), s3_e2e.txt (tests/bench_memory.py --device
#      cuda: the measured peak of v2, cifar and dimL beside the CPU's estimate; tests/bench_e2e.py --flags --amp)
# Every stage also writes sN_summary.txt (one line per step: PASS, FAIL, TIMEOUT, cut or skipped with the reason)
# and ends with one line "kernels: PASS|FAIL" (stage 1; stage 2 "scripts: ...", stage 3 "benchmarks: ..."), the
# exit status 0 only if no step failed. At most 6 files per stage, no folders (the tool brings back 8).
#
# The GPU is probed first (torch.cuda.init() in ${PYTHON:-python3}; its output is shown). With
# GPU_CHECK_REQUIRE_GPU=1 a stage without a visible GPU fails at once; without it, or with GPU_CHECK_DRY=1, the stage
# is a dry run: each CUDA step prints "[STEP] skipped: no CUDA GPU", the steps that can run on the CPU run at toy
# sizes (check_kernels.py on the CPU kernels, the --fused pair, bench_infonce.py --quick, bench_e2e.py), and
# tests/test_bench.py runs each stage so. GPU_CHECK_PLAN=1 prints the commands a GPU run would run, each checked
# by bash -n, and runs none. A failed build stops the stage (the steps after it are skipped). On a GPU the build
# goes to its own extension folder (GPU_CHECK_EXT_DIR, default ${GPU_CHECK_TMP:-/tmp/moco_gpu_check}/extensions),
# where a lock file left by a build that was killed is removed first (where torch's lock is a file whose existence
# blocks, the next build would wait on it forever); elsewhere to torch's usual one (TORCH_EXTENSIONS_DIR),
# whose locks it leaves alone unless GPU_CHECK_EXT_DIR names it. Runs' folders (checkpoints, metrics) go to
# ${GPU_CHECK_TMP:-/tmp/moco_gpu_check}/sN, not to $OUT. Nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
case "$stage" in 1|2|3) ;; *) echo "usage: OUT=DIR bash tests/gpu_check.sh 1|2|3" >&2; exit 2 ;; esac
names=(- kernels scripts benchmarks)
export PY=${PYTHON:-python3} OUT=${OUT:-/tmp/moco_gpu_check_out} ROOT_TMP=${GPU_CHECK_TMP:-/tmp/moco_gpu_check}
export TMPD=$ROOT_TMP/s$stage
rm -rf "$TMPD"
mkdir -p "$OUT" "$TMPD"
export MOCO_EXT_JIT=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
summary="$OUT/s${stage}_summary.txt"
: > "$summary"
failed=0 cut=0 build_failed=0 scale=1

verdict() {  # the closing line; exit status 0 only if no step failed
  local v=PASS
  [ "$failed" = 0 ] || v=FAIL
  echo "gpu_check stage $stage: $failed step(s) failed, $cut cut or skipped by the deadline${end:+, $(( end - \
$(date +%s) )) s before it}" | tee -a "$summary"
  echo "${names[$stage]}: $v" | tee -a "$summary"
  [ "$failed" = 0 ]
  exit
}

if [ "${GPU_CHECK_PLAN:-0}" = 1 ]; then
  GPU=1
  echo "stage $stage: plan (GPU_CHECK_PLAN=1): the GPU run's commands, each checked by bash -n, none run" \
    | tee -a "$summary"
elif [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  GPU=0
  echo "stage $stage: dry run (GPU_CHECK_DRY=1)" | tee -a "$summary"
else
  probe=$(timeout 60 "$PY" - 2>&1 <<'PYEOF'
import sys
import torch
try:
    torch.cuda.init()
    print("torch", torch.__version__, "| GPU", torch.cuda.get_device_name())
except Exception as e:
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): {type(e).__name__}: {e}")
print(int(torch.cuda.is_available()))
PYEOF
)
  GPU=$(printf '%s\n' "$probe" | tail -n 1)
  case $GPU in 0|1) probe=$(printf '%s\n' "$probe" | sed '$d') ;; *) GPU=0 ;; esac  # else: the probe's error
  printf '%s\n' "$probe" | tail -n 12 | sed 's/^/probe | /' | tee -a "$summary"
  if [ "$GPU" != 1 ] && [ "${GPU_CHECK_REQUIRE_GPU:-0}" = 1 ]; then
    echo "stage $stage: FAIL at once: no CUDA GPU visible to $PY (GPU_CHECK_REQUIRE_GPU=1); the probe's output above" \
      | tee -a "$summary"
    failed=1
    verdict
  fi
  [ "$GPU" = 1 ] || echo "stage $stage: dry run (no CUDA GPU visible to $PY)" | tee -a "$summary"
fi
export GPU
[ "$GPU" = 1 ] || scale=3  # a dry run: a busy CPU, slower than the GPU machine's 16 cores; the same order of steps
end=$(( $(date +%s) + ${DEADLINE_S:-$((300 * scale))} ))
echo "gpu_check stage $stage: $(date -u), $PY, OUT=$OUT, deadline in $(( end - $(date +%s) )) s" | tee -a "$summary"
if [ "$GPU" = 1 ]; then export MOCO_EXT_EXPECT_CUDA=1 MOCO_EXT_VERBOSE=1; fi
if [ "$GPU" = 1 ] || [ -n "${GPU_CHECK_EXT_DIR:-}" ]; then  # the check's own extension folder
  export TORCH_EXTENSIONS_DIR=${GPU_CHECK_EXT_DIR:-$ROOT_TMP/extensions} OWN_EXT=1
fi

# step NAME LIMIT_S NEED FILE CMD: CMD (a shell string, run by bash -o pipefail -c) under `timeout`, its output
# to $OUT/FILE and stdout. NEED: cuda (skipped without a GPU) or any.
step() {
  local name=$1 limit=$(( $2 * scale )) need=$3 file=$OUT/$4 cmd=$5 left t0 rc verdict by_deadline=0
  if [ "$need" = cuda ] && [ "$GPU" != 1 ]; then
    echo "[$name] skipped: no CUDA GPU" | tee -a "$file" "$summary"
    return
  fi
  if [ "$build_failed" = 1 ]; then
    echo "[$name] skipped: the build failed" | tee -a "$file" "$summary"
    return
  fi
  left=$(( end - $(date +%s) ))
  if (( left < 5 )); then
    echo "[$name] skipped: the stage's deadline is reached" | tee -a "$file" "$summary"
    cut=$((cut + 1))
    return
  fi
  (( limit > left )) && limit=$left by_deadline=1
  echo "== $name (limit $limit s): $cmd" | tee -a "$file"
  if [ "${GPU_CHECK_PLAN:-0}" = 1 ]; then
    if bash -n -c "$cmd"; then
      echo "[$name] planned (limit $limit s)" >> "$summary"
    else
      echo "[$name] BAD COMMAND" >> "$summary"
      failed=$((failed + 1))
    fi
    return
  fi
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -o pipefail -c "$cmd" 2>&1 | tee -a "$file"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) verdict=PASS ;;
    124|137) if [ "$by_deadline" = 1 ]; then verdict="cut by the stage's deadline after $limit s"
             else verdict="TIMEOUT after its limit of $limit s"; fi ;;
    *) verdict=FAIL ;;
  esac
  case $verdict in PASS) ;; cut*) cut=$((cut + 1)) ;; *) failed=$((failed + 1)) ;; esac
  echo "== $name rc=$rc in $(( $(date +%s) - t0 )) s: $verdict" | tee -a "$file"
  echo "[$name] rc=$rc in $(( $(date +%s) - t0 )) s: $verdict" >> "$summary"
}

load() {  # versions, then moco_ext: the pip-built library, else the JIT build (a fresh machine: always)
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
    || echo "nvidia-smi: none"
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: none"; fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" \
    "TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-default}"
  if [ "${OWN_EXT:-0}" = 1 ]; then  # a build killed by a timeout leaves torch's lock; the next would wait on it
    find "$TORCH_EXTENSIONS_DIR" -mindepth 2 -maxdepth 2 -name lock -type f -print -delete 2>/dev/null \
      | sed 's/^/removed a stale build lock: /'
  fi
  "$PY" - <<'PYEOF'
import sys, time
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none", flush=True)
t = time.time()
import moco_ext
print(f"moco_ext loaded in {time.time() - t:.0f} s: HAS_CUDA {moco_ext.HAS_CUDA},",
      f"CUDA_ARCHS {moco_ext.CUDA_ARCHS or 'none'}")
PYEOF
}

flagcheck() {  # flagcheck FILE: each line "SCRIPT<TAB>FLAGS" parsed by that script's own parser (nothing runs)
  "$PY" - "$1" <<'PYEOF'
import shlex, sys
sys.path.insert(0, ".")
import dim, eval_linear, moco
for line in open(sys.argv[1]):
    script, args = line.rstrip("\n").split("\t")
    if script == "moco.py":
        moco.parse_args(shlex.split(args))
    elif script == "dim.py":
        dim.resolve(dim.parse_args(shlex.split(args))[0])
    else:
        eval_linear.parse_args(shlex.split(args))
    print("flags parse:", script, args)
PYEOF
}

compare() {  # compare LABEL ON OFF [OFF2]: the runs' logged losses (metrics.jsonl) step by step; OFF2: a second
  # --fused off run of the same command, whose spread measures the eager path's own noise
  "$PY" - "$@" <<'PYEOF'
import json, sys
label, runs = sys.argv[1], sys.argv[2:]
loss = [[r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r] for d in runs]
n = len(loss[0])
if n == 0 or any(len(x) != n for x in loss):
    sys.exit(f"{label}: the runs logged {[len(x) for x in loss]} losses")
gap = [abs(a - b) / abs(b) for a, b in zip(loss[0], loss[1])]  # --fused on against off, relative
noise = max(abs(a - b) / abs(b) for a, b in zip(loss[1], loss[2])) if len(loss) > 2 else 0.0
tol = max(1e-5, 2 * noise)  # the rounding of one step, or twice the eager path's own run-to-run spread
print(f"{label}: {n} steps, |loss(on) - loss(off)| / loss(off) per step: " + " ".join(f"{g:.0e}" for g in gap))
if len(loss) > 2:
    print(f"{label}: spread between two --fused off runs: max {noise:.1e}")
bad = [i + 1 for i, g in enumerate(gap) if not g <= tol]
print(f"{label}: steps 1-{n} within {tol:.1e}: {'yes' if not bad else f'NO, steps {bad}'}")
sys.exit(1 if bad else 0)
PYEOF
}
export -f load flagcheck compare

build() {  # the stage's first step; a dry run of stages 2 and 3 leaves the build to the steps that load moco_ext
  if [ "$GPU" = 1 ] || [ "$stage" = 1 ]; then
    step build "$1" any "s${stage}_build.txt" load
    if grep -q "^\[build\] rc=[1-9]" "$summary"; then
      build_failed=1
    fi
  else
    echo "[build] skipped: dry run (the steps below load moco_ext themselves)" \
      | tee -a "$OUT/s${stage}_build.txt" "$summary"
  fi
}

stage1() {  # limits: 100 + 40 + 60 + 40 + 30 + 30 = 300 s
  build 100
  local dev=cpu quick=--quick san
  [ "$GPU" = 1 ] && dev=cuda quick=
  step kernels 40 any s1_kernels.txt "\"\$PY\" tests/check_kernels.py --device $dev"
  step infonce 60 any s1_infonce.txt "\"\$PY\" tests/bench_infonce.py --device $dev $quick"
  step cuda_tests 40 cuda s1_tests.txt \
    "\"\$PY\" -m pytest -q -rs -p no:cacheprovider --durations=5 -k cuda tests/test_ext.py"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
        "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" 2>/dev/null | head -n 1)
  [ -z "$san" ] && [ "${GPU_CHECK_PLAN:-0}" = 1 ] && san=compute-sanitizer  # a plan shows the commands anyway
  if [ "$GPU" = 1 ] && [ -z "$san" ]; then
    echo "[memcheck] skipped: compute-sanitizer not found" | tee -a "$OUT/s1_sanitizer.txt" "$summary"
    echo "[racecheck] skipped: compute-sanitizer not found" | tee -a "$OUT/s1_sanitizer.txt" "$summary"
    return
  fi
  # only our kernels (their mangled names hold the namespace moco_ext), and no caching allocator under memcheck: an
  # access past a tensor's end then leaves its allocation. A sanitizer refused by the machine is not a failure.
  local only="--kernel-name kns=moco_ext --error-exitcode 1"
  step memcheck 30 cuda s1_sanitizer.txt "sanitizer_unusable env PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$san' \
--tool memcheck $only \"\$PY\" tests/check_kernels.py --device cuda --sanitize"
  step racecheck 30 cuda s1_sanitizer.txt "sanitizer_unusable '$san' --tool racecheck $only \"\$PY\" \
tests/check_kernels.py --device cuda --sanitize"
}

sanitizer_unusable() {  # CMD...: CMD's status, except 0 with a note where the sanitizer cannot run on this machine
  local log rc
  log=$(mktemp)
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ] && grep -qE "Device not supported|error 999|Unable to find injection library|Target application \
terminated before first instrumented API call" "$log"; then
    echo "sanitizer unusable here (exit $rc): not a failure of the kernels"
    rc=0
  fi
  rm -f "$log"
  return "$rc"
}
export -f sanitizer_unusable

stage2() {  # limits: 100 + 15 + 60 + 35 + 30 + 35 + 25 = 300 s
  build 100
  local common steps
  if [ "$GPU" = 1 ]; then  # preset small (basic32, batch 256, K 4096) on the built-in data
    steps=20
    common="--epochs 2 --max-steps $steps --log-every 1 --knn-every 0 --workers 4"
  else
    steps=3
    common="--device cpu --epochs 1 --max-steps $steps --log-every 1 --knn-every 0 --workers 0"
    common="$common --batch-size 32 --moco-k 96"
  fi
  local amp="$common --amp --gpu-aug off --out $TMPD/amp"
  local dimf="--epochs 1 --max-steps 30 --log-every 5 --knn-every 0 --workers 4 --amp --out $TMPD/dim"
  local ddpf="--epochs 1 --max-steps 20 --log-every 5 --knn-every 0 --workers 4 --out $TMPD/ddp"
  local evalf="--pretrained $TMPD/amp/ckpt.pt --epochs 2 --workers 4 --out $TMPD/eval.json"
  local torchrun="\"\$PY\" -m torch.distributed.run --standalone --nproc_per_node=1 moco.py"  # = torchrun
  printf '%s\t%s\n' moco.py "$amp" dim.py "$dimf" moco.py "$ddpf" eval_linear.py "$evalf" \
    moco.py "$common --gpu-aug on --fused on --lr 1e-30 --out $TMPD/frozen_on" > "$TMPD/argv.txt"
  if [ "$GPU" = 1 ]; then
    step flags 15 any s2_build.txt "flagcheck '$TMPD/argv.txt'"
  else  # the CPU runs below parse their flags; tests/test_bench.py parses the GPU run's (GPU_CHECK_PLAN=1)
    echo "[flags] skipped: dry run (the GPU run's flags are parsed by tests/test_bench.py)" \
      | tee -a "$OUT/s2_build.txt" "$summary"
  fi
  # --fused on against off with frozen weights: every step on the same state
  local off2=""
  [ "$GPU" = 1 ] && off2=off2
  step fused 60 any s2_fused.txt "for f in on off $off2; do \"\$PY\" moco.py $common --gpu-aug on --fused \${f%2} \
--lr 1e-30 --out $TMPD/frozen_\$f 2>&1 | tail -n 3 || exit 1; done; compare 'frozen weights (--lr 1e-30)' \
$TMPD/frozen_on $TMPD/frozen_off ${off2:+$TMPD/frozen_off2}"
  step moco_amp 35 cuda s2_moco.txt "\"\$PY\" moco.py $amp"
  grep -h "^fused InfoNCE: " "$OUT/s2_moco.txt" 2>/dev/null | sed 's/^/--fused auto chose: /' | tee -a "$summary"
  step eval_linear 30 cuda s2_moco.txt "\"\$PY\" eval_linear.py $evalf"
  step torchrun 35 cuda s2_ddp.txt "$torchrun $ddpf"
  step dim_amp 25 cuda s2_dim.txt "\"\$PY\" dim.py $dimf"
}

stage3() {  # limits: 100 + 75 + 30 + 30 + 25 + 40 = 300 s
  build 100
  local common="--epochs 2 --max-steps 20 --log-every 5 --knn-every 0 --workers 4"
  local torchrun="\"\$PY\" -m torch.distributed.run --standalone --nproc_per_node=1 moco.py"
  printf '%s\t%s\n' moco.py "$common --amp --compile --gpu-aug on --out $TMPD/compile" \
    moco.py "$common --bn sync --out $TMPD/ddp_sync" > "$TMPD/argv.txt"
  step moco_amp_compile 75 cuda s3_moco.txt "\"\$PY\" moco.py $common --amp --compile --gpu-aug on --out $TMPD/compile"
  step torchrun_bn_sync 30 cuda s3_ddp.txt "$torchrun $common --bn sync --out $TMPD/ddp_sync"
  step gpu_aug_tests 30 cuda s3_tests.txt "\"\$PY\" -m pytest -q -rs -p no:cacheprovider -k cuda tests/test_gpu_aug.py"
  if [ "$GPU" = 1 ]; then
    step memory 25 any s3_e2e.txt "\"\$PY\" tests/bench_memory.py --device cuda --presets v2,cifar,dimL"
    step e2e_amp 40 any s3_e2e.txt "\"\$PY\" tests/bench_e2e.py --epochs 3 --flags '--amp'"
  else
    step e2e 55 any s3_e2e.txt "\"\$PY\" tests/bench_e2e.py --images 128 --test-images 128 --epochs 2 \
--flags '--device cpu --arch basic32 --batch-size 32 --moco-k 64 --workers 0'"
  fi
}

"stage$stage"
verdict
