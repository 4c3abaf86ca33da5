"""Train and evaluate OverLoCK-XT on built-in data, on CPU, without downloads.

    python tools/demo.py [--task det|seg|both] [--work-dir work_dirs/demo] [--iters N]
                         [--data-only] [--cfg-options k=v ...]

For each task: generate the shapes data set if it is missing (data/demo/), train the demo config
(Mask R-CNN: configs/detection/maskrcnn_overlock_xt_demo.py; UperNet:
configs/segmentation/upernet_overlock_xt_demo.py), evaluate it (COCO box/mask AP; mIoU) and write
ground truth next to predictions to <work dir>/<task>/predictions.png.
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

from mmoverlock.apis import load_config, run_demo, summarize_metrics
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
                        'not shortened)')
    parser.add_argument('--data-only', action='store_true', help='only generate the data sets')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override entries of the demo configs')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tasks = ['det', 'seg'] if args.task == 'both' else [args.task]
    if args.data_only:
        for task in tasks:
            print(f'{task}: data in {ensure_demo_data(task)}')
        return {}
    results, start = {}, time.time()
    for task in tasks:
        options = dict(args.cfg_options)
        if args.iters:  # the lr schedule stays the config's (shorter runs stop before it ends)
            options.update({'train_cfg.max_iters': args.iters,
                            'default_hooks.checkpoint.interval': args.iters})
        results[task] = run_demo(CONFIGS[task], osp.join(args.work_dir, task), options)
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
