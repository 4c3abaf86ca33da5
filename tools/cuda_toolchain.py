"""Decide how ``tools/setup_env.sh`` builds mmcv: with CPU ops only, or with CUDA ops and which
CUDA compiler, and prepare that compiler.

The decision is a pure function of what was probed (``decide``), so it is unit-tested
(``tests/test_setup_cuda.py``); the probing itself and a small command line are at the bottom.

* ``MMOVERLOCK_CUDA``: ``1`` forces CUDA ops, ``0`` forces CPU ops, unset / ``auto`` builds CUDA
  ops when PyTorch is a CUDA build and sees at least one GPU.
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for (e.g. ``8.6;9.0``); by default the
  compute capabilities of the visible GPUs, deduplicated.
* ``MMOVERLOCK_CUDA_TOOLKIT``: ``system`` / ``pip`` / unset (``auto``). Auto takes the system CUDA
  toolkit when its nvcc has PyTorch's CUDA version (major.minor), otherwise NVIDIA's pip-packaged
  compiler of exactly that version (``cuda-toolkit[nvcc,cccl]``, the meta-package PyTorch's wheels
  already depend on), installed into the virtual environment.

Command line (what ``setup_env.sh`` runs with the environment's Python, torch installed)::

    python tools/cuda_toolchain.py plan [--torch-tag 2.14.1_cu130] [--py-tag cp311]
        # shell assignments: MMCV_CUDA, CUDA_TOOLKIT, ARCH_LIST, CACHE_KEY, CUDA_HOME_SYSTEM, ...
    python tools/cuda_toolchain.py cuda-home DEST
        # a CUDA_HOME for torch.utils.cpp_extension made of links to the pip-packaged compiler
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

# The extras of NVIDIA's ``cuda-toolkit`` meta-package that a PyTorch CUDA extension build needs:
# ``nvcc`` brings nvcc, ptxas, fatbinary, the crt headers, cudart and nvvm (cicc, libdevice);
# ``cccl`` brings thrust / cub / libcu++, which CUDA 13 headers include. The other headers torch's
# own headers include (cuBLAS, cuSPARSE, cuSOLVER, ...) come with torch's runtime dependencies.
PIP_TOOLKIT_EXTRAS = ('nvcc', 'cccl')

_ARCH = re.compile(r'^(\d+)\.(\d+)([af]?)(\+PTX)?$')
_NVCC_RELEASE = re.compile(r'release (\d+)\.(\d+)')


class ToolchainError(ValueError):
    """A setting or a probed toolchain that makes the requested build impossible."""


@dataclass(frozen=True)
class BuildPlan:
    """How mmcv is compiled.

    Attributes:
        cuda: compile the CUDA ops (``FORCE_CUDA=1``); False: CPU ops only.
        toolkit: ``'system'`` or ``'pip'`` (the CUDA compiler to use); ``''`` for a CPU build.
        arch_list: ``TORCH_CUDA_ARCH_LIST`` for the build (``''`` for a CPU build).
        cuda_version: PyTorch's CUDA version ``'major.minor'`` (``''`` for a CPU build).
        reason: one line saying why, for the setup log.
    """

    cuda: bool
    toolkit: str = ''
    arch_list: str = ''
    cuda_version: str = ''
    reason: str = ''


def parse_cuda_flag(value: Optional[str]) -> Optional[bool]:
    """Read ``MMOVERLOCK_CUDA``.

    Args:
        value: the variable's value, or None when unset.

    Returns:
        True (force CUDA ops), False (force CPU ops) or None (decide from the machine).
    """
    text = (value or '').strip().lower()
    if text in ('', 'auto'):
        return None
    if text in ('1', 'true', 'yes', 'on'):
        return True
    if text in ('0', 'false', 'no', 'off'):
        return False
    raise ToolchainError(f'MMOVERLOCK_CUDA={value!r} is not understood: use 1 (CUDA ops), '
                         '0 (CPU ops) or leave it unset (CUDA ops when a GPU is visible)')


def parse_toolkit_choice(value: Optional[str]) -> str:
    """Read ``MMOVERLOCK_CUDA_TOOLKIT``.

    Args:
        value: the variable's value, or None when unset.

    Returns:
        ``'auto'``, ``'system'`` or ``'pip'``.
    """
    text = (value or '').strip().lower() or 'auto'
    if text not in ('auto', 'system', 'pip'):
        raise ToolchainError(f'MMOVERLOCK_CUDA_TOOLKIT={value!r} is not understood: use '
                             "'system', 'pip' or leave it unset (system when its version matches)")
    return text


def parse_version(text: str) -> tuple[int, int]:
    """``'13.0'`` / ``'12.8.1'`` -> ``(13, 0)`` / ``(12, 8)``.

    Args:
        text: a CUDA version string as ``torch.version.cuda`` gives it.
    """
    match = re.match(r'^\s*(\d+)\.(\d+)', text or '')
    if not match:
        raise ToolchainError(f'not a CUDA version: {text!r} (expected major.minor, e.g. 13.0)')
    return int(match.group(1)), int(match.group(2))


def parse_nvcc_version(output: str) -> Optional[tuple[int, int]]:
    """The ``(major, minor)`` release in the output of ``nvcc --version``, or None if absent.

    Args:
        output: what ``nvcc --version`` printed.
    """
    match = _NVCC_RELEASE.search(output or '')
    return (int(match.group(1)), int(match.group(2))) if match else None


def format_arch_list(capabilities: Iterable[Sequence[int]]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for GPUs of these compute capabilities, deduplicated and sorted.

    Args:
        capabilities: ``(major, minor)`` per GPU, as ``torch.cuda.get_device_capability`` gives.

    Returns:
        e.g. ``'8.6;9.0'``; ``''`` for no GPU.
    """
    unique = sorted({(int(c[0]), int(c[1])) for c in capabilities})
    return ';'.join(f'{major}.{minor}' for major, minor in unique)


def parse_arch_list(text: str) -> list[str]:
    """Split and check a ``TORCH_CUDA_ARCH_LIST`` (``;``, ``,`` or spaces between entries).

    Args:
        text: e.g. ``'8.0;9.0+PTX'`` or ``'9.0a'``.

    Returns:
        The entries, in order, duplicates removed.
    """
    entries: list[str] = []
    for item in re.split(r'[;,\s]+', text.strip()):
        if not item:
            continue
        if not _ARCH.match(item):
            raise ToolchainError(
                f'TORCH_CUDA_ARCH_LIST entry {item!r} is not a compute capability: write '
                "entries like '9.0', '8.6+PTX' or '9.0a', separated by ';'")
        if item not in entries:
            entries.append(item)
    if not entries:
        raise ToolchainError('TORCH_CUDA_ARCH_LIST is empty: name at least one compute '
                             "capability, e.g. '9.0' for an H100")
    return entries


def arch_tag(arch_list: str) -> str:
    """The arch part of the wheel cache key: ``'8.6;9.0+PTX'`` -> ``'sm86_sm90ptx'``.

    Args:
        arch_list: a valid ``TORCH_CUDA_ARCH_LIST``.
    """
    tags = []
    for item in parse_arch_list(arch_list):
        major, minor, suffix, ptx = _ARCH.match(item).groups()
        tags.append(f'sm{major}{minor}{suffix}' + ('ptx' if ptx else ''))
    return '_'.join(tags)


def cuda_tag(cuda_version: str) -> str:
    """``'13.0'`` -> ``'cu130'``, ``'12.8'`` -> ``'cu128'``.

    Args:
        cuda_version: PyTorch's CUDA version.
    """
    major, minor = parse_version(cuda_version)
    return f'cu{major}{minor}'


def cache_key(torch_tag: str, py_tag: str, plan: BuildPlan) -> str:
    """Name of the wheel cache folder for a build.

    Args:
        torch_tag: ``torch.__version__`` with ``+`` replaced by ``_`` (e.g. ``'2.14.1_cu130'``).
        py_tag: e.g. ``'cp311'``.
        plan: the build; a CPU build keeps the key ``torch<torch_tag>-<py_tag>``, a CUDA build
            appends the CUDA version and the architectures, e.g. ``-cu130-sm90``.
    """
    key = f'torch{torch_tag}-{py_tag}'
    if plan.cuda:
        key += f'-{cuda_tag(plan.cuda_version)}-{arch_tag(plan.arch_list)}'
    return key


def decide(cuda_forced: Optional[bool], gpu_capabilities: Sequence[Sequence[int]],
           torch_cuda: Optional[str], system_nvcc_version: Optional[tuple[int, int]],
           arch_override: Optional[str] = None, toolkit_choice: str = 'auto') -> BuildPlan:
    """Choose CPU or CUDA ops for mmcv, and for CUDA the architectures and the compiler.

    Args:
        cuda_forced: ``parse_cuda_flag(MMOVERLOCK_CUDA)``: True / False / None (auto).
        gpu_capabilities: compute capability of each visible GPU (empty: none visible).
        torch_cuda: ``torch.version.cuda`` (None for a CPU-only PyTorch build).
        system_nvcc_version: release of the system CUDA toolkit's nvcc, None if there is none.
        arch_override: ``TORCH_CUDA_ARCH_LIST`` if set (takes precedence over the GPUs).
        toolkit_choice: ``parse_toolkit_choice(MMOVERLOCK_CUDA_TOOLKIT)``.

    Returns:
        The plan. Raises ToolchainError when CUDA ops are forced but cannot be built.
    """
    if cuda_forced is False:
        return BuildPlan(cuda=False, reason='CPU ops: MMOVERLOCK_CUDA=0')
    if not torch_cuda:
        if cuda_forced:
            raise ToolchainError('MMOVERLOCK_CUDA=1 but the installed PyTorch is a CPU-only '
                                 'build (torch.version.cuda is None): install a CUDA build of '
                                 'torch, or unset MMOVERLOCK_CUDA')
        return BuildPlan(cuda=False, reason='CPU ops: PyTorch is a CPU-only build')
    if cuda_forced is None and not gpu_capabilities:
        return BuildPlan(cuda=False, reason='CPU ops: no GPU visible (MMOVERLOCK_CUDA=1 with '
                                            'TORCH_CUDA_ARCH_LIST builds CUDA ops anyway)')
    if arch_override is not None and arch_override.strip():
        arch_list = ';'.join(parse_arch_list(arch_override))
        arch_from = 'TORCH_CUDA_ARCH_LIST'
    elif gpu_capabilities:
        arch_list = format_arch_list(gpu_capabilities)
        arch_from = 'the visible GPUs'
    else:
        raise ToolchainError('MMOVERLOCK_CUDA=1 but no GPU is visible to take the architectures '
                             "from: set TORCH_CUDA_ARCH_LIST too (e.g. '9.0' for an H100, "
                             "'8.0' for an A100)")
    major_minor = parse_version(torch_cuda)
    version = f'{major_minor[0]}.{major_minor[1]}'
    system = None if system_nvcc_version is None else tuple(system_nvcc_version)
    if toolkit_choice == 'system':
        if system is None:
            raise ToolchainError('MMOVERLOCK_CUDA_TOOLKIT=system but no system CUDA toolkit was '
                                 'found (set CUDA_HOME to it, or unset MMOVERLOCK_CUDA_TOOLKIT)')
        if system != major_minor:
            raise ToolchainError(
                f'MMOVERLOCK_CUDA_TOOLKIT=system but the system nvcc is CUDA {system[0]}.'
                f'{system[1]} and PyTorch was built with CUDA {version}: extensions must use '
                "PyTorch's version; unset MMOVERLOCK_CUDA_TOOLKIT to use the pip-packaged one")
        toolkit, why = 'system', f'system nvcc {version} (MMOVERLOCK_CUDA_TOOLKIT=system)'
    elif toolkit_choice == 'pip':
        toolkit, why = 'pip', f'pip-packaged nvcc {version} (MMOVERLOCK_CUDA_TOOLKIT=pip)'
    elif system == major_minor:
        toolkit, why = 'system', f'system nvcc {version} matches PyTorch'
    else:
        found = 'none found' if system is None else f'system nvcc is {system[0]}.{system[1]}'
        toolkit, why = 'pip', f"pip-packaged nvcc {version} ({found}; PyTorch's CUDA is {version})"
    how = 'MMOVERLOCK_CUDA=1' if cuda_forced else 'GPU visible'
    return BuildPlan(cuda=True, toolkit=toolkit, arch_list=arch_list, cuda_version=version,
                     reason=f'CUDA ops ({how}) for {arch_list} (from {arch_from}), {why}')


def pip_toolkit_requirement(torch_cuda: str, toolkit_version: Optional[str]) -> str:
    """The pip requirement that installs the CUDA compiler matching PyTorch.

    Args:
        torch_cuda: ``torch.version.cuda``.
        toolkit_version: version of the installed ``cuda-toolkit`` meta-package (PyTorch's
            wheels depend on it), or None if it is not installed.

    Returns:
        e.g. ``'cuda-toolkit[nvcc,cccl]==13.0.3.0'``, or ``...==13.0.*`` without a version.
    """
    extras = ','.join(PIP_TOOLKIT_EXTRAS)
    major, minor = parse_version(torch_cuda)
    if toolkit_version:
        if parse_version(toolkit_version) != (major, minor):
            raise ToolchainError(f'cuda-toolkit {toolkit_version} is installed but PyTorch was '
                                 f'built with CUDA {major}.{minor}: reinstall the pinned torch')
        return f'cuda-toolkit[{extras}]=={toolkit_version}'
    return f'cuda-toolkit[{extras}]=={major}.{minor}.*'


def pip_toolkit_root(site_packages: Path, torch_cuda: str) -> Path:
    """Where NVIDIA's pip wheels of CUDA ``torch_cuda`` put bin/, include/, lib/ and nvvm/.

    Args:
        site_packages: the environment's site-packages folder.
        torch_cuda: ``torch.version.cuda``.
    """
    major, _ = parse_version(torch_cuda)
    if major < 13:
        raise ToolchainError(
            f'the pip-packaged CUDA {torch_cuda} compiler spreads over one folder per component; '
            'only the CUDA >= 13 layout (nvidia/cu13) is supported: install a system CUDA '
            f'{torch_cuda} toolkit and point CUDA_HOME at it')
    return Path(site_packages) / 'nvidia' / f'cu{major}'


def make_cuda_home(toolkit_root: Path, dest: Path) -> Path:
    """Make ``dest`` a CUDA_HOME for ``torch.utils.cpp_extension`` out of links into the pip
    toolkit at ``toolkit_root``, without touching site-packages.

    torch links extensions with ``-L$CUDA_HOME/lib64 -lcudart``; NVIDIA's wheels ship ``lib/``
    with versioned libraries only (``libcudart.so.13``). ``dest`` gets ``bin``, ``include`` and
    ``nvvm`` as links and a ``lib64/`` folder with a link to every library plus an unversioned
    name for each versioned one. Re-running replaces ``dest``.

    Args:
        toolkit_root: e.g. ``site-packages/nvidia/cu13`` (see :func:`pip_toolkit_root`).
        dest: the folder to create.

    Returns:
        ``dest``.
    """
    toolkit_root, dest = Path(toolkit_root), Path(dest)
    needed = {'bin/nvcc': 'nvcc', 'nvvm/bin/cicc': 'nvvm', 'include/cuda_runtime.h': 'cudart',
              'include/cccl/cuda/std/version': 'cccl'}
    lib = toolkit_root / 'lib'
    missing = [f'{rel} (extra {extra})' for rel, extra in needed.items()
               if not (toolkit_root / rel).exists()]
    if not list(lib.glob('libcudart.so*')):
        missing.append('lib/libcudart.so.* (extra cudart)')
    if missing:
        raise ToolchainError(f'the pip CUDA toolkit at {toolkit_root} lacks ' + ', '.join(missing)
                             + ': install cuda-toolkit[' + ','.join(PIP_TOOLKIT_EXTRAS) + ']')
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ('bin', 'include', 'nvvm'):
        (dest / name).symlink_to(toolkit_root / name, target_is_directory=True)
    lib64 = dest / 'lib64'
    lib64.mkdir()
    for path in sorted(lib.iterdir()):
        (lib64 / path.name).symlink_to(path)
    for path in sorted(lib.glob('lib*.so.*')):
        plain = lib64 / (path.name.split('.so.')[0] + '.so')
        if not plain.exists():
            plain.symlink_to(path)
    return dest


# --------------------------------------------------------------------------------------------
# Probing the machine (not unit-tested: it depends on what is installed).

def find_system_toolkit() -> tuple[Optional[Path], Optional[tuple[int, int]]]:
    """The system CUDA toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda, then nvcc on PATH) and its
    nvcc release; ``(None, None)`` if there is none. A folder counts only with ``bin/nvcc`` and
    ``include/cuda_runtime.h`` (a wrapper script on PATH does not make its folder a toolkit)."""
    candidates = [os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda']
    on_path = shutil.which('nvcc')
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    for candidate in candidates:
        if not candidate:
            continue
        root = Path(candidate)
        nvcc = root / 'bin' / 'nvcc'
        if nvcc.is_file() and (root / 'include' / 'cuda_runtime.h').is_file():
            try:
                out = subprocess.run([str(nvcc), '--version'], capture_output=True, text=True,
                                     timeout=60).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            version = parse_nvcc_version(out)
            if version is not None:
                return root.resolve(), version
    return None, None


def _gpu_capabilities(torch_module) -> list[tuple[int, int]]:
    if not torch_module.cuda.is_available():
        return []
    return [tuple(torch_module.cuda.get_device_capability(i))
            for i in range(torch_module.cuda.device_count())]


def _installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_tags(torch_version: str, version_info: Sequence[int]) -> tuple[str, str]:
    """The torch and Python parts of the wheel cache key, as ``setup_env.sh`` has always written
    them: ``('2.14.1+cu130', (3, 11)) -> ('2.14.1_cu130', 'cp311')``.

    Args:
        torch_version: ``torch.__version__``.
        version_info: ``sys.version_info``.
    """
    return torch_version.replace('+', '_'), f'cp{version_info[0]}{version_info[1]}'


def plan_from_environment(torch_tag: Optional[str] = None,
                          py_tag: Optional[str] = None) -> dict[str, str]:
    """Probe torch, the GPUs and the system toolkit, decide, and return the shell variables.

    Args:
        torch_tag: see :func:`cache_key` (default: from the installed torch).
        py_tag: see :func:`cache_key` (default: this interpreter's).
    """
    import torch

    tags = default_tags(str(torch.__version__), sys.version_info)
    torch_tag, py_tag = torch_tag or tags[0], py_tag or tags[1]

    cuda_forced = parse_cuda_flag(os.environ.get('MMOVERLOCK_CUDA'))
    toolkit_choice = parse_toolkit_choice(os.environ.get('MMOVERLOCK_CUDA_TOOLKIT'))
    torch_cuda = torch.version.cuda
    gpus = _gpu_capabilities(torch) if torch_cuda and cuda_forced is not False else []
    system_root, system_version = (find_system_toolkit() if torch_cuda and cuda_forced is not False
                                   else (None, None))
    plan = decide(cuda_forced, gpus, torch_cuda, system_version,
                  os.environ.get('TORCH_CUDA_ARCH_LIST'), toolkit_choice)
    out = {'MMCV_CUDA': '1' if plan.cuda else '0', 'CUDA_TOOLKIT': plan.toolkit,
           'ARCH_LIST': plan.arch_list, 'CUDA_VERSION': plan.cuda_version,
           'CACHE_KEY': cache_key(torch_tag, py_tag, plan),
           'CPU_CACHE_KEY': cache_key(torch_tag, py_tag, BuildPlan(cuda=False)),
           'PLAN_REASON': plan.reason,
           'CUDA_HOME_SYSTEM': '', 'PIP_TOOLKIT_REQ': '', 'PIP_TOOLKIT_ROOT': ''}
    if plan.toolkit == 'system':
        out['CUDA_HOME_SYSTEM'] = str(system_root)
    elif plan.toolkit == 'pip':
        out['PIP_TOOLKIT_REQ'] = pip_toolkit_requirement(torch_cuda,
                                                         _installed_version('cuda-toolkit'))
        out['PIP_TOOLKIT_ROOT'] = str(pip_toolkit_root(Path(sysconfig.get_paths()['purelib']),
                                                       torch_cuda))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; see the module docstring.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p_plan = sub.add_parser('plan', help='print the build plan as shell assignments')
    p_plan.add_argument('--torch-tag', help='default: torch.__version__ with + as _')
    p_plan.add_argument('--py-tag', help='default: cpXY of this interpreter')
    p_home = sub.add_parser('cuda-home', help='make a CUDA_HOME of links to the pip toolkit')
    p_home.add_argument('toolkit_root', type=Path)
    p_home.add_argument('dest', type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == 'plan':
            for key, value in plan_from_environment(args.torch_tag, args.py_tag).items():
                print(f'{key}={shlex.quote(value)}')
        else:
            print(make_cuda_home(args.toolkit_root, args.dest))
    except ToolchainError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
