#!/usr/bin/env bash
# One-command environment for mmoverlock: creates .venv/ at the repository root and installs the
# pinned stack of requirements.txt. mmcv and natten have no wheels for this torch, so they are
# compiled from their sources (with the patches listed below, applied to a copy of the source) and
# cached in $MMOVERLOCK_WHEEL_CACHE, keyed by torch and Python version. Idempotent: a ready
# environment whose pins did not change is left alone in a few seconds.
#
#   bash tools/setup_env.sh            # set up (or verify) .venv
#   MMOVERLOCK_REBUILD=1 bash tools/setup_env.sh   # ignore the wheel cache and rebuild
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQ="$ROOT/requirements.txt"
PY_BOOT="${PYTHON:-python3}"
STAMP="$VENV/.mmoverlock-setup-stamp"

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

stamp_value() {
  cat "$REQ" "$ROOT/tools/setup_env.sh" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ] && [ -z "${MMOVERLOCK_REBUILD:-}" ] \
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

PYTAG=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
TORCHTAG=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.replace("+", "_"))')
CACHE="${MMOVERLOCK_WHEEL_CACHE:-$HOME/.cache/mmoverlock/wheels}/torch${TORCHTAG}-${PYTAG}"
mkdir -p "$CACHE"
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

build_wheel() {  # build_wheel NAME SRC_DIR  (runs with the env set up by the caller)
  local name=$1 src=$2 logf="$CACHE/$1-build.log"
  log "   compiling $name (log: $logf)"
  # Progress: pip -v prints one line per compiled unit; keep the lines that show it.
  "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$CACHE" "$src" >"$logf" 2>&1 &
  local pid=$! n=0 last=""
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    n=$(grep -cE '\[[0-9]+/[0-9]+\]|^(gcc|g\+\+|c\+\+) ' "$logf" || true)
    last=$(grep -oE '\[[0-9]+/[0-9]+\]' "$logf" | tail -1 || true)
    log "   $name: still compiling ${last:-($n units so far)}"
  done
  wait "$pid" || { tail -40 "$logf" >&2; die "building $name failed; full log in $logf"; }
}

have_wheel() { ls "$CACHE"/"$1"-"$2"-*.whl >/dev/null 2>&1; }

MMCV_VER=$(pin mmcv)
NATTEN_VER=$(pin natten)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log "3/6 mmcv $MMCV_VER with ops (CPU)"
if [ -n "${MMOVERLOCK_REBUILD:-}" ] || ! have_wheel mmcv "$MMCV_VER"; then
  log "   no cached wheel: building from source (about 25 minutes on 2 cores)"
  src=$(fetch_sdist mmcv "$MMCV_VER" "$WORK/mmcv")
  # torch >= 2.10 headers need C++20; mmcv's setup.py hard-codes -std=c++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  grep -q -- '-std=c++20' "$src/setup.py" || die "mmcv patch (C++20) did not apply"
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" build_wheel mmcv "$src"
else
  log "   cached wheel found"
fi

log "4/6 natten $NATTEN_VER (CPU build, optional fast backend)"
if [ -n "${MMOVERLOCK_REBUILD:-}" ] || ! have_wheel natten "$NATTEN_VER"; then
  log "   no cached wheel: building from source (about 7 minutes on 2 cores)"
  src=$(fetch_sdist natten "$NATTEN_VER" "$WORK/natten")
  "$VENV/bin/python" "$ROOT/tools/patch_natten_source.py" "$src"
  NATTEN_CUDA_ARCH="" NATTEN_WITH_CUDA=0 NATTEN_N_WORKERS="${MAX_JOBS:-$(nproc)}" \
    NATTEN_VERBOSE=1 build_wheel natten "$src"
else
  log "   cached wheel found"
fi

# ---------------------------------------------------------------------------------------------------
log "5/6 the rest of requirements.txt"
"${PIP[@]}" install -q --find-links "$CACHE" -r "$REQ"

log "6/6 mmoverlock (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "mmengine", "mmcv", "mmdet", "mmseg", "timm", "natten", "mmoverlock"):
    mod = importlib.import_module(name)
    print(f"  {name:<11} {getattr(mod, '__version__', '?')}")
import mmcv.ops  # noqa: F401  (compiled ops present)
PY
stamp_value >"$STAMP"
log "done: activate with 'source .venv/bin/activate'"
