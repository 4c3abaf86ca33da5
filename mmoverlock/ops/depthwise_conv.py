"""Depthwise 2-D convolution (stride 1, 'same' padding) with a faster backward on the CPU.

PyTorch's CPU backward of a depthwise convolution is 2-50x slower than its forward (measured,
channels-last, 1 thread: 7x7 on 2x256x32x32 5.3 ms for the weight gradient vs 0.6 ms forward; 9x9
on 2x64x128x128 27 ms vs 3.5 ms; dilated 3x3 kernels 5-10x; 17x17 0.6 s), and OverLoCK's training
step runs hundreds of them (every re-parameterisable block has a large kernel and up to seven
small / dilated branches). Here, on the CPU:

- the input gradient is the forward convolution of the output gradient with the flipped kernel
  (same padding and dilation), which runs at forward speed;
- the weight gradient, per channel the cross-correlation of the padded input with the output
  gradient at the ``K x K`` lags of the (dilated) kernel, is computed as

  * PyTorch's own weight gradient for 3x3 undilated kernels (fast already);
  * one grouped convolution for other kernels (:func:`depthwise_weight_grad_grouped`): each
    (image, channel) is a group whose "kernel" is its output gradient, strided by the dilation;
  * the FFT for undilated kernels >= ``FFT_MIN_KERNEL`` on maps of at least ``FFT_MIN_PIXELS``
    (:func:`depthwise_weight_grad_fft`), whose cost does not grow with the kernel. Measured for
    17x17, 2x64 channels: 25 ms FFT vs 20 ms grouped on 128x128 maps, 95 vs 142 ms on 200x304.

Dilated kernels whose 'same' padding exceeds ``DILATED_PAD_LIMIT`` are run on a map padded
beforehand by the excess: oneDNN's depthwise kernel leaves its fast path for dilated convolutions
with padding >= 7 (measured, 2x64x128x128 channels-last, 1 thread: 9x9 dilation 2 25.8 ms with
padding 8, 2.7 ms with 2 pixels padded first and padding 6; 3x3 dilation 7 4.2 vs 0.9 ms). On
the CPU this applies to inference, training forward and the input gradient (the copy costs ~0.3
ms on such a map). Likewise oneDNN's channels-last depthwise kernels are 2-3x slower for 13x13
(and slightly for 11x11) than for 15x15 (2x256x32x32: 4.1 ms for 13x13, 1.6 ms for 15x15), so
those kernels run zero-embedded in a 15x15 one (``EMBED_KERNEL``). Both were measured with the
oneDNN of torch 2.14.1; where a CPU lacks the slow paths the detours cost one padding copy or
(15/13)^2 of a 13x13 convolution's multiply-adds.

On CUDA every call is plain ``F.conv2d`` (cuDNN) with PyTorch's backward; CPU inference takes
:func:`same_conv` without the custom autograd function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['depthwise_conv2d', 'memory_format_of', 'channels_first', 'in_param_layout',
           'depthwise_weight_grad', 'depthwise_weight_grad_fft', 'depthwise_weight_grad_grouped',
           'FFT_MIN_KERNEL', 'FFT_MIN_PIXELS', 'CUSTOM_BACKWARD', 'DILATED_PAD_LIMIT',
           'EMBED_KERNEL', 'same_conv', 'padded_planes']

#: Undilated kernels at least this large, on maps of at least this many pixels, take the FFT
#: weight gradient (see the module docstring).
FFT_MIN_KERNEL = 17
FFT_MIN_PIXELS = 32768
#: False sends every call to plain ``F.conv2d`` and PyTorch's backward (the benchmarks' baseline).
CUSTOM_BACKWARD = True
#: Largest padding passed to a dilated CPU convolution; the rest is padded beforehand.
DILATED_PAD_LIMIT = 6
#: Undilated CPU kernels run zero-embedded in a larger kernel (module docstring).
EMBED_KERNEL = {11: 15, 13: 15}


def same_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """``F.conv2d`` of a depthwise odd ``K x K`` kernel with 'same' padding. On the CPU a dilated
    kernel's padding beyond ``DILATED_PAD_LIMIT`` is applied beforehand and ``EMBED_KERNEL`` sizes
    run zero-embedded in a larger kernel (module docstring); same result either way."""
    k = weight.shape[-1]
    pad = dilation * (k - 1) // 2
    # not while tracing: FLOP counters must see the convolution as defined
    if CUSTOM_BACKWARD and x.device.type == 'cpu' and not torch.jit.is_tracing():
        if dilation > 1 and pad > DILATED_PAD_LIMIT:
            x = F.pad(x, [pad - DILATED_PAD_LIMIT] * 4)
            pad = DILATED_PAD_LIMIT
        elif dilation == 1 and k in EMBED_KERNEL:
            pad = (EMBED_KERNEL[k] - 1) // 2
            weight = F.pad(weight, [pad - (k - 1) // 2] * 4)
    return F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=weight.shape[0])


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


def channels_first(x: Tensor) -> Tensor:
    """``x`` in the contiguous (NCHW) layout. A channels-last map is transposed image by image as
    ``(H*W, C) -> (C, H*W)`` matrices, which PyTorch copies with a cache-blocked 2-D transpose:
    2.5x faster than ``x.contiguous()`` on 2x256x32x32, 8x on 2x1024x32x32 (measured, 1 thread)."""
    if x.is_contiguous() or memory_format_of(x) != torch.channels_last:
        return x.contiguous()
    b, c, h, w = x.shape
    out = x.new_empty(b, c, h, w)
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: x is channels-last
    for i in range(b):
        out[i].view(c, h * w).copy_(rows[i].t())
    return out


def padded_planes(x: Tensor, pad: int) -> Tensor:
    """``(B*C, H + 2*pad, W + 2*pad)``: the zero-padded NCHW planes of ``x`` that
    :func:`depthwise_weight_grad_grouped` convolves; one buffer can serve every kernel whose
    padding is at most ``pad`` (several kernels applied to the same input)."""
    b, c, h, w = x.shape
    planes = x.new_zeros(b * c, h + 2 * pad, w + 2 * pad)
    planes.view(b, c, h + 2 * pad, w + 2 * pad)[:, :, pad:pad + h, pad:pad + w] = channels_first(x)
    return planes


def depthwise_weight_grad_grouped(x: Tensor, grad_out: Tensor, kernel_size: int,
                                  dilation: int = 1, planes: Optional[Tensor] = None) -> Tensor:
    """Weight gradient ``(C, 1, K, K)`` as one grouped convolution (same definition as
    :func:`depthwise_weight_grad_fft`): the padded input of every (image, channel) is convolved
    with that pair's output gradient as the kernel, with stride ``dilation``, which gives exactly
    the ``K x K`` lags; the images are then summed. Runs on plain (NCHW) copies, where PyTorch's
    grouped convolution with large kernels is fastest (and explicitly zero-padded planes: the
    same convolution with ``padding`` is up to 10x slower). ``planes``: :func:`padded_planes` of
    ``x`` with at least this kernel's padding, when already made."""
    b, c, h, w = x.shape
    pad = dilation * (kernel_size - 1) // 2
    if planes is None:
        planes = padded_planes(x, pad)
    start = (planes.shape[-1] - w) // 2 - pad  # a centred window of the shared buffer
    window = planes[:, start:start + h + 2 * pad, start:start + w + 2 * pad].unsqueeze(0)
    kernels = channels_first(grad_out).view(b * c, 1, h, w)
    lags = F.conv2d(window, kernels, stride=dilation, groups=b * c)  # (1, B*C, K, K)
    return lags.view(b, c, kernel_size, kernel_size).sum(0).unsqueeze(1)


def depthwise_weight_grad(x: Tensor, grad_out: Tensor, weight: Tensor, dilation: int,
                          planes: Optional[Tensor] = None) -> Tensor:
    """Weight gradient of ``depthwise_conv2d(x, weight, dilation=dilation)`` for ``grad_out``,
    by the fastest route measured for the kernel (see the module docstring); ``planes`` as in
    :func:`depthwise_weight_grad_grouped`."""
    k = weight.shape[-1]
    if dilation == 1 and k <= 3:
        pad = (k - 1) // 2
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], x.shape[1],
            [False, True, False])[1]
    if dilation == 1 and k >= FFT_MIN_KERNEL and x.shape[-2] * x.shape[-1] >= FFT_MIN_PIXELS:
        return depthwise_weight_grad_fft(x, grad_out, k)
    return depthwise_weight_grad_grouped(x, grad_out, k, dilation, planes)


def in_param_layout(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with exactly ``param``'s strides (a copy only where they differ).

    Strides of size-1 dimensions are arbitrary to PyTorch but not to DDP, which copies gradients
    into buckets laid out like the parameters and warns (and slows down) on any mismatch.
    """
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param, memory_format=torch.preserve_format).copy_(grad)


class _DepthwiseConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return same_conv(x, weight, bias, dilation)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # correlation with the flipped kernel = the transposed convolution (stride 1)
            grad_x = same_conv(grad_out, weight.flip(-1, -2), None, d)
        if ctx.needs_input_grad[1]:
            grad_w = in_param_layout(depthwise_weight_grad(x, grad_out, weight, d), weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     dilation: int = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, padding='same', dilation=dilation, groups=C)`` for an odd
    square ``(C, 1, K, K)`` kernel, with the faster backward on the CPU (module docstring).

    Args:
        x: ``(B, C, H, W)`` input, either memory layout (the output keeps it).
        weight: ``(C, 1, K, K)`` kernel, K odd.
        bias: ``(C,)`` bias or None.
        dilation: Dilation of the kernel.

    Returns:
        ``(B, C, H, W)`` output.
    """
    c, k = x.shape[1], weight.shape[-1]
    if weight.shape != (c, 1, k, k) or k % 2 == 0:
        raise ValueError(f'depthwise_conv2d needs an odd square (C, 1, K, K) kernel for C={c} '
                         f'channels, got {tuple(weight.shape)}')
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not (needs_grad and CUSTOM_BACKWARD and x.device.type == 'cpu'):
        return same_conv(x, weight, bias, dilation)
    return _DepthwiseConv2d.apply(x, weight, bias, dilation)
