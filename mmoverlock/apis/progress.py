"""Progress of runs in other processes: a hook writes a small status file, the parent shows it.

The demo (``tools/demo.py``) trains its two tasks in two worker processes whose output goes to
their ``console.log``. Each worker's :class:`ProgressFileHook` rewrites ``progress.json`` after
every iteration (phase, iteration, total, smoothed loss, ETA); the parent polls these files
(:func:`follow`) and shows them with :class:`ProgressDisplay`: one ``tqdm`` bar per task on a
terminal, a plain line every few iterations otherwise (logs, CI).
"""
from __future__ import annotations

import json
import os
import os.path as osp
import sys
import time
from concurrent.futures import Future, wait
from typing import IO, Mapping, Optional, Sequence

from mmengine.hooks import Hook

#: Name of the status file in a task's work dir.
STATUS_FILE = 'progress.json'
#: Phases a status goes through; ``train`` and ``test`` count iterations.
PHASES = ('start', 'train', 'test', 'draw', 'done', 'failed')


def write_status(path: str, **status: object) -> None:
    """Replace the status file ``path`` with ``status`` (atomically: readers never see half)."""
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(status, f)
    os.replace(tmp, path)


def read_status(path: str) -> Optional[dict]:
    """The status in ``path``, or None while there is none (not written yet, or unreadable)."""
    try:
        with open(path) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get('phase') in PHASES else None


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def format_status(task: str, status: Mapping) -> str:
    """One line for ``status``: ``det: train 120/300, loss 0.532, ETA 3m00s``."""
    phase = status['phase']
    text = f'{task}: {phase}'
    if phase in ('train', 'test') and status.get('total'):
        text += f' {status.get("iter", 0)}/{status["total"]}'
    if phase == 'train' and status.get('loss') is not None:
        text += f', loss {status["loss"]:.3f}'
    if phase in ('train', 'test') and status.get('eta') is not None:
        text += f', ETA {format_duration(status["eta"])}'
    if status.get('message'):
        text += f' ({status["message"]})' if phase != 'train' else f', {status["message"]}'
    return text


class ProgressFileHook(Hook):
    """Writes the run's progress to ``path`` after every training and test iteration.

    Fields: ``phase`` (``train`` / ``test``), ``iter`` (iterations done), ``total``, ``loss``
    (training loss averaged over the last ``loss_window`` iterations), ``eta`` (seconds left in
    the phase, from the pace so far) and ``elapsed``.

    Args:
        path: the status file (see :func:`write_status`).
        loss_window: iterations the reported loss is averaged over.
    """

    priority = 'LOW'  # after RuntimeInfoHook has put this iteration's loss in the message hub

    def __init__(self, path: str, loss_window: int = 10) -> None:
        self.path = path
        self.loss_window = loss_window
        self._start = 0.0
        self._first = 0

    def _begin(self, phase: str, done: int, total: int) -> None:
        self._start, self._first = time.time(), done
        write_status(self.path, phase=phase, iter=done, total=total, loss=None, eta=None,
                     elapsed=0.0)

    def _step(self, phase: str, done: int, total: int, loss: Optional[float] = None) -> None:
        elapsed = time.time() - self._start
        pace = elapsed / max(1, done - self._first)
        write_status(self.path, phase=phase, iter=done, total=total, loss=loss,
                     eta=pace * max(0, total - done), elapsed=elapsed)

    def before_train(self, runner) -> None:
        self._begin('train', runner.iter, runner.max_iters)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        loss = None
        try:
            loss = float(runner.message_hub.get_scalar('train/loss').mean(self.loss_window))
        except KeyError:
            if outputs and 'loss' in outputs:
                loss = float(outputs['loss'])
        self._step('train', runner.iter + 1, runner.max_iters, loss)

    def before_test(self, runner) -> None:
        self._begin('test', 0, len(runner.test_dataloader))

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._step('test', batch_idx + 1, len(runner.test_dataloader))


class ProgressDisplay:
    """Shows the statuses of several tasks on ``stream``.

    On a terminal each task has a ``tqdm`` bar (iteration / total, rate, ETA, loss), redrawn in
    place. Otherwise (a file, a pipe, CI) a plain :func:`format_status` line is printed when a task
    enters a phase, then every ``every`` training iterations (default: a tenth of the run) and at
    the end of a training or test phase.

    Args:
        tasks: task names, in display order.
        stream: where to write (default ``sys.stdout``).
        bars: tqdm bars (True) or plain lines (False); default: bars if ``stream`` is a terminal.
        every: training iterations between plain lines.
    """

    def __init__(self, tasks: Sequence[str], stream: Optional[IO[str]] = None,
                 bars: Optional[bool] = None, every: Optional[int] = None) -> None:
        self.tasks = list(tasks)
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, 'isatty', None)
        self.bars = bool(isatty and isatty()) if bars is None else bars
        self.every = every
        self._last: dict[str, tuple] = {}
        self._bars: dict = {}
        if self.bars:
            from tqdm import tqdm
            width = max(len(t) for t in self.tasks) + len(' waiting')
            for i, task in enumerate(self.tasks):
                self._bars[task] = tqdm(total=None, desc=f'{task} waiting'.ljust(width),
                                        position=i, file=self.stream, leave=True,
                                        dynamic_ncols=True, bar_format='{desc}')
            self._width = width

    def update(self, task: str, status: Optional[Mapping]) -> None:
        """Show ``status`` (from :func:`read_status`; None: nothing new) for ``task``."""
        if status is None:
            return
        if self.bars:
            self._update_bar(task, status)
        else:
            self._update_line(task, status)

    def _update_line(self, task: str, status: Mapping) -> None:
        phase, done, total = status['phase'], status.get('iter') or 0, status.get('total')
        if phase in ('train', 'test') and total:
            # training: every `every` iterations (a tenth by default); testing: start and end
            every = (self.every or max(1, total // 10)) if phase == 'train' else total
            key: tuple = (phase, done // every, done >= total)
        else:
            key = (phase, status.get('message'))
        if key != self._last.get(task):
            self._last[task] = key
            print(format_status(task, status), file=self.stream, flush=True)

    def _update_bar(self, task: str, status: Mapping) -> None:
        bar = self._bars[task]
        phase, done, total = status['phase'], status.get('iter') or 0, status.get('total')
        counting = phase in ('train', 'test') and bool(total)
        label = f'{task} {phase}'.ljust(self._width)
        if self._last.get(task) != (phase,):
            self._last[task] = (phase,)
            bar.set_postfix_str('', refresh=False)
            # a phase without iterations shows its message (and, while it runs, its time)
            bar.bar_format = None if counting else (
                '{desc}' if phase in ('done', 'failed') else '{desc} [{elapsed}]')
            bar.set_description_str(label, refresh=False)
            bar.reset(total=total if counting else None)
            bar.n = bar.last_print_n = done if counting else 0  # a resumed run starts past zero
        if counting:
            bar.update(max(0, done - bar.n))
            if phase == 'train' and status.get('loss') is not None:
                bar.set_postfix_str(f'loss {status["loss"]:.3f}', refresh=False)
        elif status.get('message'):
            bar.set_description_str(f'{label}: {status["message"]}', refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Finish the bars (the terminal's cursor goes below them)."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def follow(futures: Mapping[str, Future], status_files: Mapping[str, str],
           display: ProgressDisplay, interval: float = 1.0) -> None:
    """Until every future is done, show the task's status files on ``display`` (every
    ``interval`` seconds, and once more at the end)."""
    pending = set(futures.values())
    while True:
        for task, path in status_files.items():
            display.update(task, read_status(path))
        if not pending:
            return
        _, pending = wait(pending, timeout=interval)


__all__ = ['PHASES', 'STATUS_FILE', 'ProgressDisplay', 'ProgressFileHook', 'follow',
           'format_duration', 'format_status', 'read_status', 'write_status']
