"""Train and evaluate OverLoCK-XT on built-in data, on CPU, without downloads.

    python tools/demo.py [--task det|seg|both] [--work-dir work_dirs/demo] [--iters N]
                         [--jobs N] [--data-only] [--cfg-options k=v ...]

For each task: generate the shapes data set if it is missing (data/demo/), train the demo config
from scratch (Mask R-CNN: configs/detection/maskrcnn_overlock_xt_demo.py; UperNet:
configs/segmentation/upernet_overlock_xt_demo.py), evaluate it (COCO box / mask AP; mIoU), write
ground truth next to predictions to <work dir>/<task>/predictions.png, and run the saved
checkpoint through mmdet's / mmseg's inferencer on the photograph demo/images/coffee.jpg
(<work dir>/<task>/photo/coffee.png). The two tasks train side by side, one process and one
thread each (on this project's 2-core machine a second intra-op thread made a training step
slower, not faster); each process writes its output to <work dir>/<task>/console.log while the
terminal shows one progress bar per task (iteration / total, loss, ETA), or a plain line every
tenth of the run when the output is not a terminal.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning intra-op
# threads made a training step up to 4x slower (measured on this project's 2-core machine).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from _cli import run_main
from mmengine.config import DictAction

from mmoverlock.apis import (
    STATUS_FILE,
    ProgressDisplay,
    UsageError,
    ensure_demo_data_for,
    follow,
    load_config,
    run_demo,
    summarize_metrics,
)
from mmoverlock.datasets import ensure_demo_data
from mmoverlock.utils.cpu_allocator import keep_freed_memory

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    'det': osp.join(REPO, 'configs', 'detection', 'maskrcnn_overlock_xt_demo.py'),
    'seg': osp.join(REPO, 'configs', 'segmentation', 'upernet_overlock_xt_demo.py'),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--task', choices=['det', 'seg', 'both'], default='both')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='outputs go to <work dir>/det and <work dir>/seg')
    parser.add_argument('--iters', type=int,
                        help="training iterations (default: the config's; the lr schedule is "
                        'not shortened); --iters 2 checks the whole path without the long training')
    parser.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                        help='tasks trained at the same time (default: 2 if there are 2 cores)')
    parser.add_argument('--data-only', action='store_true', help='only generate the data sets')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override entries of the demo configs')
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        raise UsageError(f'--iters must be at least 1, got {args.iters}')
    return args


def run_task(config: str, work_dir: str, options: dict, threads: int, log_file: str,
             progress_file: str) -> dict:
    """Train, evaluate and draw one task in a worker process whose output goes to ``log_file``."""
    import torch
    os.makedirs(osp.dirname(log_file), exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)
    keep_freed_memory()  # a spawned worker does not inherit the parent's malloc settings
    return run_demo(config, work_dir, options, progress_file=progress_file)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tasks = ['det', 'seg'] if args.task == 'both' else [args.task]
    if args.data_only:
        for task in tasks:
            print(f'{task}: data in {ensure_demo_data(task)}')
        return {}
    options = dict(args.cfg_options)
    if args.iters:  # the lr schedule stays the config's (shorter runs stop before it ends)
        options.update({'train_cfg.max_iters': args.iters,
                        'default_hooks.checkpoint.interval': args.iters})
    for task in tasks:  # before any worker starts, so that two never write the same files
        ensure_demo_data_for(load_config(CONFIGS[task], options))
    jobs = max(1, min(args.jobs, len(tasks)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    logs = {t: osp.join(args.work_dir, t, 'console.log') for t in tasks}
    status_files = {t: osp.join(args.work_dir, t, STATUS_FILE) for t in tasks}
    for path in status_files.values():  # a previous run's status is not this run's
        if osp.exists(path):
            os.remove(path)
    how = 'side by side' if jobs > 1 else 'one after the other'
    print(f'training {" and ".join(tasks)} {how} ({threads} thread(s) each); their output goes '
          f'to {" and ".join(logs.values())}', flush=True)
    start, results = time.time(), {}
    display = ProgressDisplay(tasks)
    with ProcessPoolExecutor(jobs, mp_context=get_context('spawn')) as pool:
        futures = {t: pool.submit(run_task, CONFIGS[t], args.work_dir, options, threads, logs[t],
                                  status_files[t]) for t in tasks}
        try:
            follow(futures, status_files, display)
        finally:
            display.close()
    for task, future in futures.items():
        if future.exception() is not None:
            print(f'{task} failed; its output is in {logs[task]}', file=sys.stderr)
            raise future.exception()
        results[task] = future.result()
    print('\n== demo summary ==')
    for task, result in results.items():
        cfg = load_config(CONFIGS[task])
        print(f'{task}: {summarize_metrics(cfg, result["metrics"])} '
              f'({result["seconds"] / 60:.1f} min)')
        print(f'     picture: {result["picture"]}')
        print(f'     photo: {result["photo"]}')
        print(f'     checkpoint: {result["checkpoint"]}')
    print(f'total: {(time.time() - start) / 60:.1f} min')
    return results


if __name__ == '__main__':
    run_main(main)
