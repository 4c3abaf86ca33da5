"""Train and evaluate OverLoCK-XT on built-in data, on CPU, without downloads.

    python tools/demo.py [--task det|seg|both] [--work-dir work_dirs/demo] [--iters N]
                         [--jobs N] [--data-only] [--cfg-options k=v ...]

For each task: generate the shapes data set if it is missing (data/demo/), train the demo config
from scratch (Mask R-CNN: configs/detection/maskrcnn_overlock_xt_demo.py; UperNet:
configs/segmentation/upernet_overlock_xt_demo.py), evaluate it (COCO box / mask AP; mIoU) and
write ground truth next to predictions to <work dir>/<task>/predictions.png. The two tasks train
side by side, one process and one thread each (on this project's 2-core machine a second
intra-op thread made a training step slower, not faster).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning intra-op
# threads made a training step up to 4x slower (measured on this project's 2-core machine).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from _cli import run_main
from mmengine.config import DictAction

from mmoverlock.apis import load_config, run_demo, summarize_metrics
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
                        'not shortened)')
    parser.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                        help='tasks trained at the same time (default: 2 if there are 2 cores)')
    parser.add_argument('--data-only', action='store_true', help='only generate the data sets')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override entries of the demo configs')
    return parser.parse_args(argv)


def run_task(task: str, work_dir: str, options: dict, threads: int, log_file: str = '') -> dict:
    """Train, evaluate and draw one task (in this process, or in a worker writing ``log_file``)."""
    import torch
    if log_file:
        os.makedirs(osp.dirname(log_file), exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    torch.set_num_threads(threads)
    keep_freed_memory()  # a spawned worker does not inherit the parent's malloc settings
    return run_demo(CONFIGS[task], osp.join(work_dir, task), options)


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
        ensure_demo_data(task)
    jobs = max(1, min(args.jobs, len(tasks)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    start, results = time.time(), {}
    if jobs == 1:
        for task in tasks:
            results[task] = run_task(task, args.work_dir, options, threads)
    else:
        logs = {t: osp.join(args.work_dir, t, 'console.log') for t in tasks}
        print(f'training {" and ".join(tasks)} side by side ({threads} thread(s) each); '
              f'follow {" and ".join(logs.values())}', flush=True)
        with ProcessPoolExecutor(jobs, mp_context=get_context('spawn')) as pool:
            futures = {t: pool.submit(run_task, t, args.work_dir, options, threads, logs[t])
                       for t in tasks}
            results = {t: f.result() for t, f in futures.items()}
    print('\n== demo summary ==')
    for task, result in results.items():
        cfg = load_config(CONFIGS[task])
        print(f'{task}: {summarize_metrics(cfg, result["metrics"])} '
              f'({result["seconds"] / 60:.1f} min)')
        print(f'     picture: {result["picture"]}')
        print(f'     checkpoint: {result["checkpoint"]}')
    print(f'total: {(time.time() - start) / 60:.1f} min')
    return results


if __name__ == '__main__':
    run_main(main)
