"""1x1 (pointwise) convolution that runs on oneDNN on the CPU, forward and backward.

With one thread, PyTorch sends 1x1 convolutions on the CPU to its own im2col + BLAS route (aten's
backend heuristic assumes it beats oneDNN single-threaded); on this project's CPUs that route runs
at 81-111 GFLOP/s and its backward slower still, while oneDNN's 1x1 kernels reach 189-247 GFLOP/s
(``python benchmarks/ops.py``, ``benchmarks/results/ops.md``). The 1x1 convolutions are about
half of OverLoCK's inference time, so here they have routes of their own:

- forward: ``aten::mkldnn_convolution`` (``'onednn'``) or ``F.conv2d`` (``'aten'``: PyTorch's
  choice, im2col + BLAS with one thread, oneDNN with more);
- input gradient: the same routes, a 1x1 convolution of the output gradient with the transposed
  weight;
- weight gradient: the matrix product ``grad_out^T @ x`` over all pixels, in the channels-last
  layout either posed as a oneDNN 1x1 convolution (``'onednn'``, :func:`weight_grad_onednn`) or
  a BLAS matrix product (``'mm'``); bias gradient: a sum.

Which route is faster depends on the shape, the layout, the processor and even on how busy the
machine is (oneDNN's weight gradient reorders a pixel-long operand on every call, which suffers
most when memory bandwidth is shared): :mod:`mmoverlock.ops.cpu_routes` measures both the first
time a shape is seen, or takes the fixed defaults ``FORWARD_DEFAULT_ROUTE`` /
``WEIGHT_GRAD_DEFAULT_ROUTE``. Neither route slows down on AVX2 relative to the other; the
figures are in ``benchmarks/results/routes_pointwise.md``.

Other devices and dtypes, autocast, JIT tracing (so that FLOP counters see an ordinary
convolution) and ``torch.compile`` (which cannot trace the oneDNN operator) keep ``F.conv2d``:
under autocast that is autocast's own lower-precision convolution. The autograd function itself,
called under CPU autocast, runs in float32 (its operands cast on entry), the dtype its oneDNN
route is written for.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd

from . import cpu_routes
from .cpu_routes import size_bucket
from .depthwise_conv import in_param_layout

__all__ = ['pointwise_conv2d', 'uses_onednn', 'weight_grad_onednn', 'weight_grad_rows',
           'conv1x1_routed', 'pointwise_route_key', 'ONEDNN', 'FORWARD_DEFAULT_ROUTE',
           'WEIGHT_GRAD_DEFAULT_ROUTE']

#: False sends every call to ``F.conv2d`` (the benchmarks' baseline).
ONEDNN = True
#: The fixed routes (no measuring, see :mod:`mmoverlock.ops.cpu_routes`): oneDNN for both, 1.6-1.9x
#: faster forward + backward than PyTorch's 1x1 convolution on an idle AVX-512 Xeon
#: (``benchmarks/results/ops.md``); neither route collapses on AVX2.
FORWARD_DEFAULT_ROUTE = 'onednn'
WEIGHT_GRAD_DEFAULT_ROUTE = 'onednn'


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`pointwise_conv2d` takes the oneDNN route for these operands."""
    # first: aten::mkldnn_convolution has no fake-tensor kernel, so dynamo cannot trace it (nor
    # torch.backends.mkldnn.is_available, which it skips)
    return (ONEDNN and not torch.compiler.is_compiling()
            and x.device.type == 'cpu' and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() == 4
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled('cpu')
            and not torch.jit.is_tracing() and not torch.jit.is_scripting())


def _onednn_conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, [0, 0], [1, 1], [1, 1], 1)


def _layout(x: Tensor) -> str:
    if x.is_contiguous():
        return 'cf'
    return 'cl' if x.is_contiguous(memory_format=torch.channels_last) else 'strided'


def pointwise_route_key(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple:
    """What the speed of a 1x1 convolution route depends on: input and output channels, dtype,
    layout (``'cf'``, ``'cl'`` or ``'strided'``, e.g. a channel slice of a channels-last map),
    bias, and the pixel count (rounded, :func:`~mmoverlock.ops.cpu_routes.size_bucket`).

    Args:
        x: ``(B, C, H, W)`` input.
        weight: ``(O, C, 1, 1)`` weight.
        bias: ``(O,)`` bias or None.
    """
    b, c, h, w = x.shape
    return (c, weight.shape[0], str(x.dtype).replace('torch.', ''), _layout(x),
            size_bucket(b * h * w), bias is not None)


def _conv1x1_routes(x: Tensor, weight: Tensor,
                    bias: Optional[Tensor]) -> dict[str, Callable[[], Tensor]]:
    return {'onednn': lambda: _onednn_conv1x1(x, weight, bias),
            'aten': lambda: F.conv2d(x, weight, bias)}


def conv1x1_routed(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.conv2d(x, weight, bias)`` of a 1x1 kernel by the route chosen for the shape
    (``'onednn'`` or ``'aten'``, see the module docstring); no autograd function of its own.

    Args:
        x: ``(B, C, H, W)`` float32 CPU input, either layout.
        weight: ``(O, C, 1, 1)`` weight.
        bias: ``(O,)`` bias or None.
    """
    routes = _conv1x1_routes(x, weight, bias)
    route = cpu_routes.choose('pointwise_conv', pointwise_route_key(x, weight, bias), routes,
                              FORWARD_DEFAULT_ROUTE)
    return routes[route]()


def _pixel_rows(t: Tensor) -> Tensor:
    """``(B*H*W, C)`` rows of a map whose channels are innermost (a view of a channels-last map,
    a copy of a channel slice of one)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def weight_grad_onednn(grad_rows: Tensor, x_rows: Tensor) -> Tensor:
    """``grad_rows.t() @ x_rows`` (``(O, N) @ (N, C)``, N pixels) as one oneDNN 1x1 convolution.

    The product is posed as a convolution whose N input channels are the pixels: the operand with
    fewer columns is transposed into the "weight" (one copy) and the other is read as a ``1 x N x 1
    x cols`` input. On CPUs where the BLAS ``mm`` runs at ~100 GFLOP/s this is 1.2-1.7x faster.
    """
    n, out_ch = grad_rows.shape
    in_ch = x_rows.shape[1]
    if in_ch <= out_ch:  # (C, N) weight times the (N, O) input -> (C, O), transposed back
        prod = _onednn_conv1x1(grad_rows.view(1, n, 1, out_ch),
                               x_rows.t().contiguous().view(in_ch, n, 1, 1), None)
        return prod.view(in_ch, out_ch).t()
    prod = _onednn_conv1x1(x_rows.view(1, n, 1, in_ch),
                           grad_rows.t().contiguous().view(out_ch, n, 1, 1), None)
    return prod.view(out_ch, in_ch)


def _weight_grad_routes(grad_rows: Tensor, x_rows: Tensor) -> dict[str, Callable[[], Tensor]]:
    return {'onednn': lambda: weight_grad_onednn(grad_rows, x_rows),
            'mm': lambda: grad_rows.t() @ x_rows}


def weight_grad_rows(grad_rows: Tensor, x_rows: Tensor) -> Tensor:
    """``grad_rows.t() @ x_rows`` by the route chosen for the shape: :func:`weight_grad_onednn`
    (``'onednn'``) or the BLAS product (``'mm'``).

    Args:
        grad_rows: ``(N, O)`` output gradient, a row per pixel.
        x_rows: ``(N, C)`` input, a row per pixel.

    Returns:
        ``(O, C)`` weight gradient.
    """
    n, out_ch = grad_rows.shape
    key = (out_ch, x_rows.shape[1], str(x_rows.dtype).replace('torch.', ''), size_bucket(n))
    routes = _weight_grad_routes(grad_rows, x_rows)
    route = cpu_routes.choose('pointwise_weight_grad', key, routes, WEIGHT_GRAD_DEFAULT_ROUTE)
    return routes[route]()


class _OneDNNPointwiseConv(torch.autograd.Function):

    @staticmethod
    @custom_fwd(device_type='cpu', cast_inputs=torch.float32)  # the CPU float32 route only
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv1x1_routed(x, weight, bias)

    @staticmethod
    @custom_bwd(device_type='cpu')
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        # channels innermost (channels-last maps and channel slices of them): pixel-row GEMMs
        channels_last = x.stride(1) == 1 and not x.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        if need_x:
            grad_x = conv1x1_routed(grad_out, weight.transpose(0, 1).contiguous(), None)
        if need_w:
            if channels_last:
                grad_w = weight_grad_rows(_pixel_rows(grad_out), _pixel_rows(x))
            else:  # per image (O, HW) @ (HW, C), summed over the batch
                grad_w = torch.bmm(grad_out.flatten(2), x.flatten(2).transpose(1, 2)).sum(0)
            grad_w = in_param_layout(grad_w.reshape(weight.shape), weight)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b


def pointwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a ``(O, C, 1, 1)`` weight, on oneDNN where it applies.

    Args:
        x: ``(B, C, H, W)`` input, either memory layout (the output keeps it).
        weight: ``(O, C, 1, 1)`` weight.
        bias: ``(O,)`` bias or None.

    Returns:
        ``(B, O, H, W)`` output.
    """
    if not torch.jit.is_tracing() and (weight.dim() != 4 or weight.shape[2:] != (1, 1)):
        raise ValueError(f'pointwise_conv2d needs a (O, C, 1, 1) weight, got {tuple(weight.shape)}')
    if not uses_onednn(x, weight):
        return F.conv2d(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNPointwiseConv.apply(x, weight, bias)
    return conv1x1_routed(x, weight, bias)
