#!/usr/bin/env bash
# One-command environment for mmoverlock: creates .venv/ at the repository root and installs the
# pinned stack of requirements.txt. mmcv and natten have no wheels for this torch, so they are
# compiled from their sources (with the patches listed below, applied to a copy of the source) and
# cached in $MMOVERLOCK_WHEEL_CACHE, keyed by torch and Python version (and, for mmcv with CUDA
# ops, CUDA version and GPU architectures). Idempotent: a ready environment whose pins and build
# choice did not change is left alone in a few seconds.
#
#   bash tools/setup_env.sh            # set up (or verify) .venv
#   MMOVERLOCK_REBUILD=1 bash tools/setup_env.sh   # ignore the wheel cache and rebuild
#
# mmcv's ops: CPU only on a machine without an NVIDIA GPU; with CUDA ops when PyTorch sees a GPU
# (tools/cuda_toolchain.py decides: MMOVERLOCK_CUDA=0|1 forces the choice, TORCH_CUDA_ARCH_LIST
# overrides the architectures of the visible GPUs, MMOVERLOCK_CUDA_TOOLKIT=system|pip the
# compiler: by default the system CUDA toolkit if its nvcc has torch's CUDA version, else NVIDIA's
# pip-packaged nvcc of that version, installed into .venv). natten is always built CPU-only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQ="$ROOT/requirements.txt"
PY_BOOT="${PYTHON:-python3}"
STAMP="$VENV/.mmoverlock-setup-stamp"
TOOLCHAIN="$ROOT/tools/cuda_toolchain.py"
CACHE_ROOT="${MMOVERLOCK_WHEEL_CACHE:-$HOME/.cache/mmoverlock/wheels}"

log() { printf '\033[1;34m[setup %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

pin() {  # pin NAME -> the exact version pinned in requirements.txt
  local v
  v=$(grep -E "^$1==" "$REQ" | head -1 | sed -E "s/^$1==([^ #]+).*/\1/")
  [ -n "$v" ] || die "no '$1==' pin in requirements.txt"
  echo "$v"
}
spec() {  # spec NAME -> the requirement line (without comment) for NAME
  grep -E "^$1([=<>!~ ]|$)" "$REQ" | head -1 | sed -E 's/[[:space:]]*#.*$//; s/[[:space:]]+$//'
}

stamp_value() {  # stamp_value CACHE_KEY: the pins, these scripts and the build choice
  { cat "$REQ" "$ROOT/tools/setup_env.sh" "$TOOLCHAIN" "$ROOT/setup.py"; echo "$1"; } \
    | sha256sum | cut -d' ' -f1
}

build_plan() {  # build_plan -> sets MMCV_CUDA, CUDA_TOOLKIT, ARCH_LIST, CACHE_KEY, ... (see $TOOLCHAIN)
  local plan
  plan=$("$VENV/bin/python" "$TOOLCHAIN" plan) || die "cannot choose how to build mmcv (above)"
  eval "$plan"
}

# Ready: same stamp (a plan that fails here is reported by the full run below) and imports work.
if [ -f "$STAMP" ] && [ -z "${MMOVERLOCK_REBUILD:-}" ] && [ -x "$VENV/bin/python" ] \
   && plan=$("$VENV/bin/python" "$TOOLCHAIN" plan 2>/dev/null) && eval "$plan" \
   && [ "$(cat "$STAMP")" = "$(stamp_value "$CACHE_KEY")" ] \
   && "$VENV/bin/python" -c "import mmcv.ops, natten, mmdet, mmseg, mmoverlock" >/dev/null 2>&1; then
  log "environment ready ($VENV); nothing to do"
  exit 0
fi

# ---------------------------------------------------------------------------------------------------
log "1/6 virtual environment at $VENV"
[ -x "$VENV/bin/python" ] || "$PY_BOOT" -m venv "$VENV"
export PATH="$VENV/bin:$PATH"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "$(spec setuptools)" "$(spec wheel)" "$(spec ninja)" "$(spec cmake)"

log "2/6 torch $(pin torch) + torchvision $(pin torchvision) (large download on first run)"
# setuptools again in the same resolve: torch pulls a newer one otherwise.
"${PIP[@]}" install --progress-bar on "$(spec torch)" "$(spec torchvision)" "$(spec setuptools)"

build_plan
log "mmcv build: $PLAN_REASON"
# The CPU key is torch<version>-<python>; a CUDA build of mmcv adds -cu<version>-sm<archs>.
CACHE="$CACHE_ROOT/$CACHE_KEY"
CPU_CACHE="$CACHE_ROOT/$CPU_CACHE_KEY"   # natten: always CPU-only
mkdir -p "$CACHE" "$CPU_CACHE"
log "wheel cache: $CACHE"

# ---------------------------------------------------------------------------------------------------
fetch_sdist() {  # fetch_sdist NAME VERSION DEST -> unpacked source directory
  local name=$1 ver=$2 dest=$3
  rm -rf "$dest" && mkdir -p "$dest"
  # --no-build-isolation: metadata generation imports torch/pkg_resources from this venv.
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation "$name==$ver" -d "$dest"
  tar -xzf "$dest"/*.tar.gz -C "$dest"
  find "$dest" -mindepth 1 -maxdepth 1 -type d | head -1
}

build_wheel() {  # build_wheel NAME SRC_DIR OUT_DIR  (runs with the env set up by the caller)
  local name=$1 src=$2 out=$3 logf="$3/$1-build.log"
  log "   compiling $name (log: $logf)"
  # Progress: pip -v prints one line per compiled unit; keep the lines that show it.
  "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$out" "$src" >"$logf" 2>&1 &
  local pid=$! n=0 last=""
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    n=$(grep -cE '\[[0-9]+/[0-9]+\]|^(gcc|g\+\+|c\+\+) ' "$logf" || true)
    last=$(grep -oE '\[[0-9]+/[0-9]+\]' "$logf" | tail -1 || true)
    log "   $name: still compiling ${last:-($n units so far)}"
  done
  wait "$pid" || { tail -40 "$logf" >&2; die "building $name failed; full log in $logf"; }
}

wheel_in() { ls "$1"/"$2"-"$3"-*.whl 2>/dev/null | head -1; }  # wheel_in DIR NAME VERSION

cuda_toolkit() {  # exports CUDA_HOME (and PATH) for the CUDA build of the plan
  if [ "$CUDA_TOOLKIT" = system ]; then
    export CUDA_HOME="$CUDA_HOME_SYSTEM"
  else
    log "   installing the CUDA $CUDA_VERSION compiler from pip: $PIP_TOOLKIT_REQ"
    "${PIP[@]}" install -q "$PIP_TOOLKIT_REQ"
    # torch links extensions with -L$CUDA_HOME/lib64 -lcudart; the wheels ship lib/ with
    # versioned names only: a folder of links in .venv/cuda-home, site-packages untouched.
    CUDA_HOME=$("$VENV/bin/python" "$TOOLCHAIN" cuda-home "$PIP_TOOLKIT_ROOT" "$VENV/cuda-home") \
      || die "the pip-packaged CUDA compiler is incomplete (above)"
    export CUDA_HOME
  fi
  export PATH="$CUDA_HOME/bin:$PATH"
  log "   CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
}

MMCV_VER=$(pin mmcv)
NATTEN_VER=$(pin natten)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$MMCV_CUDA" = 1 ]; then
  log "3/6 mmcv $MMCV_VER with ops (CUDA $CUDA_VERSION, TORCH_CUDA_ARCH_LIST=$ARCH_LIST)"
else
  log "3/6 mmcv $MMCV_VER with ops (CPU)"
fi
if [ -n "${MMOVERLOCK_REBUILD:-}" ] || [ -z "$(wheel_in "$CACHE" mmcv "$MMCV_VER")" ]; then
  if [ "$MMCV_CUDA" = 1 ]; then
    log "   no cached wheel: building from source (CUDA build time not measured yet)"
  else
    log "   no cached wheel: building from source (about 25 minutes on 2 cores)"
  fi
  src=$(fetch_sdist mmcv "$MMCV_VER" "$WORK/mmcv")
  # torch >= 2.10 headers need C++20; mmcv's setup.py hard-codes -std=c++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  grep -q -- '-std=c++20' "$src/setup.py" || die "mmcv patch (C++20) did not apply"
  if [ "$MMCV_CUDA" = 1 ]; then
    cuda_toolkit
    MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST" \
      MAX_JOBS="${MAX_JOBS:-$(nproc)}" build_wheel mmcv "$src" "$CACHE"
  else
    # mmcv compiles CUDA ops whenever torch sees a GPU: hide it (MMOVERLOCK_CUDA=0 on a GPU machine).
    CUDA_VISIBLE_DEVICES='' MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      build_wheel mmcv "$src" "$CACHE"
  fi
else
  log "   cached wheel found"
fi

log "4/6 natten $NATTEN_VER (CPU build, optional fast backend)"
if [ -n "${MMOVERLOCK_REBUILD:-}" ] || [ -z "$(wheel_in "$CPU_CACHE" natten "$NATTEN_VER")" ]; then
  log "   no cached wheel: building from source (about 7 minutes on 2 cores)"
  src=$(fetch_sdist natten "$NATTEN_VER" "$WORK/natten")
  "$VENV/bin/python" "$ROOT/tools/patch_natten_source.py" "$src"
  CUDA_VISIBLE_DEVICES='' NATTEN_CUDA_ARCH="" NATTEN_WITH_CUDA=0 \
    NATTEN_N_WORKERS="${MAX_JOBS:-$(nproc)}" NATTEN_VERBOSE=1 build_wheel natten "$src" "$CPU_CACHE"
else
  log "   cached wheel found"
fi

# ---------------------------------------------------------------------------------------------------
log "5/6 the rest of requirements.txt"
# The mmcv wheel of this build choice first (replacing one of the other choice), then the rest.
"${PIP[@]}" install -q --no-deps --force-reinstall "$(wheel_in "$CACHE" mmcv "$MMCV_VER")"
"${PIP[@]}" install -q --find-links "$CPU_CACHE" -r "$REQ"

log "6/6 mmoverlock (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "mmengine", "mmcv", "mmdet", "mmseg", "timm", "natten", "mmoverlock"):
    mod = importlib.import_module(name)
    print(f"  {name:<11} {getattr(mod, '__version__', '?')}")
from mmcv.ops import get_compiling_cuda_version  # compiled ops present
print(f"  mmcv ops    CUDA: {get_compiling_cuda_version()}")
PY
stamp_value "$CACHE_KEY" >"$STAMP"
log "done: activate with 'source .venv/bin/activate'"
