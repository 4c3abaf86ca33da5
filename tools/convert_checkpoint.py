"""Convert the authors' COCO (mmdet 2.x) / ADE20K (mmseg 0.x) checkpoint to mmengine's layout.

    python tools/convert_checkpoint.py SRC DST [--config CONFIG]

With --config the result is checked against the model the config builds: every tensor must be
there with its shape, none may be left over. tools/test.py converts on load, so this is only
needed for load_from / fine-tuning or to keep a checked file.
"""
from __future__ import annotations

import argparse

from _cli import run_main

from mmoverlock.apis import (
    build_model,
    check_checkpoint_path,
    convert_file,
    load_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help="the authors' checkpoint (or any mmdet / mmseg checkpoint)")
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--config', help='config whose model the checkpoint must fit exactly')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_checkpoint_path(args.src, 'checkpoint')
    model = None
    if args.config:
        cfg = load_config(args.config)
        cfg.model.backbone.init_cfg = None
        model = build_model(cfg)
    checkpoint = convert_file(args.src, args.dst, model)
    meta = checkpoint['meta']
    print(f'wrote {args.dst}: {len(checkpoint["state_dict"])} tensors'
          + (f', converted from {meta["converted_from"]}' if 'converted_from' in meta else '')
          + (f', {len(meta["dataset_meta"]["classes"])} classes' if 'dataset_meta' in meta
             and 'classes' in meta['dataset_meta'] else '')
          + (f'; matches {args.config} exactly' if model is not None else ''))
    return checkpoint


if __name__ == '__main__':
    run_main(main)
