"""glibc malloc tuning of the tools: freed large blocks stay in the process (or not, on opt-out)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmoverlock.utils.cpu_allocator import MALLOC_TUNING_ENV

PROBE = """
import os, sys
import torch
from mmoverlock.utils.cpu_allocator import keep_freed_memory

def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

active = keep_freed_memory()
assert keep_freed_memory() == active  # idempotent
before = rss()
x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
del x
print(int(active), (rss() - before) // 2**20)
"""


def _probe(tuning: str) -> tuple[int, int]:
    env = dict(os.environ, **{MALLOC_TUNING_ENV: tuning})
    out = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc malloc tuning is Linux-only')
def test_freed_blocks_are_kept_for_reuse_unless_opted_out() -> None:
    active, kept_mb = _probe('1')
    assert active == 1 and kept_mb >= 60  # the freed 64 MB block stays mapped for reuse
    active, kept_mb = _probe('0')
    assert active == 0 and kept_mb < 16  # default glibc: the block went back to the system


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record keep_freed_memory() calls instead of changing this process's malloc."""
    from mmoverlock.utils import cpu_allocator
    made: list = []
    monkeypatch.setattr(cpu_allocator, 'keep_freed_memory', lambda: made.append(1) or True)
    monkeypatch.setattr(cpu_allocator, '_state', {})
    monkeypatch.delenv(MALLOC_TUNING_ENV, raising=False)
    return made


def test_tuning_only_for_runs_on_the_cpu(calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mmoverlock.utils.cpu_allocator import runs_on_cpu, tune_malloc_for
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert not runs_on_cpu()
    assert tune_malloc_for() is False and calls == []  # a GPU run: malloc left alone
    assert runs_on_cpu('cpu') and tune_malloc_for('cpu') and calls == [1]  # --device cpu

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert runs_on_cpu() and not runs_on_cpu('cuda:0')
    assert tune_malloc_for() is True and calls == [1, 1]
    monkeypatch.setenv(MALLOC_TUNING_ENV, '0')  # the opt-out still wins
    assert tune_malloc_for() is False and calls == [1, 1]
