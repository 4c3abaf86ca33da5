"""Effective receptive field (ERF) of every stage of a registered backbone, as a PNG of heat maps.

Examples::

    python tools/visualize_erf.py --backbone OverLoCK --arch t --out erf_overlock_t.png
    python tools/visualize_erf.py --backbone GLNet --arch 4g --checkpoint glnet_4g.pth \\
        --images data/ade/images/validation --num-images 50 --size 1024
    python tools/visualize_erf.py --backbone SwinTransformer --stages 2 3

For each image the gradient of each stage's centre response with respect to the input is taken
(definition in :mod:`mmoverlock.utils.erf`); its magnitude, averaged over the images, is drawn on a
log scale (``log10(contribution / max)``, ``--decades`` below the peak shown), one panel per stage.
The logger prints the high-contribution area ratios per stage: the fraction of the input covered
by the smallest centred square holding 20 / 50 / 99 % of the total contribution (``square``,
RepLKNet's measure) and the smallest fraction of pixels, largest contributions first, holding it
(``pixels``). Larger means a wider ERF.

Without ``--images`` the inputs are standard-normal noise (the statistics of normalised images);
with images (files or folders), each is resized (shorter side) and centre-cropped to ``--size``
and ImageNet-normalised. With an ImageNet (classifier) checkpoint of OverLoCK add
``--backbone-args with_out_norms=False``: the dense-prediction output norms are not in it and
would stay random. The published ERF figures (RepLKNet, OverLoCK) use 50 ImageNet validation
images at 1024 x 1024 and trained weights; random weights show the architecture's prior only.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os.path as osp
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from mmengine.config import DictAction
from mmengine.logging import MMLogger
from torch import Tensor, nn

try:
    import mmoverlock  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmoverlock.apis.analysis import build_backbone
from mmoverlock.utils.erf import (
    AREA_METHODS,
    DEFAULT_THRESHOLDS,
    area_ratios,
    erf_maps,
    log_scale,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backbone', default='OverLoCK', help='registry name of the backbone')
    parser.add_argument('--arch', default=None, help='arch name or dict literal')
    parser.add_argument('--backbone-args', nargs='+', action=DictAction, default={},
                        help='extra backbone arguments, e.g. overview_fusion=False')
    parser.add_argument('--checkpoint', help='backbone or classifier weights (default: random)')
    parser.add_argument('--prefix', default=None,
                        help="keep only checkpoint keys under this prefix, e.g. 'backbone.'")
    parser.add_argument('--images', nargs='*', default=None,
                        help='image files or folders (default: random inputs)')
    parser.add_argument('--num-images', type=int, default=8,
                        help='images to average over (default 8)')
    parser.add_argument('--size', type=int, nargs='+', default=[512],
                        help='input size H [W] (default 512)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--stages', type=int, nargs='+', default=None,
                        help='indices of the backbone outputs (default: all)')
    parser.add_argument('--thresholds', type=float, nargs='+', default=list(DEFAULT_THRESHOLDS))
    parser.add_argument('--decades', type=float, default=3.0,
                        help='orders of magnitude below the peak shown (default 3)')
    parser.add_argument('--out', default='erf.png', help='output PNG (default erf.png)')
    parser.add_argument('--save-maps', default=None, help='also save the raw maps (.pt)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch threads on CPU')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error('--size takes H or H W')
    return args


def _parse_arch(text: Optional[str]) -> Union[str, dict, None]:
    if text is None:
        return None
    text = text.strip()
    return ast.literal_eval(text) if text.startswith('{') else text


def load_weights(model: nn.Module, checkpoint: str, prefix: Optional[str] = None) -> None:
    """Load ``checkpoint`` through the backbone's own loader when it has one (OverLoCK, GLNet:
    classifier heads ignored, arch mismatches explained), else mmengine's."""
    if hasattr(model, 'load_pretrained'):
        model.load_pretrained(checkpoint, prefix=prefix)
        return
    from mmengine.runner import load_checkpoint
    revise = [(rf'^{prefix.rstrip(".")}\.', '')] if prefix else [(r'^module\.', '')]
    load_checkpoint(model, checkpoint, map_location='cpu', revise_keys=revise, logger='current')


def image_paths(sources: Sequence[str]) -> list[str]:
    """Image files named directly or found (sorted) in the given folders."""
    paths: list[str] = []
    for source in sources:
        if osp.isdir(source):
            paths += sorted(p for p in glob.glob(osp.join(source, '**', '*'), recursive=True)
                            if p.lower().endswith(IMAGE_SUFFIXES))
        elif osp.isfile(source):
            paths.append(source)
        else:
            raise FileNotFoundError(f'no image or folder {source!r}')
    if not paths:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) under {list(sources)}')
    return paths


def load_image(path: str, size: tuple[int, int]) -> Tensor:
    """ImageNet-normalised (3, H, W) tensor: resized so it covers ``size``, centre-cropped."""
    import cv2
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f'cannot read image {path!r}')
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    scale = max(size[0] / image.shape[0], size[1] / image.shape[1])
    resized = cv2.resize(image, (max(size[1], round(image.shape[1] * scale)),
                                 max(size[0], round(image.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top = (resized.shape[0] - size[0]) // 2
    left = (resized.shape[1] - size[1]) // 2
    crop = resized[top:top + size[0], left:left + size[1]]
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def image_batches(paths: Optional[Sequence[str]], num_images: int, size: tuple[int, int],
                  batch_size: int, device: Union[str, torch.device],
                  seed: int = 0) -> Iterator[Tensor]:
    """Batches of ``num_images`` inputs: the given images, or standard-normal noise."""
    generator = torch.Generator().manual_seed(seed)
    files = image_paths(paths)[:num_images] if paths else None
    total = len(files) if files else num_images
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        if files:
            batch = torch.stack([load_image(p, size) for p in files[start:start + count]])
        else:
            batch = torch.randn(count, 3, *size, generator=generator)
        yield batch.to(device)


def draw_erf(maps: Tensor, ratios: dict[str, list[dict[float, float]]], out: str,
             labels: Sequence[str], title: str, decades: float = 3.0) -> None:
    """One log-scaled heat map per stage, with the 99 % (or last threshold) area ratios."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    count = maps.shape[0]
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count + 0.8, 3.6), squeeze=False)
    image = None
    for i, ax in enumerate(axes[0]):
        image = ax.imshow(log_scale(maps[i], decades).float().cpu().numpy(), cmap='RdYlGn',
                          vmin=-decades, vmax=0.0, interpolation='nearest')
        last = max(ratios['square'][i])
        ax.set_title(f'{labels[i]}\n{last:.0%} area: square {ratios["square"][i][last]:.3f}, '
                     f'pixels {ratios["pixels"][i][last]:.3f}', fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.02, pad=0.02,
                 label='log10(contribution / max)')
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run_erf(backbone: nn.Module, batches: Sequence[Tensor] | Iterator[Tensor],
            stages: Optional[Sequence[int]] = None,
            thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """ERF maps of ``backbone`` (eval mode) and their area ratios by method.

    Returns:
        ``dict(maps=(S, H, W) tensor, stages=[indices], shapes=[(h, w) of each stage output],
        ratios={'square': [...], 'pixels': [...]}, num_images=N)``.
    """
    backbone.eval()
    batches = list(batches)
    with torch.no_grad():
        outs = backbone(batches[0][:1])
    outs = [outs] if isinstance(outs, Tensor) else [o for o in outs if o.dim() == 4]
    chosen = list(range(len(outs))) if stages is None else list(stages)
    maps = erf_maps(backbone, batches, chosen)
    return dict(maps=maps, stages=chosen, shapes=[tuple(outs[s].shape[-2:]) for s in chosen],
                ratios={m: area_ratios(maps, thresholds, m) for m in AREA_METHODS},
                num_images=sum(b.shape[0] for b in batches))


def format_ratios(result: dict[str, Any], thresholds: Sequence[float]) -> str:
    """Text table of the area ratios per stage."""
    heads = [f'{m}@{t:g}' for m in AREA_METHODS for t in thresholds]
    lines = ['stage  output     ' + '  '.join(f'{h:>12}' for h in heads)]
    for i, (stage, shape) in enumerate(zip(result['stages'], result['shapes'])):
        values = [result['ratios'][m][i][t] for m in AREA_METHODS for t in thresholds]
        lines.append(f'{stage:<6} {shape[0]:>4}x{shape[1]:<5} '
                     + '  '.join(f'{v:>12.4f}' for v in values))
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logger = MMLogger.get_current_instance()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = (args.size[0], args.size[-1])
    arch = _parse_arch(args.arch)
    backbone = build_backbone(args.backbone, arch, **args.backbone_args)
    if args.checkpoint:
        load_weights(backbone, args.checkpoint, args.prefix)
    backbone.to(args.device)
    backbone.eval()
    batches = image_batches(args.images, args.num_images, size, args.batch_size, args.device,
                            args.seed)
    result = run_erf(backbone, batches, args.stages, args.thresholds)
    name = args.backbone + (f' {arch}' if isinstance(arch, str) else
                            ' (custom arch)' if arch else '')
    weights = osp.basename(args.checkpoint) if args.checkpoint else 'random weights'
    source = 'image' if args.images else 'noise input'
    source += 's' if result['num_images'] > 1 else ''
    title = (f'ERF of {name} ({weights}), {result["num_images"]} {source} of '
             f'{size[0]}x{size[1]}')
    labels = [f'output {s} ({h}x{w})' for s, (h, w) in zip(result['stages'], result['shapes'])]
    draw_erf(result['maps'], result['ratios'], args.out, labels, title, args.decades)
    if args.save_maps:
        torch.save(dict(maps=result['maps'], stages=result['stages'], ratios=result['ratios']),
                   args.save_maps)
    logger.info(f'{title}\nhigh-contribution area ratio (fraction of the input holding the given '
                'share of the total contribution; square: smallest centred square, pixels: '
                'largest contributions first)\n' + format_ratios(result, args.thresholds))
    logger.info(f'wrote {args.out}')
    result['out'] = args.out
    return result


if __name__ == '__main__':
    main()
