"""Depthwise 2-D convolution (stride 1, 'same' padding) with a faster backward on the CPU.

PyTorch's CPU backward of a depthwise convolution is 2-50x slower than its forward (measured,
channels-last, 1 thread: 7x7 on 2x256x32x32 5.3 ms for the weight gradient vs 0.6 ms forward; 9x9
on 2x64x128x128 27 ms vs 3.5 ms; dilated 3x3 kernels 5-10x; 17x17 0.6 s), and OverLoCK's training
step runs hundreds of them (every re-parameterisable block has a large kernel and up to seven
small / dilated branches). Here, on the CPU:

- the input gradient is the forward convolution of the output gradient with the flipped kernel
  (same padding and dilation), which runs at forward speed;
- the weight gradient, per channel the cross-correlation of the padded input with the output
  gradient at the ``K x K`` lags of the (dilated) kernel, is computed by one of three routes:
  PyTorch's own weight gradient (``native``), one grouped convolution (``grouped``,
  :func:`depthwise_weight_grad_grouped`: each (image, channel) is a group whose "kernel" is its
  output gradient, strided by the dilation), or the FFT for undilated kernels (``fft``,
  :func:`depthwise_weight_grad_fft`, whose cost does not grow with the kernel).

The forward (and the input gradient) has routes too: the padding in the call (``direct``), the
map padded beforehand (``prepad``: oneDNN's depthwise kernels leave their fast path for dilated
convolutions with large paddings, and its AVX2 kernel for any padding, falling back to an im2col
GEMM one to two orders of magnitude slower), and 11x11 / 13x13 kernels zero-embedded in a 15x15
one (``embed``: oneDNN's channels-last AVX-512 kernels run those sizes slower than 15x15).
Which route is fastest depends on the processor, so :mod:`mmoverlock.ops.cpu_routes` measures
them on the machine the first time a shape is seen (or takes fixed defaults that are safe on
AVX2 and AVX-512 alike: :func:`same_conv_default_route`, :func:`weight_grad_default_route`).
The measurements behind these routes are in ``benchmarks/results/``.

On CUDA every call is plain ``F.conv2d`` (cuDNN) with PyTorch's backward; CPU inference takes
:func:`same_conv` without the custom autograd function, and so does everything under
``torch.compile`` (the compiler derives the backward itself). Under CPU autocast the function
runs in the autocast dtype, as autocast runs ``F.conv2d``.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd

from . import cpu_routes
from .cpu_routes import size_bucket

__all__ = ['depthwise_conv2d', 'memory_format_of', 'channels_first', 'in_param_layout',
           'depthwise_weight_grad', 'depthwise_weight_grad_fft', 'depthwise_weight_grad_grouped',
           'FFT_MIN_KERNEL', 'FFT_MIN_PIXELS', 'CUSTOM_BACKWARD',
           'EMBED_KERNEL', 'same_conv', 'padded_planes', 'as_defined', 'running_as_defined',
           'same_conv_default_route', 'weight_grad_default_route', 'route_key']

#: The fixed (unmeasured) route of the weight gradient takes the FFT for undilated kernels at
#: least this large on maps of at least this many pixels (measured on an AVX-512 Xeon: 17x17,
#: 2x64 channels, 25 ms FFT vs 20 ms grouped on 128x128 maps, 95 vs 142 ms on 200x304).
FFT_MIN_KERNEL = 17
FFT_MIN_PIXELS = 32768
#: False sends every call to plain ``F.conv2d`` and PyTorch's backward (the benchmarks' baseline).
CUSTOM_BACKWARD = True
#: Undilated CPU kernels that may run zero-embedded in a larger kernel (route ``embed``).
EMBED_KERNEL = {11: 15, 13: 15}

_AS_DEFINED = threading.local()


@contextmanager
def as_defined() -> Iterator[None]:
    """Within this context (in this thread) :func:`same_conv` runs every kernel as defined: no
    pre-padding, no zero-embedding, as while JIT tracing. Operator-level counters
    (:class:`mmoverlock.utils.flops.MacCounter`) enter it, so that a 13x13 kernel is seen and
    counted as 13x13 on every device; the values are the same either way."""
    _AS_DEFINED.depth = getattr(_AS_DEFINED, 'depth', 0) + 1
    try:
        yield
    finally:
        _AS_DEFINED.depth -= 1


def running_as_defined() -> bool:
    """True while JIT tracing or inside :func:`as_defined`: the CPU detours are off."""
    return getattr(_AS_DEFINED, 'depth', 0) > 0 or torch.jit.is_tracing()


def _same_conv_routes(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      dilation: int) -> dict[str, Callable[[], Tensor]]:
    """The equivalent CPU routes of :func:`same_conv`: ``direct`` (the padding in the call),
    ``prepad`` (the input zero-padded beforehand, no padding in the call: oneDNN's dilated
    depthwise kernels leave their fast path for large paddings, on AVX2 for any padding), and
    for ``EMBED_KERNEL`` sizes ``embed`` (the kernel zero-embedded in a larger one)."""
    k, groups = weight.shape[-1], weight.shape[0]
    pad = dilation * (k - 1) // 2
    routes = {'direct': lambda: F.conv2d(x, weight, bias, padding=pad, dilation=dilation,
                                         groups=groups)}
    if pad > 0:
        routes['prepad'] = lambda: F.conv2d(F.pad(x, [pad] * 4), weight, bias, dilation=dilation,
                                            groups=groups)
    if dilation == 1 and k in EMBED_KERNEL:
        big = EMBED_KERNEL[k]
        routes['embed'] = lambda: F.conv2d(x, F.pad(weight, [(big - k) // 2] * 4), bias,
                                           padding=(big - 1) // 2, groups=groups)
    return routes


def same_conv_default_route(kernel_size: int, dilation: int) -> str:
    """The fixed route of :func:`same_conv` (no measuring): ``prepad`` for dilated kernels (never
    oneDNN's slow path, on AVX2 or AVX-512; at most one padding copy of the map), ``embed`` for
    ``EMBED_KERNEL`` sizes, ``direct`` otherwise."""
    if dilation > 1:
        return 'prepad'
    return 'embed' if kernel_size in EMBED_KERNEL else 'direct'


def route_key(x: Tensor, weight: Tensor, dilation: int, *extra: object) -> tuple:
    """What the speed of a depthwise route depends on: channels, kernel, dilation, dtype, layout
    and the map's size (rounded, :func:`~mmoverlock.ops.cpu_routes.size_bucket`)."""
    b, c, h, w = x.shape
    return (c, weight.shape[-1], dilation, str(x.dtype).replace('torch.', ''),
            'cl' if memory_format_of(x) == torch.channels_last else 'cf',
            size_bucket(b * h * w), *extra)


def same_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """``F.conv2d`` of a depthwise odd ``K x K`` kernel with 'same' padding. On the CPU the route
    (padding in the call or beforehand, kernel embedded in a larger one) is the fastest measured
    on this machine for the shape, or the fixed default (:mod:`mmoverlock.ops.cpu_routes`); same
    result either way. Neither while tracing nor while counting (:func:`running_as_defined`):
    counters must see the convolution as defined."""
    if CUSTOM_BACKWARD and x.device.type == 'cpu' and not running_as_defined():
        routes = _same_conv_routes(x, weight, bias, dilation)
        default = same_conv_default_route(weight.shape[-1], dilation)
        route = cpu_routes.choose('same_conv', route_key(x, weight, dilation, bias is not None),
                                  routes, default)
        return routes[route]()
    k = weight.shape[-1]
    return F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation,
                    groups=weight.shape[0])


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


def _native_weight_grad(x: Tensor, grad_out: Tensor, weight: Tensor, dilation: int) -> Tensor:
    k = weight.shape[-1]
    pad = dilation * (k - 1) // 2
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [pad, pad], [dilation, dilation], False, [0, 0],
        x.shape[1], [False, True, False])[1]


def weight_grad_default_route(kernel_size: int, dilation: int, pixels: int) -> str:
    """The fixed route of :func:`depthwise_weight_grad`: PyTorch's own for undilated 3x3
    kernels, the FFT for undilated kernels >= ``FFT_MIN_KERNEL`` on maps of at least
    ``FFT_MIN_PIXELS`` pixels, the grouped convolution otherwise."""
    if dilation == 1 and kernel_size <= 3:
        return 'native'
    if dilation == 1 and kernel_size >= FFT_MIN_KERNEL and pixels >= FFT_MIN_PIXELS:
        return 'fft'
    return 'grouped'


def depthwise_weight_grad(x: Tensor, grad_out: Tensor, weight: Tensor, dilation: int,
                          planes: Optional[Tensor] = None) -> Tensor:
    """Weight gradient of ``depthwise_conv2d(x, weight, dilation=dilation)`` for ``grad_out``,
    by PyTorch's own backward, the grouped convolution or the FFT, whichever was measured
    fastest on this machine for the shape (or the fixed default, see
    :mod:`mmoverlock.ops.cpu_routes`); ``planes`` as in :func:`depthwise_weight_grad_grouped`."""
    k = weight.shape[-1]
    routes = {'native': lambda: _native_weight_grad(x, grad_out, weight, dilation),
              'grouped': lambda: depthwise_weight_grad_grouped(x, grad_out, k, dilation, planes)}
    if dilation == 1 and k >= 7:
        routes['fft'] = lambda: depthwise_weight_grad_fft(x, grad_out, k)
    default = weight_grad_default_route(k, dilation, x.shape[-2] * x.shape[-1])
    if x.device.type != 'cpu':
        return routes[default]()
    route = cpu_routes.choose('depthwise_weight_grad',
                              route_key(x, weight, dilation, planes is not None), routes, default)
    return routes[route]()


def in_param_layout(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with exactly ``param``'s strides (a copy only where they differ).

    Strides of size-1 dimensions are arbitrary to PyTorch but not to DDP, which copies gradients
    into buckets laid out like the parameters and warns (and slows down) on any mismatch.
    """
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param, memory_format=torch.preserve_format).copy_(grad)


def _autocast_operands(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Under CPU autocast, the floating-point tensors (float64 aside) in the autocast dtype, as
    autocast casts the operands of a convolution; otherwise the tensors as they are."""
    if not torch.is_autocast_enabled('cpu'):
        return tensors
    dtype = torch.get_autocast_dtype('cpu')
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


class _DepthwiseConv2d(torch.autograd.Function):
    """CPU only. Under autocast it runs in the autocast dtype, as autocast runs convolutions:
    every operand is cast on entry, so the saved tensors, the output and the backward are in one
    dtype, and each gradient goes back in its input's dtype. Not used under torch.compile
    (:func:`depthwise_conv2d`)."""

    @staticmethod
    @custom_fwd(device_type='cpu')
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
        x, weight, bias = _autocast_operands(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return same_conv(x, weight, bias, dilation)

    @staticmethod
    @custom_bwd(device_type='cpu')
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
    # not under torch.compile: the compiler derives the backward itself, and within
    # checkpointed regions it hides the autocast state from the function (whose backward then
    # mixes dtypes)
    if (not (needs_grad and CUSTOM_BACKWARD and x.device.type == 'cpu')
            or torch.compiler.is_compiling()):
        return same_conv(x, weight, bias, dilation)
    return _DepthwiseConv2d.apply(x, weight, bias, dilation)
