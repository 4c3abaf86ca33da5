"""Depthwise 2-D convolution (stride 1, 'same' padding) with a faster backward for large kernels.

PyTorch's CPU kernels compute the weight gradient of a large depthwise kernel at about 1 GMAC/s
(17x17 on 2x64x128x128: ~0.6-0.9 s, in both memory layouts), which made it the largest single cost
of an OverLoCK training step. The weight gradient of a depthwise convolution is, per channel, the
cross-correlation of the padded input with the output gradient, evaluated at the K x K lags of the
kernel. For large kernels it is computed here through the FFT (summed over the batch in the
frequency domain), which is exact up to float rounding and costs a few FFTs of the map size. The
input gradient is a forward depthwise convolution with the flipped kernel, which runs at full speed
in the channels-last layout.

Small or dilated kernels (where the FFT measured slower) and CUDA tensors keep PyTorch's own
backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['depthwise_conv2d', 'memory_format_of', 'depthwise_weight_grad_fft', 'FFT_MIN_KERNEL']

#: Undilated kernels at least this large take the FFT weight gradient (measured on CPU: 15-20x
#: faster than PyTorch's for 15x15 / 17x17, slower for 9x9 with dilation 2 and small kernels).
FFT_MIN_KERNEL = 11


def _fft_size(n: int) -> int:
    """Smallest 2^a * 3^b * 5^c >= n (sizes pocketfft handles fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def depthwise_weight_grad_fft(x: Tensor, grad_out: Tensor, kernel_size: int,
                              dilation: int = 1) -> Tensor:
    """Weight gradient ``(C, 1, K, K)`` of a stride-1 depthwise conv with 'same' padding.

    ``dW[c, u, v] = sum_{b, y, x} xpad[b, c, y + d*u, x + d*v] * g[b, c, y, x]``, computed as a
    circular cross-correlation of size >= ``H + 2p`` (no wrap-around for the lags needed).
    """
    b, c, h, w = x.shape
    pad = dilation * (kernel_size - 1) // 2
    n1, n2 = _fft_size(h + 2 * pad), _fft_size(w + 2 * pad)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = torch.fft.rfft2(F.pad(x.to(dtype), [pad, pad, pad, pad]), s=(n1, n2))
    gf = torch.fft.rfft2(grad_out.to(dtype), s=(n1, n2))
    spectrum = torch.einsum('bchw,bchw->chw', xf, gf.conj())
    corr = torch.fft.irfft2(spectrum, s=(n1, n2))
    lags = slice(0, 2 * pad + 1, dilation)
    return corr[:, lags, lags].unsqueeze(1).to(x.dtype)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D channels-last (and not also contiguous) tensor."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _DepthwiseConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
        pad = dilation * (weight.shape[-1] - 1) // 2
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        d, k = ctx.dilation, weight.shape[-1]
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
        pad = d * (k - 1) // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # correlation with the flipped kernel = the transposed convolution (stride 1)
            grad_x = F.conv2d(grad_out, weight.flip(-1, -2), padding=pad, dilation=d,
                              groups=x.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad_fft(x, grad_out, k, d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     dilation: int = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, padding='same', dilation=dilation, groups=C)`` for an odd
    square ``(C, 1, K, K)`` kernel, with the FFT weight gradient for large kernels on CPU."""
    c, k = x.shape[1], weight.shape[-1]
    if weight.shape != (c, 1, k, k) or k % 2 == 0:
        raise ValueError(f'depthwise_conv2d needs an odd square (C, 1, K, K) kernel for C={c} '
                         f'channels, got {tuple(weight.shape)}')
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not needs_grad or x.device.type != 'cpu' or dilation != 1 or k < FFT_MIN_KERNEL:
        pad = dilation * (k - 1) // 2
        return F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=c)
    return _DepthwiseConv2d.apply(x, weight, bias, dilation)
