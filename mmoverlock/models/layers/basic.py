"""Small building blocks shared by the backbones (names follow the authors' checkpoints)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_file

from ...ops import depthwise_conv2d, gelu, grn, pointwise_conv2d
from ...ops.grn import grn_pointwise_conv


class GELU(nn.GELU):
    """``nn.GELU`` (same arguments, no parameters) that computes channels-last maps on their
    contiguous ``(N, H, W, C)`` view: :func:`mmoverlock.ops.gelu`."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x, approximate=self.approximate)


class LayerScale(nn.Module):
    """Per-channel affine ``x * weight + bias`` (a depthwise 1x1 conv with bias).

    Args:
        channels: Number of channels.
        init_value: Initial value of the scale.
    """

    def __init__(self, channels: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-V2) on NCHW maps.

    ``g = ||x||_2`` over (H, W); ``n = g / (mean_C(g) + eps)``;
    ``out = (gamma * n + 1) * x + beta``.

    Args:
        channels: Number of channels.
        eps: Added to the channel mean of the norms.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return grn(x, self.gamma, self.beta, self.eps)


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` (same parameters and checkpoint keys) whose
    forward and backward run on oneDNN on the CPU (see :mod:`mmoverlock.ops.pointwise_conv`).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        bias: Whether the conv has a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv2d(x, self.weight, self.bias)


class SqueezeExcite(nn.Module):
    """Channel attention ``x * sigmoid(fc(gelu(fc(avgpool(x)))))`` with inner width max(16, C//8).

    Args:
        channels: Number of channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(16, channels // 8)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, inner, 1),
            GELU(),
            nn.Conv2d(inner, channels, 1),
            nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.proj(x)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, K, padding='same', dilation=d, groups=channels)`` (same
    parameters and checkpoint keys) with the faster CPU backward of
    :func:`mmoverlock.ops.depthwise_conv2d`.

    Args:
        channels: Number of channels.
        kernel_size: Odd kernel size.
        dilation: Dilation of the kernel.
        bias: Whether the conv has a bias.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int = 1,
                 bias: bool = True) -> None:
        super().__init__(channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, groups=channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.dilation[0])


class ResDWConv(DepthwiseConv2d):
    """Residual depthwise convolution ``x + dwconv(x)``; its parameters are the conv's own.

    Args:
        channels: Number of channels.
        kernel_size: Size of the depthwise kernel.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        # x + conv(x, w) = conv(x, w + identity kernel): the shortcut rides in the centre tap, so
        # the forward makes one pass over the map instead of two and the backward's transposed
        # convolution already contains the shortcut's gradient (no separate sum)
        return depthwise_conv2d(x, with_identity_tap(self.weight), self.bias, self.dilation[0])


def with_identity_tap(weight: Tensor) -> Tensor:
    """``weight + delta``: a ``(C, 1, K, K)`` depthwise kernel plus the identity kernel (1 at the
    centre tap), so that ``conv(x, with_identity_tap(w)) == x + conv(x, w)``."""
    centre = weight.shape[-1] // 2
    delta = torch.zeros_like(weight)
    delta[..., centre, centre] = 1
    return weight + delta


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook would see ``module`` run (its own or a global one)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module_file._global_forward_hooks or module_file._global_forward_pre_hooks)


class InferenceFusedSequential(nn.Sequential):
    """``nn.Sequential`` (same modules, same checkpoint keys) that at inference runs a
    :class:`GRN` and the :class:`PointwiseConv2d` right after it as one operation
    (:func:`mmoverlock.ops.grn.grn_pointwise_conv`: GRN's scale folded into the conv's weight).
    In training, and where either module carries forward hooks, it is ``nn.Sequential``."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        modules = list(self)
        i = 0
        while i < len(modules):
            module = modules[i]
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            if (type(module) is GRN and type(nxt) is PointwiseConv2d
                    and not _hooked(module) and not _hooked(nxt)):
                x = grn_pointwise_conv(x, module.gamma, module.beta, module.eps, nxt.weight,
                                       nxt.bias)
                i += 2
            else:
                x = module(x)
                i += 1
        return x
