"""Sum of parallel depthwise convolutions of one input, each followed by a training-mode BatchNorm.

This is the training form of a dilated re-parameterisable block (one large kernel and several
small / dilated branches, each with its own BatchNorm, summed). Run as separate modules, autograd
keeps one node per conv, BN and sum and the backward transposes the shared input once per branch
for the weight gradients. As one function:

- forward: each branch's conv and BN in turn, the BN outputs summed in place;
- backward: the BN backward of each branch, its input gradient accumulated in place, and every
  branch's weight gradient read from one set of zero-padded NCHW planes of the input
  (:func:`~mmoverlock.ops.depthwise_conv.padded_planes`).

Same values and running statistics as the modules (BatchNorm's own kernels do the arithmetic).
Measured on 2x64x128x128 with the 17x17 kernel's six branches, forward + backward: 136 ms as
modules, 116 ms fused (1 thread, one-off measurement); 2x256x32x32 13x13: 27.2 vs 24.5 ms.

Under CPU autocast the function runs in float32 (operands cast on entry, float32 output): the
batch statistics are reductions, which autocast keeps in float32. The model's blocks do not call
it under autocast; they run their branches as modules there, with the convolutions in the
autocast dtype (:class:`~mmoverlock.models.layers.DilatedReparamBlock`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd

from .depthwise_conv import (
    depthwise_weight_grad,
    in_param_layout,
    memory_format_of,
    padded_planes,
    same_conv,
)

__all__ = ['conv_bn_sum']


class _ConvBNSum(torch.autograd.Function):

    @staticmethod
    @custom_fwd(device_type='cpu', cast_inputs=torch.float32)  # the CPU-only fused route
    def forward(ctx, x: Tensor, dilations: tuple[int, ...], momenta: tuple[float, ...],
                eps: tuple[float, ...], *tensors: Tensor) -> Tensor:
        n = len(dilations)
        weights, gammas, betas = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n]
        means, variances = tensors[3 * n:4 * n], tensors[4 * n:]
        out, saved = None, []
        for i in range(n):
            y = same_conv(x, weights[i], None, dilations[i])
            z, mean, invstd = torch.native_batch_norm(y, gammas[i], betas[i], means[i],
                                                      variances[i], True, momenta[i], eps[i])
            out = z if out is None else out.add_(z)
            saved += [y, mean, invstd]
        ctx.dilations, ctx.eps = dilations, eps
        ctx.save_for_backward(x, *weights, *gammas, *saved)
        return out

    @staticmethod
    @custom_bwd(device_type='cpu')
    def backward(ctx, grad: Tensor):
        n = len(ctx.dilations)
        x, *rest = ctx.saved_tensors
        weights, gammas, saved = rest[:n], rest[n:2 * n], rest[2 * n:]
        grad = grad.contiguous(memory_format=memory_format_of(x))
        need_w = ctx.needs_input_grad[4:4 + n]
        need_affine = ctx.needs_input_grad[4 + n:4 + 3 * n]
        pads = [d * (w.shape[-1] - 1) // 2 for d, w in zip(ctx.dilations, weights)]
        planes = padded_planes(x, max(pads)) if any(need_w) else None
        grad_x, grad_ws, grad_gammas, grad_betas = None, [], [], []
        for i, (d, w) in enumerate(zip(ctx.dilations, weights)):
            y, mean, invstd = saved[3 * i:3 * i + 3]
            grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
                grad, y, gammas[i], None, None, mean, invstd, True, ctx.eps[i],
                [True, need_affine[i], need_affine[n + i]])
            if ctx.needs_input_grad[0]:
                # the transposed convolution = correlation with the flipped kernel
                part = same_conv(grad_y, w.flip(-1, -2), None, d)
                grad_x = part if grad_x is None else grad_x.add_(part)
            grad_ws.append(in_param_layout(depthwise_weight_grad(x, grad_y, w, d, planes), w)
                           if need_w[i] else None)
            grad_gammas.append(grad_gamma)
            grad_betas.append(grad_beta)
        return (grad_x, None, None, None, *grad_ws, *grad_gammas, *grad_betas,
                *([None] * (2 * n)))


def conv_bn_sum(x: Tensor, weights: Sequence[Tensor], dilations: Sequence[int],
                gammas: Sequence[Tensor], betas: Sequence[Tensor],
                running_means: Sequence[Tensor], running_vars: Sequence[Tensor],
                momenta: Sequence[float], eps: Sequence[float]) -> Tensor:
    """``sum_i batch_norm(depthwise_conv(x, weights[i], dilations[i]), ...)`` in training mode.

    Args:
        x: ``(B, C, H, W)`` input, either memory layout (the output keeps it).
        weights: ``(C, 1, K_i, K_i)`` depthwise kernels, K_i odd ('same' padding).
        dilations: Dilation of each kernel.
        gammas: BatchNorm weights ``(C,)``.
        betas: BatchNorm biases ``(C,)``.
        running_means: Running means ``(C,)``, updated in place.
        running_vars: Running variances ``(C,)``, updated in place.
        momenta: The running-average factor of each BatchNorm for this step (as
            ``nn.BatchNorm2d`` computes it).
        eps: Each BatchNorm's ``eps``.

    Returns:
        ``(B, C, H, W)`` sum of the normalised branches.
    """
    n = len(weights)
    if not all(len(seq) == n for seq in (dilations, gammas, betas, running_means, running_vars,
                                         momenta, eps)):
        raise ValueError('conv_bn_sum needs one dilation, BatchNorm parameter set and momentum '
                         f'per kernel ({n} kernels)')
    stats = (*running_means, *running_vars)
    if torch.is_autocast_enabled('cpu') and any(t.dtype != torch.float32 for t in stats):
        # a cast copy would take the in-place update and drop it
        raise ValueError('conv_bn_sum runs in float32 under CPU autocast and updates the running '
                         'statistics in place, so they must be float32; got '
                         f'{sorted({str(t.dtype) for t in stats})}. Keep the BatchNorm buffers in '
                         'float32 (autocast does not need a converted model).')
    return _ConvBNSum.apply(x, tuple(dilations), tuple(momenta), tuple(eps), *weights, *gammas,
                            *betas, *running_means, *running_vars)
