"""Effective receptive field (ERF) of a backbone's stages.

Definition (Luo et al., 2016; the measure behind the RepLKNet and OverLoCK ERF figures): for an
input image ``x`` and a stage output ``y`` (C x h x w), the contribution of input pixel ``p`` is

    sum over input channels of | d (sum_c relu(y[c, h // 2, w // 2])) / d x[:, p] |,

how strongly the stage's centre position reacts to that pixel; the maps of several images are
averaged. The ReLU (as in RepLKNet's script) matters for outputs that end in a channel LayerNorm
(OverLoCK's and GLNet's output norms): with unit weights the plain channel sum of a normalised
vector is constant and its gradient zero. Unlike RepLKNet's script, which keeps the positive part
of the input gradient, the magnitude is taken (a pixel that lowers the response also counts).

The *high-contribution area ratio* at a threshold ``t`` summarises a map's spread (larger = wider
ERF); two definitions are computed:

* ``square``: the area of the smallest centred square (side ``2r + 1``, clipped to the image)
  whose contributions sum to at least ``t`` of the total, over the image area (RepLKNet's
  measure);
* ``pixels``: the smallest fraction of the image's pixels whose contributions, largest first,
  sum to at least ``t`` of the total (independent of where the mass lies).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ['AREA_METHODS', 'DEFAULT_THRESHOLDS', 'area_ratio', 'area_ratios', 'erf_maps',
           'log_scale']

DEFAULT_THRESHOLDS = (0.2, 0.5, 0.99)
AREA_METHODS = ('square', 'pixels')


def _stage_outputs(outputs: Union[Tensor, Sequence[Tensor]]) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    return [o for o in outputs if isinstance(o, Tensor) and o.dim() == 4]


def erf_maps(backbone: nn.Module, images: Union[Tensor, Iterable[Tensor]],
             stages: Optional[Sequence[int]] = None) -> Tensor:
    """Average contribution maps of the input pixels to each stage's centre position.

    Args:
        backbone: A backbone returning a tuple of NCHW stage outputs; run as it is (put it in
            eval mode first for the usual, BatchNorm-statistics-free, ERF).
        images: A batch ``(N, 3, H, W)`` or an iterable of such batches (same H, W); each
            sample is treated independently (summing over the batch of an eval-mode network
            gives each sample's own gradient).
        stages: Indices into the backbone's outputs (default: all).

    Returns:
        ``(S, H, W)`` float64 tensor: the mean over all images of each stage's map.
    """
    batches = [images] if isinstance(images, Tensor) else list(images)
    if not batches:
        raise ValueError('erf_maps needs at least one image')
    params = [p for p in backbone.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        total: Optional[Tensor] = None
        count = 0
        for batch in batches:
            x = batch.detach().clone().requires_grad_(True)
            outs = _stage_outputs(backbone(x))
            chosen = list(range(len(outs))) if stages is None else list(stages)
            if any(not -len(outs) <= s < len(outs) for s in chosen):
                raise ValueError(f'stages {chosen} out of range: the backbone returns '
                                 f'{len(outs)} maps')
            maps = []
            for i, s in enumerate(chosen):
                y = outs[s]
                centre = y[:, :, y.shape[2] // 2, y.shape[3] // 2].relu().sum()
                (grad,) = torch.autograd.grad(centre, x, retain_graph=i < len(chosen) - 1)
                maps.append(grad.abs().sum(dim=1).sum(dim=0).double())
            stacked = torch.stack(maps)
            total = stacked if total is None else total + stacked
            count += x.shape[0]
        assert total is not None
        return total / count
    finally:
        for p in params:
            p.requires_grad_(True)


def area_ratio(contribution: Tensor, threshold: float, method: str = 'square') -> float:
    """High-contribution area ratio of one ``(H, W)`` map at ``threshold`` (see module doc)."""
    if method not in AREA_METHODS:
        raise ValueError(f'method must be one of {AREA_METHODS}, got {method!r}')
    if not 0 < threshold <= 1:
        raise ValueError(f'threshold must be in (0, 1], got {threshold}')
    data = contribution.double()
    height, width = data.shape
    total = float(data.sum())
    if total <= 0:
        return 0.0
    goal = threshold * total * (1 - 1e-12)
    if method == 'pixels':
        ordered = data.flatten().sort(descending=True).values.cumsum(0)
        needed = int(torch.searchsorted(ordered, torch.tensor(goal, dtype=ordered.dtype))) + 1
        return min(needed, ordered.numel()) / ordered.numel()
    cy, cx = height // 2, width // 2
    for r in range(max(height, width)):
        window = data[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1]
        if float(window.sum()) >= goal:
            return window.numel() / (height * width)
    return 1.0


def area_ratios(maps: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                method: str = 'square') -> list[dict[float, float]]:
    """:func:`area_ratio` of each map of ``maps`` (S, H, W) at each threshold."""
    return [{t: area_ratio(m, t, method) for t in thresholds} for m in maps]


def log_scale(contribution: Tensor, decades: float = 3.0) -> Tensor:
    """``log10(map / max)`` clipped to ``[-decades, 0]``: the heat-map scale of the figures."""
    data = contribution.double()
    peak = float(data.max())
    if peak <= 0:
        return torch.full_like(data, -decades)
    return torch.log10((data / peak).clamp_min(10 ** -decades))
