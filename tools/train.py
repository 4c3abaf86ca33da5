"""Train a detector or segmentor from an mmdet / mmseg config (mmengine Runner).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp [bf16|fp16]]
                                 [--compile [BACKEND]] [--auto-scale-lr]
                                 [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

Multi-GPU / multi-node: tools/dist_train.sh (torchrun) or tools/slurm_train.sh.
"""
from __future__ import annotations

import argparse

from _cli import run_main, set_local_rank
from mmengine.config import DictAction

from mmoverlock.apis import (
    build_runner,
    configure_run,
    configure_training,
    load_config,
    prepare_config,
    setup_distributed,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config',
                        help='config file, e.g. configs/detection/maskrcnn_overlock_t_1x.py')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='resume from CKPT, or (without a value) from the latest checkpoint '
                        'in the work dir')
    parser.add_argument('--amp', nargs='?', const='auto', default=None, metavar='DTYPE',
                        help='mixed precision: bf16 or fp16 (fp16 with loss scaling, GPU only); '
                        'without a value bf16 where the device has it, else fp16')
    parser.add_argument('--compile', nargs='?', const='inductor', default=None,
                        metavar='BACKEND', help='torch.compile the training step (default '
                        'backend inductor; aot_eager compiles nothing and starts fast)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale lr by (GPUs x batch) / auto_scale_lr.base_batch_size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config entries, e.g. train_dataloader.batch_size=4 '
                        'model.backbone.init_cfg=None')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher (pytorch: torchrun, slurm: srun)')
    parser.add_argument('--skip-checks', action='store_true',
                        help="skip the preflight checks of the config (neck / head widths, class "
                        'counts, data and checkpoint paths), e.g. when one rejects a valid config')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_local_rank(args.local_rank)
    cfg = load_config(args.config, args.cfg_options)
    configure_run(cfg, args.config, args.work_dir, args.launcher)
    configure_training(cfg, args.resume, args.amp, args.auto_scale_lr, args.compile)
    prepare_config(cfg, 'train', skip_checks=args.skip_checks)
    setup_distributed(cfg)
    build_runner(cfg).train()


if __name__ == '__main__':
    run_main(main)
