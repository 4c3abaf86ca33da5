"""Shared command-line plumbing of the tools (argument types, error reporting)."""
from __future__ import annotations

import os
import sys
from typing import Callable

from mmoverlock.apis.errors import UsageError
from mmoverlock.utils.cpu_allocator import keep_freed_memory


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; report a :class:`UsageError` as one line on stderr and exit with status 2.

    Large freed blocks stay in the process for reuse (:func:`keep_freed_memory`, faster on CPU).
    """
    keep_freed_memory()
    try:
        main()
    except UsageError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
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
