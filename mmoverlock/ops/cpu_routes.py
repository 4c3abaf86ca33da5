"""Choosing between equivalent CPU routes of an operator by measuring them on this machine.

Several operators of the backbones can be computed in more than one way on the CPU with the same
result (a dilated depthwise convolution with its padding in the call or applied beforehand; a
depthwise weight gradient as PyTorch's own backward, a grouped convolution or an FFT product).
Which way is fastest depends on the processor: oneDNN's AVX2 depthwise kernel, for one, accepts
less padding than its AVX-512 kernel and beyond it falls back to an im2col GEMM that is one to two
orders of magnitude slower. Constants tuned on one processor are therefore wrong on another.

As ``torch.backends.cudnn.benchmark`` does on GPUs, :func:`choose` times every candidate the first
time an (operator, shape, dtype, layout, thread count) is seen, keeps the fastest in memory and
uses it from then on. The measuring costs a few runs of each candidate once per distinct shape
(``route_stats()`` reports the seconds spent); a training run reuses the same few dozen shapes
for its whole length.

Settings (environment, read when first needed; :func:`set_mode` changes the mode in-process):

- ``MMOVERLOCK_CPU_ROUTES=measure`` (default): measure as described.
- ``MMOVERLOCK_CPU_ROUTES=fixed``: no measuring; every operator takes its fixed default route,
  chosen to be safe on AVX2 and AVX-512 alike (reproducible: the same route on every run and
  machine). Also used while tracing, compiling, counting operations
  (:func:`~mmoverlock.ops.depthwise_conv.as_defined`) and whenever
  ``torch.use_deterministic_algorithms(True)`` is on (mmengine's ``randomness.deterministic``),
  since routes may differ in the last bits of their float results.
- ``MMOVERLOCK_ROUTE_CACHE=PATH``: also keep the choices in the JSON file ``PATH``, under a key
  naming the CPU model, PyTorch's CPU capability, oneDNN's ISA, the thread count and the torch
  version, so later processes on the same machine skip the measuring.
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ['MODE_ENV', 'CACHE_ENV', 'MODES', 'choose', 'measure', 'set_mode', 'get_mode',
           'route_stats', 'routes_mode', 'clear_routes', 'machine_key', 'cpu_model',
           'describe_cpu', 'size_bucket']

MODE_ENV = 'MMOVERLOCK_CPU_ROUTES'
CACHE_ENV = 'MMOVERLOCK_ROUTE_CACHE'
MODES = ('measure', 'fixed')

_lock = threading.RLock()  # re-entrant: a measured route may itself choose a route
_state: dict[str, Any] = {'mode': None, 'choices': {}, 'seconds': 0.0, 'measured': 0,
                          'loaded': None, 'timings': {}}


def get_mode() -> str:
    """The current mode: ``'measure'`` or ``'fixed'`` (from ``MMOVERLOCK_CPU_ROUTES``)."""
    if _state['mode'] is None:
        mode = os.environ.get(MODE_ENV, 'measure').strip().lower() or 'measure'
        if mode not in MODES:
            raise ValueError(f'{MODE_ENV}={mode!r} is not a valid setting; use one of {MODES}')
        _state['mode'] = mode
    return _state['mode']


def set_mode(mode: str) -> None:
    """Set the mode for this process (``'measure'`` or ``'fixed'``)."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    _state['mode'] = mode


@contextmanager
def routes_mode(mode: str) -> Iterator[None]:
    """Within this context the mode is ``mode`` (restored after it)."""
    before = get_mode()
    set_mode(mode)
    try:
        yield
    finally:
        _state['mode'] = before


def clear_routes() -> None:
    """Forget every choice made in this process (the disk cache, if any, is kept)."""
    with _lock:
        _state['choices'] = {}
        _state['timings'] = {}
        _state['seconds'] = 0.0
        _state['measured'] = 0
        _state['loaded'] = None


def route_stats() -> dict:
    """What the measuring cost so far in this process: ``seconds`` spent timing candidates,
    ``measured`` (number of distinct keys timed) and ``choices`` (key -> route)."""
    return dict(seconds=_state['seconds'], measured=_state['measured'],
                choices=dict(_state['choices']), timings=dict(_state['timings']))


@cache
def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def machine_key() -> str:
    """What a measured choice holds for: CPU model, PyTorch's CPU capability, oneDNN's ISA
    limit (``ONEDNN_MAX_CPU_ISA``, empty when unset), thread count and torch version."""
    return '|'.join([cpu_model(), torch.backends.cpu.get_cpu_capability(),
                     os.environ.get('ONEDNN_MAX_CPU_ISA', ''), f'threads={torch.get_num_threads()}',
                     f'torch={torch.__version__}'])


def _fixed_only() -> bool:
    # compiling first: dynamo would otherwise guard on the lazily read mode (``_state``) and
    # recompile every graph once the first call has read it
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    if get_mode() == 'fixed' or torch.are_deterministic_algorithms_enabled():
        return True
    from .depthwise_conv import running_as_defined  # a counter or tracer is looking
    return running_as_defined()


def _disk_choices() -> dict:
    path = os.environ.get(CACHE_ENV)
    if not path:
        return {}
    if _state['loaded'] is None:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        _state['loaded'] = data if isinstance(data, dict) else {}
    return _state['loaded'].setdefault(machine_key(), {})


def _save_disk() -> None:
    path = os.environ.get(CACHE_ENV)
    if not path or _state['loaded'] is None:
        return
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, 'w') as f:
            json.dump(_state['loaded'], f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the measuring next time


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: maps of similar size share one measured choice (a
    detector's input sizes vary from batch to batch; measuring each would cost more than it
    saves)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def _isolated() -> Iterator[None]:
    """Run trial candidates apart from the model's step: outside any active dispatch mode
    (selective recomputation's policy, operator counters) and any saved-tensor hooks (activation
    checkpointing), which would otherwise record, or recompute for, the trials' operations;
    without autograd (a candidate that times a backward enables it for itself)."""
    with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep), \
            torch.no_grad():
        yield


def measure(candidates: Mapping[str, Callable[[], Any]], repeats: int = 2) -> dict[str, float]:
    """Seconds per call of each candidate: one warm-up run each, then ``repeats`` rounds in
    turn (interleaved, so that a drift of the machine's speed hits every candidate alike),
    the best of each. A candidate over 4x slower than the best after warm-up is not repeated."""
    warm = {name: _time_once(fn) for name, fn in candidates.items()}
    best = dict(warm)
    floor = min(warm.values())
    contenders = [name for name, t in warm.items() if t <= 4 * floor]
    for _ in range(repeats):
        for name in contenders:
            best[name] = min(best[name], _time_once(candidates[name]))
    return best


def choose(op: str, key: tuple, candidates: Mapping[str, Callable[[], Any]],
           default: str) -> str:
    """The route to take for ``op`` with ``key`` (shape, dtype, layout, parameters).

    Args:
        op: The operator's name (part of the cache key).
        key: Everything besides the machine that the speed of the routes depends on; the thread
            count is added here.
        candidates: Route name -> a function running that route once on representative inputs
            (called only when measuring).
        default: The fixed route (taken when measuring is off, see the module docstring).

    Returns:
        The name of the chosen route.
    """
    if default not in candidates:
        raise ValueError(f'default route {default!r} of {op} is not among {list(candidates)}')
    if len(candidates) == 1 or _fixed_only():
        return default
    full = f'{op}{key}|threads={torch.get_num_threads()}'
    route = _state['choices'].get(full)
    if route is not None:
        return route
    with _lock:
        route = _state['choices'].get(full)
        if route is not None:
            return route
        disk = _disk_choices()
        route = disk.get(full)
        if route not in candidates:
            start = time.perf_counter()
            # unseen by any dispatch mode or saved-tensor hooks around the call: selective
            # checkpointing replays the forward's operators by invocation index, and activation
            # checkpointing would recompute its region for a trial's backward (_isolated)
            with _isolated():
                timings = measure(candidates)
            route = min(timings, key=timings.get)
            _state['seconds'] += time.perf_counter() - start
            _state['measured'] += 1
            _state['timings'][full] = {k: round(v * 1e3, 3) for k, v in timings.items()}
            if os.environ.get(CACHE_ENV):
                disk[full] = route
                _save_disk()
        _state['choices'][full] = route
    return route


def describe_cpu() -> dict[str, Optional[str]]:
    """CPU model, PyTorch's CPU capability and oneDNN's ISA limit, for result files."""
    return dict(cpu_model=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                onednn_max_cpu_isa=os.environ.get('ONEDNN_MAX_CPU_ISA') or 'default (all)',
                mkl_enable_instructions=os.environ.get('MKL_ENABLE_INSTRUCTIONS'),
                aten_cpu_capability=os.environ.get('ATEN_CPU_CAPABILITY'))
