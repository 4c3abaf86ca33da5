#!/usr/bin/env bash
# Download, on a machine with internet, what benchmarks/gpu_check.sh installs on a GPU machine
# without internet: the Python 3.12 (cp312) manylinux x86-64 wheels of the OpenMMLab stack and of
# the dependencies that GPU image lacks, plus the mmcv source (gpu_check.sh compiles it there).
# They go into gpu_bundle/ at the repository root (git-ignored), which is carried with the
# working tree; the total must stay under the carry limit (64 MiB, the checkout included).
#
#   bash benchmarks/gpu_bundle.sh [DEST]      # default DEST: <repo>/gpu_bundle
#
# The stack versions come from requirements.txt; the small dependencies are pinned below (the
# versions the CPU environment resolved to when this was written). Packages the GPU image already
# has (torch, torchvision, numpy, scipy, matplotlib, opencv-python-headless, rich, regex, pyyaml,
# packaging, pillow, six, tqdm, huggingface-hub, safetensors, pytest) are not bundled.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/gpu_bundle}"
REQ="$ROOT/requirements.txt"
LIMIT_MIB=48   # leaves the rest of the 64 MiB carry limit to the checkout itself

die() { echo "gpu_bundle: error: $*" >&2; exit 1; }
pin() {
  local v
  v=$(grep -E "^$1==" "$REQ" | head -1 | sed -E "s/^$1==([^ #]+).*/\1/")
  [ -n "$v" ] || die "no '$1==' pin in requirements.txt"
  echo "$1==$v"
}

WHEELS=(
  "$(pin mmengine)" "$(pin mmdet)" "$(pin mmsegmentation)" "$(pin timm)"
  addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8 termcolor==3.3.0   # mmengine, mmcv
  shapely==2.2.0 terminaltables==3.1.10 pycocotools==2.0.11           # mmdet
  prettytable==3.18.0 ftfy==6.3.1 wcwidth==0.9.4                      # mmseg (ftfy: at import)
  "setuptools==80.10.2"  # < 81: mmcv's setup.py imports pkg_resources (the image's may be newer)
)
MMCV="$(pin mmcv)"

rm -rf "$DEST" && mkdir -p "$DEST"
# The device README's flags: cp312 wheels for the manylinux tags the GPU machine accepts.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

# mmcv ships only as source. pip prepares its metadata by running setup.py, which imports
# pkg_resources: use an interpreter with setuptools < 81 (the project's .venv has it).
PY_SDIST="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY_SDIST" ] || die "$PY_SDIST not found: run tools/setup_env.sh first, or set PYTHON to an
interpreter with setuptools<81"
"$PY_SDIST" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$DEST" "$MMCV"

n_whl=$(find "$DEST" -name '*.whl' | wc -l)
[ "$n_whl" -eq "${#WHEELS[@]}" ] || die "expected ${#WHEELS[@]} wheels in $DEST, found $n_whl"
ls "$DEST"/mmcv-*.tar.gz >/dev/null 2>&1 || die "the mmcv source was not downloaded"
size_kib=$(du -sk "$DEST" | cut -f1)
echo "gpu_bundle: $n_whl wheels + $(basename "$DEST"/mmcv-*.tar.gz) in $DEST:" \
  "$(awk -v k="$size_kib" 'BEGIN { printf "%.1f", k / 1024 }') MiB"
[ "$size_kib" -le $((LIMIT_MIB * 1024)) ] || die "bundle is over $LIMIT_MIB MiB"
