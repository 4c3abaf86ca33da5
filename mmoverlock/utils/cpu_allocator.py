"""Keep freed memory inside the process (glibc), which makes CPU training and inference faster.

glibc's malloc serves every block above 128 KB-32 MB with a fresh ``mmap`` and gives it back on
free, so every large tensor of a forward / backward pass is page-faulted in anew: on this
project's machine a ``zeros_like`` of a 2x256x128x128 map took 13.6 ms that way and 1.0 ms from
recycled memory. With ``mmap`` off and trimming off, freed blocks are reused; peak RSS is still
the peak of live tensors plus fragmentation (measured in ``benchmarks/``). The tools call
:func:`tune_malloc_for` on start, which applies it only to runs on the CPU (:func:`runs_on_cpu`):
on a GPU run the tensors live in the GPU's memory and a host process that never returns freed
memory would only hold on to it. Set ``MMOVERLOCK_MALLOC_TUNING=0`` to leave malloc alone.
Elsewhere (or with another allocator preloaded, e.g. jemalloc / tcmalloc) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

__all__ = ['keep_freed_memory', 'MALLOC_TUNING_ENV', 'runs_on_cpu', 'tune_malloc_for']

MALLOC_TUNING_ENV = 'MMOVERLOCK_MALLOC_TUNING'
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_state: dict = {}


def keep_freed_memory() -> bool:
    """Switch glibc malloc to reuse freed memory (no ``mmap`` blocks, no trimming).

    Idempotent; returns whether the setting is active in this process.
    """
    if 'active' in _state:
        return _state['active']
    active = False
    if os.environ.get(MALLOC_TUNING_ENV, '1') != '0' and platform.system() == 'Linux' \
            and platform.libc_ver()[0] == 'glibc':
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            # mallopt returns 1 on success
            active = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
                mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    _state['active'] = active
    return active


def runs_on_cpu(device: Optional[str] = None) -> bool:
    """Whether a run computes on the CPU.

    Args:
        device: the device a tool was told to use (e.g. its ``--device``); None for the one
            mmengine's Runner picks: an accelerator whenever one is available (CUDA, unless
            ``CUDA_VISIBLE_DEVICES=''`` hides it, or MPS / NPU / MLU / MUSA), else the CPU.
    """
    import torch
    if device is not None:
        return torch.device(device).type == 'cpu'
    if torch.cuda.is_available():
        return False
    for name in ('npu', 'mlu', 'musa'):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            return False
    mps = getattr(torch.backends, 'mps', None)
    return not (mps is not None and mps.is_available())


def tune_malloc_for(device: Optional[str] = None) -> bool:
    """:func:`keep_freed_memory` if the run is on the CPU (:func:`runs_on_cpu`) and
    ``MMOVERLOCK_MALLOC_TUNING`` is not ``0``.

    Args:
        device: as for :func:`runs_on_cpu`.

    Returns:
        Whether the tuning is active in this process.
    """
    if os.environ.get(MALLOC_TUNING_ENV, '1') == '0' or not runs_on_cpu(device):
        return _state.get('active', False)
    return keep_freed_memory()
