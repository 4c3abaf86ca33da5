"""Shared command-line plumbing of the tools (argument types, error reporting)."""
from __future__ import annotations

import os
import sys
from typing import Callable

from mmoverlock.apis.errors import user_error_types
from mmoverlock.ops.cpu_routes import CACHE_ENV
from mmoverlock.utils.cpu_allocator import tune_malloc_for

#: Where the tools keep the CPU route choices measured on this machine.
DEFAULT_ROUTE_CACHE = '~/.cache/mmoverlock/cpu_routes.json'


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; report an error the user can fix (:func:`user_error_types`: a
    :class:`UsageError`, a corrupt or code-running checkpoint, a bad input batch, NaN / inf in
    training) as one ``error: ...`` line on stderr and exit with status 2.

    On a CPU run large freed blocks stay in the process for reuse (:func:`tune_malloc_for`); the
    device is the one mmengine's Runner uses (CUDA whenever it is available), which no config
    changes.

    The CPU routes measured on this machine (:mod:`mmoverlock.ops.cpu_routes`) are kept in
    ``~/.cache/mmoverlock/cpu_routes.json`` unless ``MMOVERLOCK_ROUTE_CACHE`` names another file
    (or is empty: no file): a second run reuses the first run's choices instead of measuring
    again, so two runs with the same seed compute with the same routes (bit-identical weights).
    """
    tune_malloc_for()
    cache_set = CACHE_ENV not in os.environ
    if cache_set:
        os.environ[CACHE_ENV] = os.path.expanduser(DEFAULT_ROUTE_CACHE)
    try:
        main()
    except user_error_types() as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    finally:
        if cache_set:  # in-process callers (tests) get their environment back
            os.environ.pop(CACHE_ENV, None)
    close_process_group()


def close_process_group() -> None:
    """Tear down the torch.distributed process group (if any) once every rank is done.

    mmengine leaves it open; gloo's worker threads then race the interpreter's exit, which now and
    then aborts a finished rank ('terminate called without an active exception', SIGABRT).
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def set_local_rank(local_rank: int) -> None:
    """Export ``--local_rank`` (passed by ``torch.distributed.launch``) for mmengine."""
    os.environ.setdefault('LOCAL_RANK', str(local_rank))
