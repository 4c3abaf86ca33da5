#!/usr/bin/env bash
# One GPU check for a bare GPU machine without internet (Python 3.12 with a CUDA build of torch,
# nvcc, ninja, numpy, opencv and pytest already there): installs the OpenMMLab stack from the
# wheels and the mmcv source that benchmarks/gpu_bundle.sh put into gpu_bundle/ (carried beside
# the checkout), compiles mmcv, runs the GPU-only tests (`pytest -m cuda`) and the GPU benchmarks,
# and writes everything into one results folder: $OUT if set, else benchmarks/results/gpu/.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--mmcv auto|cpu|none] [--budget SECONDS]
#                                [--bundle DIR] [--results DIR]
#
# Steps (each under `timeout`, all within --budget seconds, default 570):
#   1. env      nvidia-smi, versions of Python / torch / CUDA / nvcc / compilers -> summary.txt
#   2. install  the bundled wheels into $GPU_CHECK_SITE (default /tmp/gpu_check_site), then
#               PYTHONPATH=$GPU_CHECK_SITE:<repo>
#   3. mmcv     compiled from the bundled sdist with setup_env.sh's C++20 patch, CPU ops
#               (MMCV_WITH_OPS=1 FORCE_CUDA=0, GPUs hidden from the build, MAX_JOBS=nproc): the
#               backbones, UperNet and the tests need no mmcv CUDA kernel. With --mmcv auto
#               (default) the CUDA ops build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST of the GPU, the
#               system nvcc when tools/cuda_toolchain.py finds it matching torch's CUDA) runs
#               beside it at the lowest CPU priority, is paused while benchmarks run, and gets
#               whatever time is left; if it finishes, its nms / roi_align are compared with the
#               CPU ops on the GPU (step 'mmcv-cuda'). --mmcv cpu skips it, --mmcv none skips mmcv.
#   4. imports  mmcv.ops, mmdet, mmseg and mmoverlock import; versions
#   5. pytest   python -m pytest -m cuda --report-at-once (junit xml), the kernels' tests first;
#               the Mask R-CNN AMP iteration deselected (it needs mmcv's CUDA ops) and run in
#               step mmcv-cuda when that build finishes
#   6. bench    benchmarks/gpu.py if it exists (`--out RESULTS/gpu --budget <its time - 30 s>`;
#               it measures the Triton kernels' bandwidth itself), else
#               benchmarks/triton_bandwidth.py if it exists (`--out RESULTS/triton_bandwidth`);
#               $GPU_BENCH_ARGS is appended. It gets the time the earlier steps left.
#
# Results (at most 8 files, the device tool's limit): summary.txt (environment and one line per
# step, written as the steps end), steps.log (every step's output), mmcv_build.log (both builds),
# junit_cuda.xml, and the benchmarks' own files (.json / .md). --dry-run prints the plan and
# checks the bundle without running anything.
set -uo pipefail   # no -e: every step records its status and the check goes on

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${GPU_BUNDLE:-$ROOT/gpu_bundle}"
RES="${OUT:-$ROOT/benchmarks/results/gpu}"
BUDGET="${GPU_CHECK_BUDGET:-570}"
MMCV_MODE="${GPU_CHECK_MMCV:-auto}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
PY="${PYTHON:-python3}"
JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
DRY=0

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --mmcv) MMCV_MODE="${2:-}"; shift ;;
    --budget) BUDGET="${2:-}"; shift ;;
    --bundle) BUNDLE="${2:-}"; shift ;;
    --results) RES="${2:-}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
case "$MMCV_MODE" in auto|cpu|none) ;; *) die "--mmcv must be auto, cpu or none, not '$MMCV_MODE'" ;; esac
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 60 ] || die "--budget must be a number of seconds >= 60, not '$BUDGET'"

# --- the bundle ---------------------------------------------------------------------------------
[ -d "$BUNDLE" ] || die "no bundle at $BUNDLE: run 'bash benchmarks/gpu_bundle.sh' on a machine with internet, and carry that folder (device tool: carry [\"gpu_bundle\"])"
mapfile -t WHEELS < <(find "$BUNDLE" -maxdepth 1 -name '*.whl' | sort)
SDIST=$(find "$BUNDLE" -maxdepth 1 -name 'mmcv-*.tar.gz' | sort | tail -1)
[ "${#WHEELS[@]}" -gt 0 ] || die "no wheels in $BUNDLE: rerun benchmarks/gpu_bundle.sh"
[ "$MMCV_MODE" = none ] || [ -n "$SDIST" ] || die "no mmcv-*.tar.gz in $BUNDLE: rerun benchmarks/gpu_bundle.sh (or pass --mmcv none)"

BENCHES=()
if [ -f "$ROOT/benchmarks/gpu.py" ]; then
  BENCHES=(gpu)               # runs triton_bandwidth's kernel measurement itself
elif [ -f "$ROOT/benchmarks/triton_bandwidth.py" ]; then
  BENCHES=(triton_bandwidth)
fi

# --- time keeping -------------------------------------------------------------------------------
remaining() { echo $((BUDGET - SECONDS)); }
limit() {  # limit CAP RESERVE -> min(CAP, remaining - RESERVE), at least 0
  local t=$(( $(remaining) - $2 ))
  [ "$t" -gt "$1" ] && t=$1
  [ "$t" -lt 0 ] && t=0
  echo "$t"
}
# time kept for the benchmark while mmcv compiles and the tests run (it gets at least this)
case "${BENCHES[*]:-}" in gpu) BENCH_RESERVE=200 ;; triton_bandwidth) BENCH_RESERVE=90 ;; *) BENCH_RESERVE=0 ;; esac

# --- steps --------------------------------------------------------------------------------------
SUMMARY="$RES/summary.txt"
LOG="$RES/steps.log"
BUILD_LOG="$RES/mmcv_build.log"
WORK="${TMPDIR:-/tmp}/gpu_check_work"

record() { printf '%-10s %-34s %4ss\n' "$1" "$2" "$3" | tee -a "$SUMMARY"; }

step() {  # step NAME SECONDS COMMAND...: run COMMAND (a function or program) under timeout
  local name=$1 secs=$2 start=$SECONDS rc
  shift 2
  if [ "$DRY" = 1 ]; then
    printf 'step %-9s (timeout %4ss): %s\n' "$name" "$secs" "$*"
    return 0
  fi
  if [ "$secs" -lt 5 ]; then
    record "$name" "skipped: budget spent" 0
    return 0
  fi
  printf '\n===== %s (timeout %ss, %ss left): %s\n' "$name" "$secs" "$(remaining)" "$*" >>"$LOG"
  timeout -k 10 "$secs" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) record "$name" ok $((SECONDS - start)) ;;
    124|137) record "$name" "timeout after ${secs}s" $((SECONDS - start)) ;;
    *) record "$name" "failed (exit $rc)" $((SECONDS - start)) ;;
  esac
  return $rc
}

show_env() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  nproc: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not available"
  fi
  "$PY" - <<'PY'
import platform, sysconfig, os
print('python', platform.python_version(), sysconfig.get_paths()['include'],
      'Python.h present' if os.path.exists(os.path.join(sysconfig.get_paths()['include'],
                                                        'Python.h')) else 'NO Python.h')
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
      torch.backends.cudnn.version(), 'gpus', torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) + ' sm%d%d' % torch.cuda.get_device_capability(i)
       for i in range(torch.cuda.device_count())])
for name in ('triton', 'numpy', 'cv2', 'timm', 'setuptools', 'pytest'):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:  # noqa: BLE001  (a report, not a check)
        print(name, 'missing:', exc)
PY
  (command -v nvcc && nvcc --version | tail -2) || echo "nvcc: not on PATH"
  (c++ --version | head -1) || echo "c++: missing"
  (ninja --version) || echo "ninja: missing"
}

env_report() { show_env >>"$RES/summary.txt" 2>&1; }

install_wheels() {
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$BUNDLE"/*.whl
}

unpack_mmcv() {  # unpack_mmcv DIR: the sdist with tools/setup_env.sh's C++20 patch
  rm -rf "$1" && mkdir -p "$1"
  tar -xzf "$SDIST" -C "$1" --strip-components=1
  # torch >= 2.10 headers need C++20; mmcv's setup.py hard-codes -std=c++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$1/setup.py"
  grep -q -- '-std=c++20' "$1/setup.py" || { echo "mmcv patch (C++20) did not apply"; return 3; }
}

build_mmcv_cpu() {
  unpack_mmcv "$WORK/src-cpu" || return $?
  # mmcv builds CUDA ops whenever torch sees a GPU: hide it for the CPU-ops build.
  CUDA_VISIBLE_DEVICES='' MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$JOBS \
    "$PY" -m pip wheel -v --no-index --no-build-isolation --no-deps -w "$WORK/wheel-cpu" \
    "$WORK/src-cpu" >"$WORK/mmcv-cpu.log" 2>&1
  local rc=$?
  tail -5 "$WORK/mmcv-cpu.log"
  [ $rc -eq 0 ] || return $rc
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    "$WORK"/wheel-cpu/mmcv-*.whl
}

build_mmcv_cuda() {  # run in the background; CUDA_HOME / TORCH_CUDA_ARCH_LIST set by the caller
  unpack_mmcv "$WORK/src-cuda" || return $?
  MMCV_WITH_OPS=1 FORCE_CUDA=1 MAX_JOBS=$JOBS \
    "$PY" -m pip wheel -v --no-index --no-build-isolation --no-deps -w "$WORK/wheel-cuda" \
    "$WORK/src-cuda"
}

check_imports() {
  "$PY" - <<'PY'
import importlib
for name in ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'timm', 'mmoverlock'):
    module = importlib.import_module(name)
    print(f'{name:<11} {getattr(module, "__version__", "?")}  {module.__file__}')
import mmcv.ops  # noqa: F401  (compiled ops present)
import mmdet.models  # noqa: F401
import mmseg.models  # noqa: F401
PY
}

# Mask R-CNN's RoIAlign / NMS need mmcv's CUDA ops; the mmcv of the pytest step has CPU ops
# only (the CUDA build, if any, ends later): that test runs after the CUDA build (smoke_mmcv_cuda).
DET_AMP_TEST='tests/test_cuda.py::test_one_training_iteration_with_amp[det]'
run_pytest() {  # the kernels' tests first (fastest); each result printed as soon as it is known
  cd "$ROOT" && "$PY" -m pytest -m cuda -q -p no:cacheprovider --report-at-once \
    --deselect "$DET_AMP_TEST" --junitxml="$RES/junit_cuda.xml" \
    tests/test_neighborhood_triton.py tests/test_cuda.py
}

run_bench() {  # run_bench NAME SECONDS: gpu.py stops its cases by itself 30 s before SECONDS
  local extra=()
  [ "$1" = gpu ] && extra=(--budget $(($2 - 30)))
  cd "$ROOT" && "$PY" "benchmarks/$1.py" --out "$RES/$1" "${extra[@]}" ${GPU_BENCH_ARGS:-}
}

smoke_mmcv_cuda() {
  PYTHONPATH="$SITE-cuda:$PYTHONPATH" "$PY" - <<'PY'
import torch
import mmcv
from mmcv.ops import nms, roi_align
print('mmcv', mmcv.__version__, 'from', mmcv.__file__)
gen = torch.Generator().manual_seed(0)
xy = torch.rand(300, 2, generator=gen) * 100
boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=gen) * 40], 1)
scores = torch.rand(300, generator=gen)
keep_cpu, keep_gpu = nms(boxes, scores, 0.5)[1], nms(boxes.cuda(), scores.cuda(), 0.5)[1].cpu()
assert torch.equal(keep_cpu, keep_gpu), (keep_cpu, keep_gpu)
feats = torch.randn(2, 8, 32, 32, generator=gen)
rois = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0], [1, 5.0, 3.0, 30.0, 28.5]])
ref = roi_align(feats, rois, (7, 7), 1.0, 2, 'avg', True)
out = roi_align(feats.cuda(), rois.cuda(), (7, 7), 1.0, 2, 'avg', True).cpu()
assert torch.allclose(ref, out, atol=1e-5), (ref - out).abs().max()
print(f'mmcv CUDA ops: nms keeps the same {len(keep_cpu)} of 300 boxes as the CPU op, '
      f'roi_align agrees to {(ref - out).abs().max().item():.2e}')
PY
  [ $? -eq 0 ] || return 1
  cd "$ROOT" && PYTHONPATH="$SITE-cuda:$PYTHONPATH" "$PY" -m pytest -m cuda -q \
    -p no:cacheprovider --report-at-once "$DET_AMP_TEST"
}

export ROOT BUNDLE RES SITE PY JOBS WORK SDIST LOG DET_AMP_TEST
export -f show_env env_report install_wheels unpack_mmcv build_mmcv_cpu build_mmcv_cuda check_imports \
  run_pytest run_bench smoke_mmcv_cuda

if [ "$DRY" = 1 ]; then
  echo "gpu_check (dry run): budget ${BUDGET}s, results -> $RES, bundle $BUNDLE"
  echo "bundle: ${#WHEELS[@]} wheels ($(for w in "${WHEELS[@]}"; do basename "$w" | cut -d- -f1; done | tr '\n' ' '))+ ${SDIST:+$(basename "$SDIST")}"
  echo "python: $PY; PYTHONPATH=$SITE:$ROOT; MAX_JOBS=$JOBS; mmcv mode: $MMCV_MODE"
  echo "timeouts below are upper bounds: in a run each step gets what the earlier ones left"
fi

# --- run ----------------------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  mkdir -p "$RES" "$WORK"
  : >"$LOG"; : >"$BUILD_LOG"
  { echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, mmcv mode $MMCV_MODE"
  } >"$SUMMARY"
fi
step env 60 env_report
[ "$DRY" = 0 ] && head -n -1 "$SUMMARY"   # the environment (its step line is printed already)
step install "$(limit 120 60)" install_wheels
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CUDA_PID=""
cuda_build_start() {
  local plan
  if [ "$DRY" = 1 ]; then
    echo "step mmcv-cuda (background, nice 19, until ${BUDGET}s - 45s): if tools/cuda_toolchain.py plan (MMOVERLOCK_CUDA=1) finds a system nvcc matching torch: build_mmcv_cuda (FORCE_CUDA=1 CUDA_HOME=<system> TORCH_CUDA_ARCH_LIST=<GPU>), paused during benchmarks, then smoke_mmcv_cuda"
    return
  fi
  plan=$(MMOVERLOCK_CUDA=1 "$PY" "$ROOT/tools/cuda_toolchain.py" plan 2>&1)
  if [ $? -ne 0 ]; then
    record mmcv-cuda "skipped: $(printf '%s' "$plan" | tail -1 | cut -c1-60)" 0
    return
  fi
  local CUDA_TOOLKIT='' CUDA_HOME_SYSTEM='' ARCH_LIST='' PLAN_REASON='(no plan printed)'
  eval "$(printf '%s\n' "$plan" | grep -E '^(CUDA_TOOLKIT|CUDA_HOME_SYSTEM|ARCH_LIST|PLAN_REASON)=')"
  echo "mmcv CUDA plan: $PLAN_REASON" >>"$SUMMARY"
  if [ "$CUDA_TOOLKIT" != system ]; then
    record mmcv-cuda "skipped: no system nvcc = torch CUDA" 0
    return
  fi
  CUDA_START=$SECONDS
  # timeout leads a process group of its own (pgid = its pid = $!, as nice execs it): the group
  # is paused, resumed and stopped as a whole; timeout also ends it at the deadline by itself.
  CUDA_HOME="$CUDA_HOME_SYSTEM" TORCH_CUDA_ARCH_LIST="$ARCH_LIST" \
    nice -n 19 timeout -k 5 "$(limit 100000 45)" bash -c build_mmcv_cuda \
    </dev/null >"$WORK/mmcv-cuda.log" 2>&1 &
  CUDA_PID=$!
}
cuda_build_signal() { [ -n "$CUDA_PID" ] && kill "-$1" -- "-$CUDA_PID" 2>/dev/null; return 0; }
trap 'cuda_build_signal CONT; cuda_build_signal KILL' EXIT
trap 'exit 143' TERM INT

if [ "$MMCV_MODE" = none ]; then
  [ "$DRY" = 1 ] && echo "mmcv: skipped (--mmcv none)" || record mmcv skipped 0
else
  [ "$MMCV_MODE" = auto ] && cuda_build_start
  step mmcv-cpu "$(limit 360 $((BENCH_RESERVE + 90)))" build_mmcv_cpu
  [ "$DRY" = 0 ] && cat "$WORK/mmcv-cpu.log" >>"$BUILD_LOG" 2>/dev/null
fi
step imports 60 check_imports
[ "$DRY" = 1 ] && echo "pytest: deselects $DET_AMP_TEST (needs mmcv's CUDA ops; run after the CUDA build, if it finishes)"
[ "$DRY" = 0 ] && echo "pytest: $DET_AMP_TEST deselected (needs mmcv's CUDA ops; runs in step mmcv-cuda if that build finishes)" >>"$SUMMARY"
step pytest "$(limit 240 "$BENCH_RESERVE")" run_pytest
# each test's outcome and duration (printed as it ended, so also those of a run cut short)
[ "$DRY" = 0 ] && grep -E '^\[ *[0-9.]+s\] ' "$LOG" | sed 's/^/  /' >>"$SUMMARY"
if [ ${#BENCHES[@]} -eq 0 ]; then
  [ "$DRY" = 1 ] && echo "bench: no benchmarks/gpu.py or benchmarks/triton_bandwidth.py" \
    || record bench "skipped: no GPU benchmark file" 0
fi
cuda_build_signal STOP   # a quiet machine for the timings
for name in "${BENCHES[@]}"; do
  secs=$(limit 480 15)
  step "bench-$name" "$secs" run_bench "$name" "$secs"
done
cuda_build_signal CONT

if [ -n "$CUDA_PID" ]; then
  while kill -0 "$CUDA_PID" 2>/dev/null && [ "$(remaining)" -gt 45 ]; do sleep 2; done
  if kill -0 "$CUDA_PID" 2>/dev/null; then
    cuda_build_signal TERM; sleep 3; cuda_build_signal KILL
  fi
  wait "$CUDA_PID"
  rc=$?
  case $rc in
    0)
      record cuda-build ok $((SECONDS - CUDA_START))
      "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE-cuda" \
        "$WORK"/wheel-cuda/mmcv-*.whl >>"$LOG" 2>&1
      step mmcv-cuda "$(limit 120 0)" smoke_mmcv_cuda ;;
    124|137|143)
      progress=$(grep -oE '\[[0-9]+/[0-9]+\]' "$WORK/mmcv-cuda.log" | tail -1)
      record cuda-build "stopped at the budget, ${progress:-no unit done}" $((SECONDS - CUDA_START)) ;;
    *) record cuda-build "failed (exit $rc, mmcv_build.log)" $((SECONDS - CUDA_START)) ;;
  esac
  { echo; echo "===== CUDA ops build"; cat "$WORK/mmcv-cuda.log"; } >>"$BUILD_LOG" 2>/dev/null
fi
trap - EXIT
if [ "$DRY" = 1 ]; then
  echo "results: summary.txt steps.log mmcv_build.log junit_cuda.xml${BENCHES[*]:+ + the benchmark files}"
else
  record total "$(ls "$RES" | wc -l) files in $RES" "$SECONDS"
fi
