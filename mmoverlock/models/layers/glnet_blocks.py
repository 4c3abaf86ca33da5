"""Blocks of GLNet (Zhu et al., NeurIPS 2024): GLMix, plain attention on NCHW maps and on tokens.

Parameter names follow the authors' released ImageNet checkpoints (see shared/spec/glnet.md).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from torch import Tensor, nn

from .basic import GELU, DepthwiseConv2d, PointwiseConv2d, ResDWConv

#: Slot initialisation modes: pooled from the block input, or learned parameters.
SLOT_INITS = ('ada_avgpool', 'param')


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention on ``(B, L, C)`` tokens through ``scaled_dot_product_attention``.

    Holds the same parameters as ``nn.MultiheadAttention(dim, num_heads, batch_first=True)``
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) so that its
    checkpoints load unchanged, and computes the same function (no dropout). On CPU it is as fast
    as ``nn.MultiheadAttention`` in training and faster in inference on long sequences, where the
    latter's fused path is about 2x slower (GLNet-4G on an 800x1216 image: 4.6 s vs 6.8 s).

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as ``nn.MultiheadAttention`` does (Xavier-uniform input projection)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Attend ``x`` (B, L, C) to itself and return (B, L, C)."""
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'


class ChannelScale(nn.Module):
    """Layer scale: multiply by a learnable per-channel ``gamma``.

    Args:
        dim: Number of channels.
        init_value: Initial value of ``gamma``.
        channels_first: True for NCHW maps (``gamma`` of shape ``(1, C, 1, 1)``), False for
            channels-last tokens (shape ``(C,)``).
    """

    def __init__(self, dim: int, init_value: float, channels_first: bool = True) -> None:
        super().__init__()
        shape = (1, dim, 1, 1) if channels_first else (dim,)
        self.gamma = nn.Parameter(torch.full(shape, float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def _scale_or_identity(dim: int, layerscale: float, channels_first: bool = True) -> nn.Module:
    return ChannelScale(dim, layerscale, channels_first) if layerscale > 0 else nn.Identity()


def conv_mlp(dim: int, mlp_ratio: float, mlp_dw: bool) -> nn.Sequential:
    """``[conv 1x1 C->rC, ResDWConv 3x3 (or Identity), GELU, conv 1x1 rC->C]`` on NCHW maps.

    Args:
        dim: Input and output width C.
        mlp_ratio: Expansion ratio r.
        mlp_dw: Whether to add the residual depthwise 3x3 conv.
    """
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(
        PointwiseConv2d(dim, hidden),
        ResDWConv(hidden, 3) if mlp_dw else nn.Identity(),
        GELU(),
        PointwiseConv2d(hidden, dim))


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_map(t: Tensor, height: int, width: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], height, width)


class GLMixBlock(nn.Module):
    """GLMix block: convolutions on the grid, attention among soft-clustered semantic slots.

    Pixels are softly clustered into ``num_slots`` slots (cosine similarity to initial slots that
    are pooled from the block input, or learned), the slots attend to each other, and are
    dispatched back to the pixels with the transposed assignment; a depthwise-conv branch on the
    normalised input is added, followed by a convolutional MLP.

    Args:
        dim: Number of channels C.
        num_heads: Heads of the slot attention.
        mlp_ratio: Expansion ratio of the MLP.
        drop_path: Stochastic depth rate of both residual branches.
        layerscale: Initial layer scale (``ls1``, ``ls2``); 0 disables it.
        cpe_ks: Kernel of the depthwise positional conv ``pos_conv``; 0 disables it.
        local_dw_ks: Kernel of the depthwise conv in ``feature_conv``.
        num_slots: Number of slots (a square number for pooled initialisation).
        slot_init: ``'ada_avgpool'`` (adaptive average pooling of the input to a
            sqrt(num_slots)-sided grid) or ``'param'`` (learned ``init_slots``).
        mlp_dw: Whether the MLP has the residual depthwise 3x3 conv.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 mlp_ratio: float = 4.0,
                 drop_path: float = 0.0,
                 layerscale: float = 0.0,
                 cpe_ks: int = 0,
                 local_dw_ks: int = 5,
                 num_slots: int = 64,
                 slot_init: str = 'ada_avgpool',
                 mlp_dw: bool = False) -> None:
        super().__init__()
        if slot_init not in SLOT_INITS:
            raise ValueError(f'slot_init must be one of {SLOT_INITS}, got {slot_init!r}')
        self.pool_size = math.isqrt(num_slots)
        if slot_init == 'ada_avgpool' and self.pool_size ** 2 != num_slots:
            raise ValueError(f'pooled slots need a square num_slots, got {num_slots}')
        self.num_slots = num_slots
        self.slot_init = slot_init
        self.slot_scale = nn.Parameter(torch.tensor(dim ** -0.5))
        self.pos_conv = (DepthwiseConv2d(dim, cpe_ks)
                         if cpe_ks > 0 else None)
        if slot_init == 'param':
            self.init_slots = nn.Parameter(torch.empty(1, num_slots, dim))
            nn.init.normal_(self.init_slots, std=0.02)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.relation_mha = MultiheadSelfAttention(dim, num_heads)
        self.feature_conv = nn.Sequential(
            PointwiseConv2d(dim, dim),
            DepthwiseConv2d(dim, local_dw_ks),
            PointwiseConv2d(dim, dim))
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = conv_mlp(dim, mlp_ratio, mlp_dw)
        self.ls1 = _scale_or_identity(dim, layerscale)
        self.ls2 = _scale_or_identity(dim, layerscale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def initial_slots(self, x: Tensor) -> Tensor:
        """The slots (B, S, C) that pixels are compared with, from the block input ``x``."""
        if self.slot_init == 'param':
            return self.init_slots.expand(x.shape[0], -1, -1)
        return to_tokens(F.adaptive_avg_pool2d(x, self.pool_size))

    def slot_logits(self, slots: Tensor, tokens: Tensor) -> Tensor:
        """Scaled cosine similarity (B, S, L) of ``slots`` (B, S, C) and ``tokens`` (B, L, C)."""
        tokens = self.slot_scale * F.normalize(tokens, dim=-1)
        return torch.bmm(F.normalize(slots, dim=-1), tokens.transpose(1, 2))

    @torch.no_grad()
    def assignment_logits(self, x: Tensor) -> Tensor:
        """Logits (B, S, H, W) of the soft assignment of pixels to slots for block input ``x``.

        Softmax over the slot axis gives the dispatch weights (each pixel's distribution over
        slots); softmax over (H, W) the clustering weights. Used for visualisation only: it
        recomputes the first steps of :meth:`forward` and changes nothing.
        """
        slots0 = self.initial_slots(x)
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        logits = self.slot_logits(slots0, to_tokens(self.norm1(x)))
        return logits.view(x.shape[0], -1, *x.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C, H, W) to (B, C, H, W)."""
        height, width = x.shape[-2:]
        slots0 = self.initial_slots(x)
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        shortcut = x
        y = self.norm1(x)
        tokens = to_tokens(y)
        logits = self.slot_logits(slots0, tokens)
        slots = torch.bmm(logits.softmax(dim=-1), tokens)
        slots = self.relation_mha(slots)
        z = torch.bmm(logits.transpose(1, 2).softmax(dim=-1), slots)
        z = to_map(z, height, width) + self.feature_conv(y)
        x = shortcut + self.drop_path(self.ls1(z))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class MHANCHWBlock(nn.Module):
    """Plain self-attention block on NCHW maps (GLNet's ``mha_nchw`` mixing).

    Args:
        dim: Number of channels C.
        num_heads: Attention heads.
        mlp_ratio: Expansion ratio of the convolutional MLP.
        drop_path: Stochastic depth rate of both residual branches.
        layerscale: Initial layer scale (``ls1`` on tokens, ``ls2`` on maps); 0 disables it.
        cpe_ks: Kernel of the depthwise positional conv ``pos_conv``; 0 disables it.
        mlp_dw: Whether the MLP has the residual depthwise 3x3 conv.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 mlp_ratio: float = 4.0,
                 drop_path: float = 0.0,
                 layerscale: float = 0.0,
                 cpe_ks: int = 0,
                 mlp_dw: bool = False) -> None:
        super().__init__()
        self.pos_conv = (DepthwiseConv2d(dim, cpe_ks)
                         if cpe_ks > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mha_op = MultiheadSelfAttention(dim, num_heads)
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = conv_mlp(dim, mlp_ratio, mlp_dw)
        self.ls1 = _scale_or_identity(dim, layerscale, channels_first=False)
        self.ls2 = _scale_or_identity(dim, layerscale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C, H, W) to (B, C, H, W)."""
        height, width = x.shape[-2:]
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        t = to_tokens(x)
        t = t + self.drop_path(self.ls1(self.mha_op(self.norm1(t))))
        x = to_map(t, height, width)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class MHABlock(nn.Module):
    """Pre-norm transformer block on ``(B, L, C)`` tokens (GLNet-STL's last stage, ``mha``).

    Args:
        dim: Token width C.
        num_heads: Attention heads.
        mlp_ratio: Expansion ratio of the MLP.
        drop_path: Stochastic depth rate of both residual branches.
        layerscale: Initial layer scale (``ls1``, ``ls2`` of shape ``(C,)``); 0 disables it.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 mlp_ratio: float = 4.0,
                 drop_path: float = 0.0,
                 layerscale: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mha_op = MultiheadSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls1 = _scale_or_identity(dim, layerscale, channels_first=False)
        self.ls2 = _scale_or_identity(dim, layerscale, channels_first=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map tokens (B, L, C) to (B, L, C)."""
        x = x + self.drop_path(self.ls1(self.mha_op(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class GLNetStage(nn.Module):
    """The blocks of one GLNet stage (``stages[i].blocks``) and the layout they work in.

    Args:
        blocks: The stage's blocks, in order.
        tokens: True when the blocks take ``(B, L, C)`` tokens (``mha`` mixing); the stage then
            converts its NCHW input to tokens and its output back to NCHW.
    """

    def __init__(self, blocks: list[nn.Module], tokens: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.tokens = tokens

    def forward(self, x: Tensor,
                run: Optional[Callable[[int, nn.Module, Tensor], Tensor]] = None) -> Tensor:
        """Run the blocks on ``x`` (B, C, H, W); ``run(index, block, x)`` may wrap each call
        (e.g. for gradient checkpointing)."""
        height, width = x.shape[-2:]
        if self.tokens:
            x = to_tokens(x)
        for j, block in enumerate(self.blocks):
            x = run(j, block, x) if run is not None else block(x)
        return to_map(x, height, width) if self.tokens else x


def build_glnet_block(mode: str, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                      layerscale: float, cpe_ks: int, local_dw_ks: int, num_slots: int,
                      slot_init: str, mlp_dw: bool) -> nn.Module:
    """Build the block for one mixing ``mode`` (``'glmix' | 'mha_nchw' | 'mha'``).

    Args:
        mode: Mixing of this block.
        dim: Number of channels.
        num_heads: Attention heads.
        mlp_ratio: MLP expansion ratio.
        drop_path: Stochastic depth rate.
        layerscale: Initial layer scale, 0 for none.
        cpe_ks: Positional depthwise conv kernel, 0 for none (not used by ``mha``).
        local_dw_ks: Depthwise kernel of GLMix's ``feature_conv``.
        num_slots: Number of GLMix slots.
        slot_init: GLMix slot initialisation (``'ada_avgpool' | 'param'``).
        mlp_dw: Residual depthwise conv in the convolutional MLPs.
    """
    if mode == 'glmix':
        return GLMixBlock(dim, num_heads, mlp_ratio, drop_path, layerscale, cpe_ks, local_dw_ks,
                          num_slots, slot_init, mlp_dw)
    if mode == 'mha_nchw':
        return MHANCHWBlock(dim, num_heads, mlp_ratio, drop_path, layerscale, cpe_ks, mlp_dw)
    if mode == 'mha':
        return MHABlock(dim, num_heads, mlp_ratio, drop_path, layerscale)
    raise ValueError(f"unknown GLNet block mixing {mode!r}; expected 'glmix', 'mha_nchw' or 'mha'")


__all__ = ['ChannelScale', 'GLMixBlock', 'GLNetStage', 'MHABlock', 'MHANCHWBlock',
           'MultiheadSelfAttention', 'build_glnet_block', 'conv_mlp']
