"""Timing of a callable: warm-up, timed iterations, statistics (for the benchmark tools)."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

__all__ = ['Timing', 'peak_memory', 'time_callable']


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
