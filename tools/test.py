"""Evaluate a checkpoint (ours, or the authors' mmdet 2.x / mmseg 0.x ones) on a config's test set.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR]
                                           [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

The checkpoint is converted on load (see mmoverlock/apis/convert.py) and must fit the model
exactly: a missing, unexpected or mis-shaped tensor is an error, not a warning.
"""
from __future__ import annotations

import argparse

from _cli import run_main, set_local_rank
from mmengine.config import DictAction

from mmoverlock.apis import (
    build_runner,
    configure_run,
    library_of,
    load_checkpoint_strict,
    load_config,
    prepare_config,
    setup_distributed,
    unwrap,
)
from mmoverlock.utils.safe_checkpoint import check_checkpoint_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where logs and metrics go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--show-dir', help='draw predictions into this folder (under the work '
                        'dir for mmdet, the visualizer save dir for mmseg)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config entries')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none')
    parser.add_argument('--skip-checks', action='store_true',
                        help="skip the preflight checks of the config (neck / head widths, class "
                        'counts, data paths), e.g. when one rejects a valid config')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def enable_drawing(cfg, show_dir: str) -> None:
    """Turn on the library's visualization hook so it draws every test image into show_dir."""
    hook = cfg.default_hooks.visualization
    hook.draw = True
    if library_of(cfg) == 'mmdet':
        hook.test_out_dir = show_dir
    else:
        hook.interval = 1
        cfg.visualizer.save_dir = show_dir


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_local_rank(args.local_rank)
    cfg = load_config(args.config, args.cfg_options)
    configure_run(cfg, args.config, args.work_dir, args.launcher)
    prepare_config(cfg, 'test', checkpoint=args.checkpoint, skip_checks=args.skip_checks)
    if '://' not in args.checkpoint:  # truncated / damaged: say so before building the model
        check_checkpoint_file(args.checkpoint)
    cfg.load_from, cfg.resume = None, False  # loaded below, strictly
    cfg.model.backbone.init_cfg = None
    if args.show_dir:
        enable_drawing(cfg, args.show_dir)
    setup_distributed(cfg)
    runner = build_runner(cfg)
    load_checkpoint_strict(unwrap(runner.model), args.checkpoint)
    return runner.test()


if __name__ == '__main__':
    run_main(main)
