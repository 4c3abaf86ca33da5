"""Show how GLNet's GLMix blocks softly group pixels into semantic slots.

For each chosen GLMix block the figure shows the image, the argmax slot of every pixel (one colour
per slot, over the image), and heat maps of a few individual slots: the soft assignment
``softmax over slots`` of the block's pixel-slot logits, i.e. the weights with which the slots are
dispatched back to each pixel. The logits are recomputed from each block's input, captured by a
forward pre-hook, so the model's outputs are unchanged.

Examples::

    python tools/visualize_slots.py --arch 4g --checkpoint glnet_4g.pth --image cat.jpg
    python tools/visualize_slots.py --arch stl --blocks 1.1 2.5 --out slots.png   # generated image
"""
from __future__ import annotations

import argparse
import logging
import os.path as osp
import sys
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger, print_log
from torch import Tensor, nn

try:
    import mmoverlock  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmoverlock.models.backbones.glnet import GLNet
from mmoverlock.models.layers.glnet_blocks import GLMixBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def glmix_blocks(model: GLNet) -> list[str]:
    """Names ``'stage.block'`` of every GLMix block of ``model``, in forward order."""
    return [f'{i}.{j}' for i, stage in enumerate(model.stages)
            for j, block in enumerate(stage.blocks) if isinstance(block, GLMixBlock)]


def get_block(model: GLNet, name: str) -> GLMixBlock:
    """The GLMix block called ``name`` (``'stage.block'``); a clear error for anything else."""
    try:
        stage, index = (int(part) for part in name.split('.'))
        block = model.stages[stage].blocks[index]
    except (ValueError, IndexError) as err:
        raise ValueError(f'no block {name!r}: use stage.block, e.g. {glmix_blocks(model)[:3]}'
                         ) from err
    if not isinstance(block, GLMixBlock):
        raise ValueError(f'block {name!r} is a {type(block).__name__}, not a GLMix block; GLMix '
                         f'blocks of this model: {glmix_blocks(model)}')
    return block


@torch.no_grad()
def collect_assignments(model: GLNet, images: Tensor,
                        names: Sequence[str]) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """Run ``model`` on ``images`` and return each named block's pixel-slot logits.

    Args:
        model: A GLNet backbone (in eval mode for meaningful results).
        images: Normalised images (B, 3, H, W).
        names: GLMix blocks as ``'stage.block'``.

    Returns:
        ``({name: logits (B, S, h, w)}, model outputs)``; the outputs are those of a plain call.
    """
    logits: dict[str, Tensor] = {}
    handles = []
    for name in names:
        block = get_block(model, name)

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            logits[name] = module.assignment_logits(args[0]).float()

        handles.append(block.register_forward_pre_hook(hook))
    try:
        outputs = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def load_image(path: Optional[str], size: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 image: ``path`` resized so its shorter side is ``size``, or a generated scene."""
    import cv2
    if path is None:
        from mmoverlock.datasets.demo_data import render_scene
        return render_scene(np.random.default_rng(seed), size=size, max_objects=4)[0]
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f'cannot read image {path!r}')
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    scale = size / min(image.shape[:2])
    new_size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)


def to_tensor(image: np.ndarray) -> Tensor:
    """ImageNet-normalised (1, 3, H, W) float tensor of an RGB uint8 image."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def slot_palette(num_slots: int) -> np.ndarray:
    """Distinct RGB colours in [0, 1], one per slot (golden-ratio hues)."""
    import colorsys
    return np.array([colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75 if k % 2 else 0.95,
                                         0.95 if k % 3 else 0.75) for k in range(num_slots)])


def draw(image: np.ndarray, assignments: dict[str, Tensor], num_heatmaps: int, out: str,
         title: str) -> None:
    """Write the figure: per block, the image, the argmax slots and ``num_heatmaps`` slots."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    height, width = image.shape[:2]
    cols = 2 + num_heatmaps
    fig, axes = plt.subplots(len(assignments), cols, figsize=(2.6 * cols, 2.6 * len(assignments)),
                             squeeze=False)
    for row, (name, logits) in enumerate(assignments.items()):
        probs = logits[0].softmax(dim=0)  # (S, h, w): each pixel's distribution over slots
        probs = F.interpolate(probs[None], size=(height, width), mode='bilinear',
                              align_corners=False)[0]
        hard = probs.argmax(dim=0).numpy()
        palette = slot_palette(probs.shape[0])
        overlay = 0.45 * image / 255.0 + 0.55 * palette[hard]
        # Slots that own the most pixels (hard assignment), then by soft mass.
        area = np.bincount(hard.ravel(), minlength=probs.shape[0]).astype(np.float64)
        order = np.lexsort((-probs.sum(dim=(1, 2)).numpy(), -area))[:num_heatmaps]
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(f'block {name}\n{tuple(logits.shape[-2:])} grid')
        axes[row, 1].imshow(overlay)
        axes[row, 1].set_title(f'argmax of {probs.shape[0]} slots', fontsize=9)
        for col, slot in enumerate(order, start=2):
            heat = probs[slot].numpy()
            # Scaled per map: with untrained weights all weights sit near 1 / num_slots.
            axes[row, col].imshow(heat, cmap='magma', vmin=heat.min(), vmax=heat.max())
            axes[row, col].set_title(f'slot {slot}: {area[slot] / area.sum():.0%} of pixels, '
                                     f'p <= {heat.max():.2f}', fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[row, 2 + len(order):]:
            ax.axis('off')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--image', help='image file (default: a generated scene of shapes)')
    parser.add_argument('--checkpoint', help="the authors' ImageNet checkpoint or one of ours "
                        '(default: random weights, for trying the tool only)')
    parser.add_argument('--prefix', help="key prefix in the checkpoint, e.g. 'backbone.'")
    parser.add_argument('--arch', default='4g', choices=list(GLNet.arch_zoo))
    parser.add_argument('--blocks', nargs='+', metavar='STAGE.BLOCK',
                        help='GLMix blocks to show (default: the last one of each stage)')
    parser.add_argument('--num-heatmaps', type=int, default=4,
                        help='individual slots shown per block (default 4)')
    parser.add_argument('--size', type=int, default=448, help='shorter image side (default 448)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the generated image')
    parser.add_argument('--out', default='slots.png', help='output PNG (default slots.png)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Command-line entry point; returns the path of the written PNG."""
    args = parse_args(argv)
    logger = MMLogger.get_instance('visualize_slots')
    model = GLNet(args.arch, out_indices=(3,))
    if args.checkpoint:
        model.load_pretrained(args.checkpoint, prefix=args.prefix)
    else:
        print_log('no --checkpoint given: using random weights, so the slot assignments show '
                  'the tool working, not what GLNet learned', logger=logger, level=logging.WARNING)
    model.eval()
    if args.blocks:
        names = list(args.blocks)
    else:
        last = {}
        for name in glmix_blocks(model):
            last[name.split('.')[0]] = name
        names = list(last.values())
    image = load_image(args.image, args.size, args.seed)
    logits, _ = collect_assignments(model, to_tensor(image), names)
    source = osp.basename(args.image) if args.image else 'generated image'
    weights = osp.basename(args.checkpoint) if args.checkpoint else 'random weights'
    draw(image, logits, args.num_heatmaps, args.out,
         f'GLNet-{args.arch} slot assignments: {source}, {weights}')
    print_log(f'wrote {args.out}', logger=logger)
    return args.out


if __name__ == '__main__':
    main()
