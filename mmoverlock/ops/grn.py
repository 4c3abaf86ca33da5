"""Global response normalisation (ConvNeXt-V2) with a hand-written backward.

    q = max(sum_{h,w} x^2, 1e-24),  g = sqrt(q),  n = g / (mean_c(g) + eps)
    out = x * (1 + gamma * n) + beta

GRN sits on the 4x-wide maps of every OverLoCK MLP. Autograd through the formula makes about eight
passes over such a map in the backward (the square's backward, the broadcast sums, the scale);
the gradient written out needs three: ``S = sum_hw(grad * x)``, ``sum(grad)`` and
``grad_x = grad * (1 + gamma * n) + x * coef`` with a per-(image, channel) ``coef``:

    dn = gamma * S
    dg = dn / (m + eps) - sum_c(dn * g) / (C * (m + eps)^2)       (m = mean_c(g))
    coef = dg / g  where q > 1e-24, else 0                         (the clamp's zero gradient)
    d gamma = sum_b(n * S),  d beta = sum_{b,h,w}(grad)

Under autocast (CPU or CUDA) GRN runs in float32, as autocast runs norms and reductions: the
squared sums over a map overflow float16 (max 65504) and lose digits in bfloat16; the operands
are cast to float32 on entry, the output is float32 and each gradient goes back in the dtype of
its input.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd

from .depthwise_conv import in_param_layout, memory_format_of, running_as_defined
from .pointwise_conv import pointwise_conv2d

__all__ = ['grn', 'grn_pointwise_conv']

_MIN_SQUARE_SUM = 1e-24  # keeps the gradient finite for an all-zero channel


def _response(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, g, n)`` of the module docstring, each ``(B, C, 1, 1)``."""
    # sqrt of a sum of squares: 5-15x faster than linalg.vector_norm on channels-last maps
    q = x.square().sum(dim=(2, 3), keepdim=True).clamp_min(_MIN_SQUARE_SUM)
    g = q.sqrt()
    return q, g, g / (g.mean(dim=1, keepdim=True) + eps)


class _GRN(torch.autograd.Function):

    # float32 under autocast, on either device (the decorators act each on their own device's
    # tensors and autocast state, so they stack)
    @staticmethod
    @custom_fwd(device_type='cuda', cast_inputs=torch.float32)
    @custom_fwd(device_type='cpu', cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
        q, g, n = _response(x, eps)
        ctx.save_for_backward(x, gamma, q, g, n)
        ctx.eps = eps
        # x * (1 + gamma * n) + beta in one pass over x
        return torch.addcmul(beta, x, torch.addcmul(torch.ones_like(n), gamma, n))

    @staticmethod
    @custom_bwd(device_type='cuda')
    @custom_bwd(device_type='cpu')
    def backward(ctx, grad: Tensor):
        x, gamma, q, g, n = ctx.saved_tensors
        grad = grad.contiguous(memory_format=memory_format_of(x))
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        s = (grad * x).sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        grad_x = grad_gamma = grad_beta = None
        if need_x:
            denom = g.mean(dim=1, keepdim=True) + ctx.eps
            dn = gamma * s
            dg = dn / denom - (dn * g).sum(dim=1, keepdim=True) / (g.shape[1] * denom ** 2)
            coef = torch.where(q > _MIN_SQUARE_SUM, dg / g, torch.zeros_like(dg))
            grad_x = (grad * torch.addcmul(torch.ones_like(n), gamma, n)).addcmul_(x, coef)
        if need_gamma:
            grad_gamma = in_param_layout((n * s).sum(dim=0, keepdim=True), gamma)
        if need_beta:
            grad_beta = in_param_layout(grad.sum(dim=(0, 2, 3), keepdim=True), gamma)  # same shape
        return grad_x, grad_gamma, grad_beta, None


def grn(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-6) -> Tensor:
    """GRN of a ``(B, C, H, W)`` map with ``(1, C, 1, 1)`` ``gamma`` and ``beta``.

    Args:
        x: Input map, either memory layout (the output keeps it).
        gamma: Scale of the normalised response.
        beta: Bias.
        eps: Added to the channel mean of the norms.

    Returns:
        ``x * (1 + gamma * n) + beta``, see the module docstring.
    """
    return _GRN.apply(x, gamma, beta, eps)



def grn_pointwise_conv(x: Tensor, gamma: Tensor, beta: Tensor, eps: float, weight: Tensor,
                       bias: Tensor | None) -> Tensor:
    """``conv1x1(grn(x, gamma, beta, eps), weight, bias)`` without forming GRN's output.

    GRN scales each (image, channel) of ``x`` by ``s = 1 + gamma * n`` and adds ``beta``; a 1x1
    convolution after it is linear, so ``W (s * x + beta) + b = (W diag(s)) x + (W beta + b)``:
    the scale goes into the weight (per image) and ``beta`` into the bias, and the map is read
    once for GRN's statistics and once by the convolution instead of being scaled into a new
    map in between. Used at inference (no autograd: the function is not differentiable through
    the fold) on float32 CPU maps, not while operators are counted or traced
    (:func:`~mmoverlock.ops.depthwise_conv.as_defined`, JIT, ``torch.compile``); elsewhere it is
    the two operations one after the other. The results differ from them by float rounding only.

    Args:
        x: ``(B, C, H, W)`` map.
        gamma, beta: GRN's ``(1, C, 1, 1)`` parameters; ``eps`` its epsilon.
        weight: ``(O, C, 1, 1)`` weight of the convolution; ``bias``: ``(O,)`` or None.
    """
    if (torch.is_grad_enabled() or x.device.type != 'cpu' or x.dtype != torch.float32
            or torch.is_autocast_enabled('cpu') or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last)
            or running_as_defined() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return pointwise_conv2d(grn(x, gamma, beta, eps), weight, bias)
    b, c, h, w = x.shape
    out_ch = weight.shape[0]
    _, _, n = _response(x, eps)
    scale = torch.addcmul(torch.ones_like(n), gamma, n).view(b, 1, c)  # s per (image, channel)
    w2d = weight.view(out_ch, c)
    folded_bias = w2d @ beta.view(c)
    if bias is not None:
        folded_bias = folded_bias + bias
    if b == 1:
        return pointwise_conv2d(x, (w2d * scale[0]).view(out_ch, c, 1, 1), folded_bias)
    # per-image weights: one batched product over the pixel rows of the channels-last map
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    out = torch.baddbmm(folded_bias.view(1, 1, out_ch), rows, (w2d * scale).transpose(1, 2))
    return out.view(b, h, w, out_ch).permute(0, 3, 1, 2)
