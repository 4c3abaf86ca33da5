"""Helpers of the benchmark tools: timing of a callable (warm-up, timed iterations, statistics),
the two implementations the benchmarks compare (ours and the authors' route), the environment that
limits a measuring process to an instruction set and what result files record about it."""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

__all__ = ['IMPLEMENTATIONS', 'ISAS', 'ISA_ENV_VARS', 'Timing', 'apply_route', 'cpu_record',
           'invocation', 'isa_environment', 'peak_memory', 'restore_route', 'route',
           'route_kwargs', 'save_results', 'time_callable']

#: ``'ours'``: mmoverlock as shipped; ``'baseline'``: the same network run the way the authors'
#: code runs it (see :func:`route_kwargs` and :func:`apply_route`).
IMPLEMENTATIONS = ('ours', 'baseline')


@dataclass
class Timing:
    """Seconds per timed iteration of a batch and what follows from them.

    Attributes:
        times: Seconds of each timed iteration.
        batch_size: Images per iteration.
        warmup: Untimed iterations run first.
    """

    times: list[float] = field(default_factory=list)
    batch_size: int = 1
    warmup: int = 0

    @property
    def mean(self) -> float:
        """Mean seconds per iteration."""
        return statistics.fmean(self.times)

    @property
    def median(self) -> float:
        """Median seconds per iteration."""
        return statistics.median(self.times)

    @property
    def std(self) -> float:
        """Sample standard deviation (0 for a single iteration)."""
        return statistics.stdev(self.times) if len(self.times) > 1 else 0.0

    @property
    def min(self) -> float:
        """Fastest iteration."""
        return min(self.times)

    @property
    def fps(self) -> float:
        """Images per second at the median iteration time."""
        return self.batch_size / self.median

    @property
    def fps_mean(self) -> float:
        """Images per second at the mean iteration time."""
        return self.batch_size / self.mean

    def as_dict(self) -> dict[str, Any]:
        """The statistics (seconds, images per second) and the raw times."""
        return dict(batch_size=self.batch_size, warmup=self.warmup, iters=len(self.times),
                    mean_s=self.mean, median_s=self.median, std_s=self.std, min_s=self.min,
                    fps=self.fps, fps_mean=self.fps_mean, times_s=list(self.times))


def _synchronize(device: Optional[Union[str, torch.device]]) -> None:
    if device is not None and torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], iters: int = 10, warmup: int = 3,
                  batch_size: int = 1, device: Optional[Union[str, torch.device]] = None,
                  ) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed (wall clock).

    Args:
        fn: One iteration (e.g. a ``test_step`` on a fixed batch).
        iters: Timed iterations (at least 1).
        warmup: Untimed iterations first (allocator, caches, cuDNN autotuning).
        batch_size: Images per iteration, for the images-per-second figures.
        device: On a CUDA device, every iteration is synchronised before the clock is read.
    """
    if iters < 1:
        raise ValueError(f'iters must be at least 1, got {iters}')
    for _ in range(max(warmup, 0)):
        fn()
    _synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(times=times, batch_size=batch_size, warmup=max(warmup, 0))


def peak_memory(device: Optional[Union[str, torch.device]] = None) -> dict[str, float]:
    """Peak memory so far in MiB: CUDA allocator peak on a CUDA device, else the process's peak
    resident set size (which includes everything the process did before)."""
    if device is not None and torch.device(device).type == 'cuda':
        return dict(cuda_peak_mib=torch.cuda.max_memory_allocated(device) / 2 ** 20)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_mib = 2 ** 20 if sys.platform == 'darwin' else 2 ** 10  # bytes on macOS, KiB on Linux
    return dict(peak_rss_mib=rss / per_mib)


# ------------------------------------------------------------------------------------------------
# Ours vs the authors' route
# ------------------------------------------------------------------------------------------------
def _check_impl(impl: str) -> bool:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'unknown implementation {impl!r}: use one of {IMPLEMENTATIONS}')
    return impl == 'ours'


def route_kwargs(impl: str) -> dict[str, bool]:
    """Constructor arguments of ``OverLoCK`` / ``OverLoCKClassifier`` for an implementation.

    Args:
        impl: ``'ours'`` (channels-last maps, selective recomputation in training) or
            ``'baseline'`` (the authors' NCHW layout and plain autograd).
    """
    ours = _check_impl(impl)
    return dict(selective_cp=ours, channels_last=ours)


def apply_route(impl: str) -> dict[str, Any]:
    """Set the process-wide switches of an implementation; returns the previous state for
    :func:`restore_route`.

    ``'baseline'``: the aggregation unfolds the values into every window
    (``MMOVERLOCK_NA_BACKEND=unfold``), PyTorch's own convolutions run forward and backward
    (``depthwise_conv.CUSTOM_BACKWARD = False``, ``pointwise_conv.ONEDNN = False``).
    ``'ours'``: the shipped defaults (automatic aggregation backend, both switches on).

    Args:
        impl: ``'ours'`` or ``'baseline'``.
    """
    from mmoverlock.ops import depthwise_conv, neighborhood, pointwise_conv
    ours = _check_impl(impl)
    previous = dict(env=os.environ.get(neighborhood.BACKEND_ENV),
                    custom_backward=depthwise_conv.CUSTOM_BACKWARD, onednn=pointwise_conv.ONEDNN)
    if ours:
        os.environ.pop(neighborhood.BACKEND_ENV, None)
    else:
        os.environ[neighborhood.BACKEND_ENV] = 'unfold'
    depthwise_conv.CUSTOM_BACKWARD = ours
    pointwise_conv.ONEDNN = ours
    return previous


def restore_route(previous: dict[str, Any]) -> None:
    """Undo :func:`apply_route`.

    Args:
        previous: What :func:`apply_route` returned.
    """
    from mmoverlock.ops import depthwise_conv, neighborhood, pointwise_conv
    if previous['env'] is None:
        os.environ.pop(neighborhood.BACKEND_ENV, None)
    else:
        os.environ[neighborhood.BACKEND_ENV] = previous['env']
    depthwise_conv.CUSTOM_BACKWARD = previous['custom_backward']
    pointwise_conv.ONEDNN = previous['onednn']


@contextmanager
def route(impl: str) -> Iterator[None]:
    """:func:`apply_route` for the duration of a ``with`` block (building and running a model).

    Args:
        impl: ``'ours'`` or ``'baseline'``.
    """
    previous = apply_route(impl)
    try:
        yield
    finally:
        restore_route(previous)


# ------------------------------------------------------------------------------------------------
# Instruction sets of the measuring processes and what result files record about them
# ------------------------------------------------------------------------------------------------
#: The variables that limit oneDNN, PyTorch's own kernels and MKL to an instruction set; read
#: when those libraries load, so they must be in a process's environment before torch is imported.
ISA_ENV_VARS = ('ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS')
#: ``--isa`` choices: ``'native'`` (everything the processor has) or an emulated lesser one, e.g.
#: ``'avx2'`` for an AVX2-only CPU such as AMD EPYC Zen 2/3 on an AVX-512 / AMX Xeon.
ISAS: dict[str, Optional[tuple[str, str, str]]] = {
    'native': None, 'avx2': ('AVX2', 'avx2', 'AVX2'), 'avx512': ('AVX512_CORE', 'avx512', 'AVX512')}


def isa_environment(isa: str, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of a measuring process limited to ``isa``.

    Args:
        isa: A key of :data:`ISAS`. ``'native'`` removes the three variables of
            :data:`ISA_ENV_VARS` (so that the process uses all the processor has, whatever the
            caller's environment), the others set them.
        base: The environment to start from (default: this process's).

    Returns:
        A new dict for ``subprocess.run(..., env=...)``.
    """
    if isa not in ISAS:
        raise ValueError(f'unknown instruction set {isa!r}: use one of {list(ISAS)}')
    env = dict(os.environ if base is None else base)
    values = ISAS[isa]
    for i, name in enumerate(ISA_ENV_VARS):
        if values is None:
            env.pop(name, None)
        else:
            env[name] = values[i]
    return env


def cpu_record() -> dict[str, Any]:
    """What a result file records about the process that measured (call it at the end of the
    measuring): CPU model, PyTorch's CPU capability, oneDNN's ISA limit (and the MKL / aten
    settings), the intra-op thread count, the CPU route mode (``'measure'`` or ``'fixed'``,
    :mod:`mmoverlock.ops.cpu_routes`), the seconds spent measuring routes and the number of
    shapes measured."""
    from ..ops import cpu_routes
    stats = cpu_routes.route_stats()
    return dict(cpu_routes.describe_cpu(), threads=torch.get_num_threads(),
                routes=cpu_routes.get_mode(), route_seconds=stats['seconds'],
                routes_measured=stats['measured'])


# ------------------------------------------------------------------------------------------------
# Result files
# ------------------------------------------------------------------------------------------------
def invocation(script: str, argv: Optional[list[str]], root: Path) -> str:
    """The command line that ran ``script`` (a path; shown relative to ``root``), for a result
    file: ``argv`` as passed to the script's ``main``, or this process's arguments if None."""
    args = sys.argv[1:] if argv is None else argv
    return 'python ' + ' '.join([os.path.relpath(script, root), *args])


def save_results(out: Union[str, Path], meta: dict, rows: list, text: str) -> None:
    """Write ``OUT.json`` (``meta`` and ``rows``) and ``OUT.md`` (``text``), creating the folder,
    and print ``text``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    out.with_suffix('.md').write_text(text)
    print(text)
