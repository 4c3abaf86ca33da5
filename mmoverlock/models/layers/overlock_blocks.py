"""The two OverLoCK blocks: RepConvBlock (Base-Net, Overview-Net) and DynamicConvBlock (Focus-Net).

Parameter names and the forward order follow the authors' checkpoints (see shared/spec/overlock.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from torch import Tensor, nn

from ...ops import (
    memory_format_of,
    neighborhood_aggregate,
    pointwise_conv2d,
    relative_position_bias,
)
from .basic import (
    GELU,
    GRN,
    DepthwiseConv2d,
    InferenceFusedSequential,
    LayerScale,
    PointwiseConv2d,
    ResDWConv,
    SqueezeExcite,
)
from .dilated_reparam import DilatedReparamBlock

SMALL_KERNEL = 5  # ContMix's small dynamic kernel
KEY_REGIONS = 7  # ContMix pools the context into 7 x 7 region centres


def _ln(channels: int) -> LayerNorm2d:
    return LayerNorm2d(channels, eps=1e-6)


def _conv_bn(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [PointwiseConv2d(in_ch, out_ch, bias=False), nn.BatchNorm2d(out_ch)]


class RepConvBlock(nn.Module):
    """Re-parameterisable large-kernel conv block: ``x = dwconv(x); x = ls(x) + proj(x)``.

    Args:
        dim: Channels.
        kernel_size: Large kernel size of the DilatedReparamBlock.
        mlp_ratio: Expansion of the inner 1x1 convs.
        ls_init_value: LayerScale init, or None for no LayerScale (identity shortcut).
        drop_path: Stochastic depth rate.
        deploy: Build the re-parameterised form.
    """

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float = 4,
                 ls_init_value: Optional[float] = None, drop_path: float = 0.0,
                 deploy: bool = False) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.dwconv = ResDWConv(dim, 3)
        self.proj = InferenceFusedSequential(
            _ln(dim),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy),
            nn.BatchNorm2d(dim),
            SqueezeExcite(dim),
            PointwiseConv2d(dim, hidden),
            GELU(),
            ResDWConv(hidden, 3),
            GRN(hidden),
            PointwiseConv2d(hidden, dim),
            DropPath(drop_path) if drop_path > 0 else nn.Identity())
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.dwconv(x)
        return self.ls(x) + self.proj(x)


def contmix_resize_shape(height: int, width: int, kernel_size: int) -> Optional[tuple[int, int]]:
    """Size a map smaller than the ContMix kernel is resized to, or None when it is large enough."""
    if min(height, width) >= kernel_size:
        return None
    if height < width:
        return kernel_size, int(kernel_size / height * width)
    return int(kernel_size / width * height), kernel_size


def contmix_logits(query: Tensor, key: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                   groups: int) -> Tensor:
    """Per-pixel kernel logits of ContMix.

    Args:
        query: ``(B, Cq, H, W)``, already scaled.
        key: ``(B, Cq, R, R)`` pooled region centres.
        proj_weight, proj_bias: ``weight_proj`` (a 1x1 conv from the R*R affinities to the taps).
        groups: Number of groups G (channel-major split of Cq).

    Returns:
        ``(B, G, H, W, T)`` logits, T = number of output taps of ``weight_proj``.
    """
    b, cq, h, w = query.shape
    q = query.reshape(b, groups, cq // groups, h * w)
    k = key.reshape(b, groups, cq // groups, -1)
    affinity = q.transpose(-1, -2) @ k  # (B, G, HW, R*R)
    # weight_proj over the (group, pixel) rows, as a 1x1 convolution of the rows viewed as a
    # channels-last (1, R*R, 1, rows) map: pointwise_conv2d, whose CPU route (oneDNN or BLAS) is
    # measured per shape (mmoverlock.ops.cpu_routes); which is faster depends on the row count
    rows = affinity.reshape(1, 1, -1, affinity.shape[-1]).permute(0, 3, 1, 2)
    logits = pointwise_conv2d(rows, proj_weight, proj_bias)  # (1, T, 1, rows)
    return logits.permute(0, 2, 3, 1).reshape(b, groups, h, w, -1)


def dynamic_aggregate(x: Tensor, weights: list[Tensor]) -> Tensor:
    """Split x's channels into ``len(weights)`` equal parts, each into G groups, and aggregate each
    part with its own ``(B, G, H, W, K*K)`` neighbourhood weights; channel order is kept."""
    b, c, h, w = x.shape
    # the parts' results are written straight into channels-last memory (pixel-major rows of
    # channels): one copy each, instead of a planar reshape, a concatenation and a layout change
    rows = x.new_empty(b, h, w, c)
    start = 0
    for part, attn in zip(x.chunk(len(weights), dim=1), weights):
        g, width = attn.shape[1], part.shape[1]
        value = part.reshape(b, g, -1, h, w).permute(0, 1, 3, 4, 2)  # (B, G, H, W, Cg)
        agg = neighborhood_aggregate(attn, value)
        rows[..., start:start + width].view(b, h, w, g, -1).copy_(agg.permute(0, 2, 3, 1, 4))
        start += width
    return rows.permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(x))


class DynamicConvBlock(nn.Module):
    """Focus-Net block with ContMix: context-guided dynamic large-kernel convolution.

    Args:
        dim: Channels C of the feature stream.
        ctx_dim: Channels c of the context (top-down guidance) stream.
        kernel_size: Large dynamic kernel K.
        num_heads: Heads; ContMix uses ``2 * num_heads`` groups.
        mlp_ratio: Expansion of the MLP.
        ls_init_value: LayerScale init of ``ls1``/``ls2``.
        drop_path: Stochastic depth rate.
        is_first: First block of the Focus-Net (no ``x_scale``/``h_scale``).
        is_last: Last block (returns the fused C + c channels and no context).
        deploy: Build the re-parameterised form of ``lepe``.
    """

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int, num_heads: int,
                 mlp_ratio: float = 3, ls_init_value: float = 1.0, drop_path: float = 0.0,
                 is_first: bool = False, is_last: bool = False, deploy: bool = False) -> None:
        super().__init__()
        width = dim + ctx_dim
        hidden = int(mlp_ratio * dim)
        self.dim = dim
        self.kernel_size = kernel_size
        self.groups = 2 * num_heads
        self.scale = (dim // self.groups) ** -0.5
        self.is_first = is_first
        self.is_last = is_last
        if not is_first:
            self.x_scale = LayerScale(ctx_dim, 1)
            self.h_scale = LayerScale(ctx_dim, 1)
        self.dwconv1 = ResDWConv(width, 3)
        self.norm1 = _ln(width)
        self.fusion = nn.Sequential(
            DepthwiseConv2d(width, 3),
            nn.BatchNorm2d(width),
            GELU(),
            PointwiseConv2d(width, dim),
            GRN(dim))
        self.weight_query = nn.Sequential(*_conv_bn(dim, dim // 2))
        self.weight_key = nn.Sequential(nn.AdaptiveAvgPool2d(KEY_REGIONS),
                                        *_conv_bn(ctx_dim, dim // 2))
        self.weight_proj = nn.Conv2d(KEY_REGIONS ** 2, kernel_size ** 2 + SMALL_KERNEL ** 2, 1)
        self.dyconv_proj = nn.Sequential(*_conv_bn(dim, dim))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy=deploy),
                                  nn.BatchNorm2d(dim))
        self.se_layer = SqueezeExcite(dim)
        self.gate = nn.Sequential(*_conv_bn(dim, dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), PointwiseConv2d(dim, width))
        self.dwconv2 = ResDWConv(width, 3)
        self.norm2 = _ln(width)
        self.mlp = InferenceFusedSequential(
            PointwiseConv2d(width, hidden),
            GELU(),
            ResDWConv(hidden, 3),
            GRN(hidden),
            PointwiseConv2d(hidden, width))
        self.ls1 = LayerScale(width, ls_init_value)
        self.ls2 = LayerScale(width, ls_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        small_bias = 2 * SMALL_KERNEL - 1
        self.rpb1 = nn.Parameter(torch.zeros(self.groups, small_bias, small_bias))
        self.rpb2 = nn.Parameter(torch.zeros(self.groups, 2 * kernel_size - 1, 2 * kernel_size - 1))

    def contmix(self, x: Tensor, fused: Tensor) -> Tensor:
        """Dynamic aggregation of ``x`` (C channels), kernels predicted from ``fused`` (C + c)."""
        height, width = x.shape[-2:]
        size = contmix_resize_shape(height, width, self.kernel_size)
        if size is not None:
            x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
            fused = F.interpolate(fused, size=size, mode='bilinear', align_corners=False)
        h, w = x.shape[-2:]
        # split, not two slices: the backward then joins the two gradients in one concatenation
        # instead of zero-filling the full width twice and adding
        feature, context = fused.split([self.dim, fused.shape[1] - self.dim], dim=1)
        query = self.weight_query(feature) * self.scale
        key = self.weight_key(context)
        logits = contmix_logits(query, key, self.weight_proj.weight, self.weight_proj.bias,
                                self.groups)
        small, large = logits.split([SMALL_KERNEL ** 2, self.kernel_size ** 2], dim=-1)
        small = (small + relative_position_bias(self.rpb1, h, w)).softmax(dim=-1)
        large = (large + relative_position_bias(self.rpb2, h, w)).softmax(dim=-1)
        x = dynamic_aggregate(x, [small, large])
        if size is not None:
            x = F.adaptive_avg_pool2d(x, (height, width))
        return x

    def forward(self, x: Tensor, h: Tensor, h0: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if not self.is_first:
            h = self.x_scale(h) + self.h_scale(h0)
        identity = self.dwconv1(torch.cat([x, h], dim=1))
        fused = self.norm1(identity)
        x = self.fusion(fused)
        gate = self.gate(x)
        lepe = self.lepe(x)
        x = self.dyconv_proj(self.contmix(x, fused)) + lepe
        x = self.proj(gate * self.se_layer(x))
        x = self.ls1(identity) + self.drop_path(x)
        x = self.dwconv2(x)
        x = self.ls2(x) + self.drop_path(self.mlp(self.norm2(x)))
        if self.is_last:
            return x, None
        x, h = x.split([self.dim, x.shape[1] - self.dim], dim=1)
        return x, h
