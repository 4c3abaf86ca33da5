"""Images per second of a whole detector or segmentor built from a config (no Runner, no data).

Examples::

    python tools/analysis/benchmark.py configs/detection/maskrcnn_overlock_t_1x.py
    python tools/analysis/benchmark.py configs/segmentation/upernet_overlock_t_160k_ade20k.py \\
        --shape 512 512 --deploy --fuse-conv-bn --iters 20
    python tools/analysis/benchmark.py CONFIG --device cuda --amp --batch-size 4
    python tools/analysis/benchmark.py CONFIG --mode tensor --threads 2 --json out.json

The model is built from the config (``custom_imports`` included) with random weights unless
``--checkpoint`` is given (the configs' pretrained ``init_cfg`` is not applied), put in eval mode,
and run on one fixed batch of random images of ``--shape``: ``--warmup`` untimed iterations, then
``--iters`` timed ones. ``--mode predict`` (default) times ``model.test_step``: data preprocessing,
the network and the post-processing (NMS, mask pasting, resizing), i.e. a test run's cost per
image after loading; ``--mode tensor`` the network alone.

``--deploy`` re-parameterises the backbone (OverLoCK's dilated large-kernel branches become one
conv each), ``--fuse-conv-bn`` folds BatchNorms into the preceding convs (mmcv's rule); the
converted model's features are compared with the original's and the difference is reported.

With random weights a detector keeps few boxes (scores below ``score_thr``), so post-processing and
the mask head cost less than with trained weights; for a representative load use ``--checkpoint``
or e.g. ``--cfg-options model.test_cfg.rcnn.score_thr=0.0`` (every image then yields
``max_per_img`` detections).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for _cli

import torch  # noqa: E402
from _cli import run_main  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmoverlock.apis.analysis import BENCHMARK_MODES, benchmark_config  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='an mmdet / mmseg config')
    parser.add_argument('--checkpoint', help='weights to load (default: random)')
    parser.add_argument('--shape', type=int, nargs='+', default=[800, 1216],
                        help='image H [W] (default 800 1216)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=3, help='untimed iterations (default 3)')
    parser.add_argument('--iters', type=int, default=10, help='timed iterations (default 10)')
    parser.add_argument('--mode', choices=BENCHMARK_MODES, default='predict')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='float16 autocast (CUDA only)')
    parser.add_argument('--deploy', action='store_true',
                        help='re-parameterise the backbone (OverLoCK) before timing')
    parser.add_argument('--fuse-conv-bn', action='store_true',
                        help='fold BatchNorms into the preceding convs before timing')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads on CPU (default: torch\'s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config settings')
    parser.add_argument('--json', help='also write the result to this JSON file')
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2):
        parser.error('--shape takes H or H W')
    return args


def format_result(result: dict[str, Any]) -> str:
    """Markdown table of one benchmark result."""
    timing = result['timing']
    memory = ', '.join(f'{k} {v:.0f}' for k, v in result['memory'].items())
    form = '+'.join(n for n, on in (('deploy', result['deploy']), ('fuse-conv-bn', result['fuse']))
                    if on) or 'as built'
    lines = [
        '| config | input | batch | mode | device | form | mean (s) | median (s) | std (s) '
        '| img/s (median) | img/s (mean) | memory (MiB) |',
        '|' + '---|' * 12,
        f'| {Path(str(result["config"])).stem} | {result["shape"][0]}x{result["shape"][1]} '
        f'| {timing.batch_size} | {result["mode"]}{" amp" if result["amp"] else ""} '
        f'| {result["device"]} ({result["threads"]} threads) | {form} | {timing.mean:.4f} '
        f'| {timing.median:.4f} | {timing.std:.4f} | {timing.fps:.3f} | {timing.fps_mean:.3f} '
        f'| {memory} |',
    ]
    conversion = result.get('conversion')
    if conversion:
        lines.append(f'converted: re-parameterised {conversion["reparameterized"] or "nothing"}, '
                     f'fused {conversion["fused"]}; features differ by at most '
                     f'{conversion["max_abs_diff"]:.3g} ({conversion["rel_diff"]:.2g} relative)')
    lines.append(f'{timing.warmup} warm-up + {len(timing.times)} timed iterations; params '
                 f'{result["params"] / 1e6:.2f} M')
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.shape[0], args.shape[-1])
    result = benchmark_config(args.config, shape=shape, batch_size=args.batch_size,
                              iters=args.iters, warmup=args.warmup, mode=args.mode,
                              deploy=args.deploy, fuse=args.fuse_conv_bn, amp=args.amp,
                              device=args.device, checkpoint=args.checkpoint,
                              cfg_options=args.cfg_options)
    print(format_result(result))
    if args.json:
        record = dict(result, timing=result['timing'].as_dict())
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    return result


if __name__ == '__main__':
    run_main(main)
