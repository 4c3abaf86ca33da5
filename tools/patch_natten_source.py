"""Patch an unpacked natten 0.17.x source tree so that it builds and imports with current torch.

Used by ``tools/setup_env.sh`` on a scratch copy of the sdist; never on an installed package.

1. C++20: torch >= 2.10 headers need it; natten's CMakeLists.txt pins C++17.
2. ``from torch.cuda import _device_t`` no longer exists in torch; the alias is only a type hint.
3. ``get_device_cc()`` asks CUDA for the device capability at import time; on a machine without a
   GPU that raises. It must report 0 (no CUDA device) instead.

Each patch asserts that it applied, so a different natten release fails loudly instead of building
something half-patched.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

DEVICE_T_IMPORT = 'from torch.cuda import _device_t'
DEVICE_T_SHIM = ('from typing import Any as _Any\n'
                 '_device_t = _Any  # torch.cuda._device_t was removed from torch')
DEVICE_CC_BODY = re.compile(
    r'(def get_device_cc\(device_index[^\n]*\n)(\s+)'
    r'major, minor = torch\.cuda\.get_device_capability')


def patch_cmake(root: Path) -> None:
    path = root / 'csrc' / 'CMakeLists.txt'
    text = path.read_text()
    new = text.replace('-std=c++17', '-std=c++20').replace(
        'set(CXX_STD "17"', 'set(CXX_STD "20"')
    if '-std=c++20' not in new or 'set(CXX_STD "20"' not in new:
        raise SystemExit(f'natten patch: C++ standard not found in {path}')
    path.write_text(new)


def patch_device_t(root: Path) -> int:
    count = 0
    for path in (root / 'src' / 'natten').rglob('*.py'):
        text = path.read_text()
        if DEVICE_T_IMPORT in text:
            path.write_text(text.replace(DEVICE_T_IMPORT, DEVICE_T_SHIM))
            count += 1
    if count == 0:
        raise SystemExit('natten patch: no `_device_t` import found')
    return count


def patch_device_cc(root: Path) -> int:
    count = 0
    for path in (root / 'src' / 'natten').rglob('*.py'):
        text = path.read_text()
        new, n = DEVICE_CC_BODY.subn(
            r'\1\2if not torch.cuda.is_available():\n\2    return 0\n'
            r'\2major, minor = torch.cuda.get_device_capability', text)
        if n:
            path.write_text(new)
            count += n
    if count == 0:
        raise SystemExit('natten patch: get_device_cc() not found')
    return count


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit('usage: patch_natten_source.py UNPACKED_NATTEN_SOURCE_DIR')
    root = Path(argv[1])
    patch_cmake(root)
    n_import = patch_device_t(root)
    n_cc = patch_device_cc(root)
    print(f'natten source patched: C++20, _device_t shim in {n_import} files, '
          f'CPU-safe get_device_cc in {n_cc} places')


if __name__ == '__main__':
    main(sys.argv)
