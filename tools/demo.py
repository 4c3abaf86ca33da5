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
import time

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning intra-op
# threads made a training step up to 4x slower (measured on this project's 2-core machine).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from _cli import run_main
from mmengine.config import DictAction

from mmoverlock.apis import (
    UsageError,
    ensure_demo_data_for,
    load_config,
    run_demos,
    summarize_metrics,
)
from mmoverlock.datasets import ensure_demo_data

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
    start = time.time()
    results = run_demos({t: CONFIGS[t] for t in tasks}, args.work_dir, options, jobs=args.jobs)
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
