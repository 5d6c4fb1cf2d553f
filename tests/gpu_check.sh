#!/usr/bin/env bash
# The GPU check, in three stages, each one short call of the device tool's `run` on a lent H100/H200 (python3 there
# is Python 3.12 with torch 2.11 and torchvision; nvcc 13; 16 cores). A fresh machine takes a minute or more to
# start, and each stage first builds moco_ext just in time (about a minute; nothing on a machine still warm from
# the stage before, whose build cache it reuses):
#
#   run(command="OUT=$OUT bash tests/gpu_check.sh 1", timeout_s=300)   # ~4 min: the kernels
#   run(command="OUT=$OUT bash tests/gpu_check.sh 2", timeout_s=360)   # ~5 min: the training scripts on the GPU
#   run(command="OUT=$OUT DEADLINE_S=240 bash tests/gpu_check.sh 3", timeout_s=300)   # the rest: the benchmarks
#
# Stage N writes $OUT/sN_*.txt, at most 7 files, no folders (the tool brings back 8): one file per group of steps,
# each step's command, output and "== STEP rc=R in S s: PASS|FAIL|TIMEOUT", and sN_summary.txt, one line per
# step (PASS, FAIL, TIMEOUT, or skipped with the reason). The exit status is 0 only if no step failed. Each step
# has its own time limit inside the stage's deadline (DEADLINE_S, default 240, 300, 300 s); the steps run in order
# of priority, so a stage cut short loses its last ones.
#   1: s1_build.txt    versions, nvidia-smi; the JIT build (MOCO_EXT_JIT=1, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
#      s1_kernels.txt  tests/check_kernels.py --device cuda: moco_ext.unusable_reason('cuda') is None (the real
#                      check), loss, n_beat, dq, dk against float64 at N 256/4096, C 128, K 65536, T 0.07/0.2 for
#                      fp32, TF32 and bf16 inputs; enqueue_ at N 4096 with wrap-around, and C = 0
#      s1_tests.txt    python -m pytest -k cuda tests/test_ext.py (the CUDA kernel tests, MOCO_EXT_EXPECT_CUDA=1)
#      s1_sanitizer.txt  compute-sanitizer memcheck and racecheck on check_kernels.py --sanitize (small odd shapes)
#   2: s2_build.txt    the JIT build; every moco.py/dim.py/eval_linear.py command of the stage parsed by its parser
#                      (on the GPU; a dry run leaves that to tests/test_bench.py's plan of the GPU run)
#      s2_fused.txt    moco.py --fused on against off for 50 steps, twice. With --lr 1e-30 the weights never move
#                      (the updates are far below fp32 resolution), so each step compares the two losses on the
#                      same state: rounding alone, the arithmetic's tolerance, 1e-5 relative (fp32 dot products of
#                      128 terms and a logsumexp over 4097 logits: ~1e-7 measured on the CPU), or twice the spread
#                      between two --fused off runs where cuDNN's algorithm choice makes runs differ. At the
#                      preset's lr, the same tolerance for the first 5 steps; training then amplifies rounding as in
#                      any two runs (1e-7 grew to 6e-5 by step 27 on the CPU), so the later gap is printed only.
#      s2_moco.txt     moco.py --amp --gpu-aug off; --amp --compile --gpu-aug on; eval_linear.py on the --amp checkpoint
#      s2_dim.txt      dim.py --amp
#      s2_ddp.txt      torchrun --standalone --nproc_per_node=1 moco.py (NCCL), then with --bn sync
#      s2_tests.txt    python -m pytest -k cuda tests/test_gpu_aug.py
#   3: s3_build.txt, s3_infonce.txt (tests/bench_infonce.py --device cuda: fused against eager for fp32, TF32 and
#      bf16 at N 256/4096, one table, floors from this GPU's own bandwidth), s3_train.txt (tests/bench_train.py;
#      tests/bench_memory.py --device cuda: each preset's measured peak beside the CPU's estimate),
#      s3_e2e.txt (tests/bench_e2e.py --flags "--amp", then "--amp --compile")
#
# Without a visible GPU, or with GPU_CHECK_DRY=1, a stage is a dry run: each CUDA step prints one line "[STEP]
# skipped: no CUDA GPU", and the steps that can run on the CPU run at toy sizes (check_kernels.py on the CPU kernels,
# the --fused pair, the benchmarks' --quick/--tiny runs). tests/test_bench.py runs each stage so:
# only the GPU can make a stage fail. The python is ${PYTHON:-python3}, whatever its versions; nothing is installed.
# Runs' folders (checkpoints, metrics) go to ${GPU_CHECK_TMP:-/tmp/moco_gpu_check}/sN, not to $OUT. GPU_CHECK_PLAN=1
# prints the commands a GPU run would run, each checked by bash -n, and runs none.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
case "$stage" in 1|2|3) ;; *) echo "usage: OUT=DIR bash tests/gpu_check.sh 1|2|3" >&2; exit 2 ;; esac
export PY=${PYTHON:-python3} OUT=${OUT:-/tmp/moco_gpu_check_out} TMPD=${GPU_CHECK_TMP:-/tmp/moco_gpu_check}/s$stage
rm -rf "$TMPD"
mkdir -p "$OUT" "$TMPD"
export MOCO_EXT_JIT=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
defaults=(0 240 300 300)
end=$(( $(date +%s) + ${DEADLINE_S:-${defaults[$stage]}} ))
summary="$OUT/s${stage}_summary.txt"
: > "$summary"
failed=0
echo "gpu_check stage $stage: $(date -u), $PY, OUT=$OUT, deadline in $(( end - $(date +%s) )) s" | tee -a "$summary"

if [ "${GPU_CHECK_PLAN:-0}" = 1 ]; then
  GPU=1
  echo "stage $stage: plan (GPU_CHECK_PLAN=1): the GPU run's commands, each checked by bash -n, none run" \
    | tee -a "$summary"
elif [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  GPU=0
  echo "stage $stage: dry run (GPU_CHECK_DRY=1)" | tee -a "$summary"
else
  GPU=$(timeout 60 "$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
  [ "$GPU" = 1 ] || echo "stage $stage: dry run (no CUDA GPU visible to $PY)" | tee -a "$summary"
fi
export GPU
if [ "$GPU" = 1 ]; then export MOCO_EXT_EXPECT_CUDA=1 MOCO_EXT_VERBOSE=1; fi

# step NAME LIMIT_S NEED FILE CMD: CMD (a shell string, run by bash -o pipefail -c) under `timeout`, its output
# to $OUT/FILE and stdout. NEED: cuda (skipped without a GPU) or any.
step() {
  local name=$1 limit=$2 need=$3 file=$OUT/$4 cmd=$5 left t0 rc verdict
  if [ "$need" = cuda ] && [ "$GPU" != 1 ]; then
    echo "[$name] skipped: no CUDA GPU" | tee -a "$file" "$summary"
    return
  fi
  left=$(( end - $(date +%s) - 5 ))
  if (( left < 10 )); then
    echo "[$name] skipped: the stage's deadline is reached" | tee -a "$file" "$summary"
    failed=$((failed + 1))
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit $limit s): $cmd" | tee -a "$file"
  if [ "${GPU_CHECK_PLAN:-0}" = 1 ]; then
    if bash -n -c "$cmd"; then
      echo "[$name] planned" >> "$summary"
    else
      echo "[$name] BAD COMMAND" >> "$summary"
      failed=$((failed + 1))
    fi
    return
  fi
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -o pipefail -c "$cmd" 2>&1 | tee -a "$file"
  rc=${PIPESTATUS[0]}
  case $rc in 0) verdict=PASS ;; 124|137) verdict="TIMEOUT after $limit s" ;; *) verdict=FAIL ;; esac
  [ "$rc" = 0 ] || failed=$((failed + 1))
  echo "== $name rc=$rc in $(( $(date +%s) - t0 )) s: $verdict" | tee -a "$file"
  echo "[$name] rc=$rc in $(( $(date +%s) - t0 )) s: $verdict" >> "$summary"
}

load() {  # versions, then moco_ext: the pip-built library, else the JIT build (the first call on a machine)
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
    || echo "nvidia-smi: none"
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: none"; fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
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

compare() {  # compare LABEL STRICT_STEPS ON OFF [OFF_A OFF_B]: the runs' logged losses (metrics.jsonl) step by step;
  # OFF_A, OFF_B: two --fused off runs of the same command, whose spread measures the eager path's own noise
  "$PY" - "$@" <<'PYEOF'
import json, sys
label, strict, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
loss = [[r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r] for d in runs]
n = len(loss[0])
if n == 0 or any(len(x) != n for x in loss):
    sys.exit(f"{label}: the runs logged {[len(x) for x in loss]} losses")
gap = [abs(a - b) / abs(b) for a, b in zip(loss[0], loss[1])]  # --fused on against off, relative
noise = max(abs(a - b) / abs(b) for a, b in zip(loss[2], loss[3])) if len(loss) > 3 else 0.0
tol = max(1e-5, 2 * noise)  # the rounding of one step, or twice the eager path's own run-to-run spread
print(f"{label}: {n} steps, |loss(on) - loss(off)| / loss(off) per step: " + " ".join(f"{g:.0e}" for g in gap))
if len(loss) > 3:
    print(f"{label}: spread between two --fused off runs with frozen weights: max {noise:.1e}")
bad = [i + 1 for i, g in enumerate(gap[:strict]) if not g <= tol]
print(f"{label}: steps 1-{min(strict, n)} within {tol:.1e}: {'yes' if not bad else f'NO, steps {bad}'}; "
      f"largest gap over the {n} steps {max(gap):.1e}")
sys.exit(1 if bad else 0)
PYEOF
}
export -f load flagcheck compare

build() {  # the stage's first step; in a dry run of stages 2 and 3 the steps load moco_ext themselves
  if [ "$GPU" = 1 ] || [ "$stage" = 1 ]; then
    step build 240 any "s${stage}_build.txt" load
  else
    echo "[build] skipped: dry run (the steps below load moco_ext themselves)" \
      | tee -a "$OUT/s${stage}_build.txt" "$summary"
  fi
}

stage1() {
  build
  local dev=cpu san
  [ "$GPU" = 1 ] && dev=cuda
  step kernels 120 any s1_kernels.txt "\"\$PY\" tests/check_kernels.py --device $dev"
  step cuda_tests 150 cuda s1_tests.txt \
    "\"\$PY\" -m pytest -q -rs -p no:cacheprovider --durations=5 -k cuda tests/test_ext.py"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
        "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" 2>/dev/null | head -n 1)
  [ -z "$san" ] && [ "${GPU_CHECK_PLAN:-0}" = 1 ] && san=compute-sanitizer  # a plan shows the commands anyway
  if [ "$GPU" = 1 ] && [ -z "$san" ]; then
    echo "[memcheck] skipped: compute-sanitizer not found" | tee -a "$OUT/s1_sanitizer.txt" "$summary"
    echo "[racecheck] skipped: compute-sanitizer not found" | tee -a "$OUT/s1_sanitizer.txt" "$summary"
    return
  fi
  # no caching allocator under memcheck: an access past a tensor's end then leaves its allocation
  step memcheck 90 cuda s1_sanitizer.txt "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$san' --tool memcheck --error-exitcode 1 \
\"\$PY\" tests/check_kernels.py --device cuda --sanitize"
  step racecheck 120 cuda s1_sanitizer.txt "'$san' --tool racecheck --error-exitcode 1 \"\$PY\" tests/check_kernels.py \
--device cuda --sanitize"
}

stage2() {
  build
  local common steps off2=""
  if [ "$GPU" = 1 ]; then  # preset small (basic32, batch 256, K 4096) on the built-in data
    steps=50 off2=off2
    common="--epochs 2 --max-steps $steps --log-every 1 --knn-every 0 --workers 4"
  else
    steps=3
    common="--device cpu --epochs 1 --max-steps $steps --log-every 1 --knn-every 0 --workers 0"
    common="$common --batch-size 32 --moco-k 96"
  fi
  local amp="$common --amp --gpu-aug off --out $TMPD/amp"
  local compiled="$common --amp --compile --gpu-aug on --out $TMPD/compile"
  local dimf="--epochs 1 --max-steps 30 --log-every 5 --knn-every 0 --workers 4 --amp --out $TMPD/dim"
  local ddpf="--epochs 1 --max-steps 20 --log-every 5 --knn-every 0 --workers 4"
  local evalf="--pretrained $TMPD/amp/ckpt.pt --epochs 2 --workers 4 --out $TMPD/eval.json"
  local torchrun="\"\$PY\" -m torch.distributed.run --standalone --nproc_per_node=1 moco.py"  # = torchrun
  printf '%s\t%s\n' moco.py "$amp" moco.py "$compiled" dim.py "$dimf" moco.py "$ddpf --out $TMPD/ddp" \
    moco.py "$ddpf --bn sync --out $TMPD/ddp_sync" eval_linear.py "$evalf" \
    moco.py "$common --gpu-aug on --fused on --lr 1e-30 --out $TMPD/frozen_on" > "$TMPD/argv.txt"
  if [ "$GPU" = 1 ]; then
    step flags 60 any s2_build.txt "flagcheck '$TMPD/argv.txt'"
  else  # the CPU runs below parse their flags; tests/test_bench.py parses the GPU run's (GPU_CHECK_PLAN=1)
    echo "[flags] skipped: dry run (the GPU run's flags are parsed by tests/test_bench.py)" \
      | tee -a "$OUT/s2_build.txt" "$summary"
  fi
  # --fused on against off: frozen weights (every step on the same state), then training at the preset's lr
  local runs="for f in on off $off2; do \"\$PY\" moco.py $common --gpu-aug on --fused \${f%2} --lr 1e-30 \
--out $TMPD/frozen_\$f 2>&1 | tail -n 4 || exit 1; done; compare 'frozen weights (--lr 1e-30)' $steps \
$TMPD/frozen_on $TMPD/frozen_off ${off2:+$TMPD/frozen_off $TMPD/frozen_off2}"
  if [ "$GPU" = 1 ]; then
    runs="$runs && for f in on off; do \"\$PY\" moco.py $common --gpu-aug on --fused \$f --out $TMPD/train_\$f 2>&1 \
| tail -n 4 || exit 1; done; compare 'training (preset lr)' 5 $TMPD/train_on $TMPD/train_off $TMPD/frozen_off \
$TMPD/frozen_off2"
  fi
  step fused 180 any s2_fused.txt "$runs"
  step moco_amp 60 cuda s2_moco.txt "\"\$PY\" moco.py $amp"
  step moco_amp_compile 150 cuda s2_moco.txt "\"\$PY\" moco.py $compiled"
  step dim_amp 60 cuda s2_dim.txt "\"\$PY\" dim.py $dimf"
  step torchrun 60 cuda s2_ddp.txt "$torchrun $ddpf --out $TMPD/ddp"
  step torchrun_bn_sync 60 cuda s2_ddp.txt "$torchrun $ddpf --bn sync --out $TMPD/ddp_sync"
  step eval_linear 90 cuda s2_moco.txt "\"\$PY\" eval_linear.py $evalf"
  step gpu_aug_tests 90 cuda s2_tests.txt "\"\$PY\" -m pytest -q -rs -p no:cacheprovider -k cuda tests/test_gpu_aug.py"
}

stage3() {
  build
  if [ "$GPU" = 1 ]; then
    step infonce 120 any s3_infonce.txt "\"\$PY\" tests/bench_infonce.py --device cuda"
    step train 240 any s3_train.txt "\"\$PY\" tests/bench_train.py"
    step memory 120 any s3_train.txt "\"\$PY\" tests/bench_memory.py --device cuda"
    step e2e_amp 150 any s3_e2e.txt "\"\$PY\" tests/bench_e2e.py --epochs 3 --flags '--amp'"
    step e2e_amp_compile 200 any s3_e2e.txt "\"\$PY\" tests/bench_e2e.py --epochs 3 --flags '--amp --compile'"
  else
    step infonce 120 any s3_infonce.txt "\"\$PY\" tests/bench_infonce.py --device cpu --quick"
    step train 240 any s3_train.txt "\"\$PY\" tests/bench_train.py --tiny"
    step e2e 150 any s3_e2e.txt "\"\$PY\" tests/bench_e2e.py --images 128 --test-images 128 --epochs 2 \
--flags '--device cpu --arch basic32 --batch-size 32 --moco-k 64 --workers 0'"
  fi
}

"stage$stage"
echo "gpu_check stage $stage: $failed step(s) failed, $(( end - $(date +%s) )) s before the deadline" \
  | tee -a "$summary"
[ "$failed" = 0 ]
