"""Draw a trained detector's or segmentor's predictions on image files.

    python tools/infer.py CONFIG CHECKPOINT IMAGE [IMAGE ...] [--out-dir DIR] [--device cpu]
                          [--score-thr 0.3] [--save-preds] [--cfg-options k=v ...]

CONFIG decides the library: an mmdet config runs mmdet's DetInferencer, an mmseg config mmseg's
MMSegInferencer (see mmoverlock/apis/inference.py). IMAGE may also be a folder (its images in name
order). For each image, DIR/<image name>.png is the drawn prediction at the image's size; with
--save-preds, DIR/preds/ also gets the raw prediction (<name>.json: mmdet's labels, scores, boxes
and RLE masks; <name>.png: the class index of every pixel). The checkpoint (tools/train.py's, or
the authors' mmdet 2.x / mmseg 0.x files) must fit the config's model exactly.
"""
from __future__ import annotations

import argparse
import os.path as osp

from _cli import run_main
from mmengine.config import DictAction

from mmoverlock.apis import (
    build_inferencer,
    check_score_thr,
    default_work_dir,
    expand_images,
    infer_images,
    library_of,
    load_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config',
                        help='config file, e.g. configs/detection/maskrcnn_overlock_xt_demo.py')
    parser.add_argument('checkpoint',
                        help='checkpoint file, e.g. work_dirs/<config name>/iter_300.pth')
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files or folders')
    parser.add_argument('--out-dir', help='where the drawn predictions go '
                        '(default: work_dirs/<config name>/infer)')
    parser.add_argument('--device', help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--score-thr', type=float,
                        help='detection: draw boxes and masks from this score up (default 0.3)')
    parser.add_argument('--save-preds', action='store_true',
                        help='also write the raw predictions to <out dir>/preds/')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config entries')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    check_score_thr(library_of(cfg), args.score_thr)
    images = expand_images(args.images)  # before the model is built: a wrong path fails at once
    out_dir = args.out_dir or osp.join(default_work_dir(args.config), 'infer')
    inferencer = build_inferencer(cfg, args.checkpoint, device=args.device)
    results = infer_images(inferencer, images, out_dir, score_thr=args.score_thr,
                           save_predictions=args.save_preds)
    saved = ' and raw predictions' if args.save_preds else ''
    print(f'{len(results)} drawn prediction(s){saved} written to {out_dir}')
    return results


if __name__ == '__main__':
    run_main(main)
