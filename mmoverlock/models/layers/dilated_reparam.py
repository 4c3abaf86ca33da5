"""Dilated re-parameterisable large-kernel depthwise conv (the UniRepLKNet design OverLoCK uses).

Training form: a KxK depthwise conv plus several small dilated depthwise convs, each followed by BN,
summed (on the CPU, with plain training-mode BNs, run as one function:
:func:`mmoverlock.ops.conv_bn_sum`). Deploy form: one KxK depthwise conv with bias computing the
same function in eval mode. The conversion is built from small pure functions (BN folding,
dilated-to-dense kernels, centred padding). In eval mode without autograd the training form
merges its branches on the fly into the deploy kernel, except inside :func:`separate_branches`.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import conv_bn_sum, depthwise_conv2d
from ...ops import depthwise_conv as _depthwise_conv
from .basic import DepthwiseConv2d

#: (kernel sizes, dilations) of the parallel dilated branches for each large kernel size.
DILATED_BRANCHES: dict[int, tuple[Sequence[int], Sequence[int]]] = {
    19: ((5, 7, 9, 9, 3, 3, 3), (1, 1, 1, 2, 4, 5, 7)),
    17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
    13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    11: ((5, 7, 5, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    9: ((5, 7, 5, 3, 3), (1, 1, 2, 3, 4)),
    7: ((5, 3, 3, 3), (1, 1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


_SEPARATE = threading.local()


@contextmanager
def separate_branches() -> Iterator[None]:
    """Within this context (in this thread) training-form blocks never merge their branches at
    inference: every branch's conv and BN runs on its own, as the training form is defined (what
    ``tools/analysis/get_flops.py --train-form`` counts). Same values up to rounding."""
    _SEPARATE.depth = getattr(_SEPARATE, 'depth', 0) + 1
    try:
        yield
    finally:
        _SEPARATE.depth -= 1


def fuse_conv_bn(kernel: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BN that follows a conv into the conv's kernel and bias."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    conv_bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return kernel * scale.view(-1, 1, 1, 1), bn.bias + (conv_bias - bn.running_mean) * scale


def dilate_kernel(kernel: Tensor, dilation: int) -> Tensor:
    """The dense kernel of size ``r*(k-1)+1`` equivalent to ``kernel`` applied with dilation r."""
    if dilation == 1:
        return kernel
    k = kernel.shape[-1]
    size = dilation * (k - 1) + 1
    dense = kernel.new_zeros(*kernel.shape[:-2], size, size)
    dense[..., ::dilation, ::dilation] = kernel
    return dense


def pad_kernel_to(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a square kernel to ``size x size``, keeping it centred."""
    pad = (size - kernel.shape[-1]) // 2
    if pad < 0:
        raise ValueError(f'kernel of size {kernel.shape[-1]} does not fit into {size}')
    return F.pad(kernel, [pad] * 4)


class DilatedReparamBlock(nn.Module):
    """Large-kernel depthwise conv with parallel dilated branches, re-parameterisable.

    Args:
        channels: Number of channels (depthwise).
        kernel_size: The large kernel size K; one of ``DILATED_BRANCHES``.
        deploy: Build the single-conv deploy form directly.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f'DilatedReparamBlock supports kernel sizes '
                             f'{sorted(DILATED_BRANCHES)}, got {kernel_size}')
        self.channels = channels
        self.kernel_size = kernel_size
        self.deploy = deploy
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                   groups=channels, bias=deploy)
        self.branches: list[tuple[int, int]] = []
        if deploy:
            return
        self.origin_bn = nn.BatchNorm2d(channels)
        for k, r in zip(*DILATED_BRANCHES[kernel_size]):
            self.branches.append((k, r))
            self.add_module(f'dil_conv_k{k}_{r}',
                            DepthwiseConv2d(channels, k, dilation=r, bias=False))
            self.add_module(f'dil_bn_k{k}_{r}', nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return depthwise_conv2d(x, self.lk_origin.weight, self.lk_origin.bias)
        if self._merge_at_inference():
            # In eval mode the branches and their BNs are one linear map: the deploy kernel
            # replaces 1 + len(branches) convs and BNs (built once, until a parameter changes).
            return depthwise_conv2d(x, *self._inference_kernel_bias())
        # a forward with batch statistics updates the BNs' running statistics in place, which
        # PyTorch's batch norm does without counting a new version: drop the merged kernel
        self.__dict__.pop('_merged', None)
        if self._fuse_in_training(x):
            return self._forward_fused(x)
        out = self.origin_bn(depthwise_conv2d(x, self.lk_origin.weight))
        for k, r in self.branches:
            out = out + getattr(self, f'dil_bn_k{k}_{r}')(getattr(self, f'dil_conv_k{k}_{r}')(x))
        return out

    def _branch_modules(self) -> tuple[list[nn.Conv2d], list[nn.BatchNorm2d], list[int]]:
        convs = [self.lk_origin] + [getattr(self, f'dil_conv_k{k}_{r}') for k, r in self.branches]
        bns = [self.origin_bn] + [getattr(self, f'dil_bn_k{k}_{r}') for k, r in self.branches]
        return convs, bns, [1] + [r for _, r in self.branches]

    def _fuse_in_training(self, x: Tensor) -> bool:
        """Training on the CPU with plain, training-mode BatchNorms (not SyncBN, not frozen):
        the branches run as one function (:func:`mmoverlock.ops.conv_bn_sum`). Not under
        autocast: that function computes in float32, the modules run the convolutions in the
        autocast dtype."""
        if not (torch.is_grad_enabled() and x.device.type == 'cpu' and x.dtype == torch.float32
                and not torch.is_autocast_enabled('cpu')
                and _depthwise_conv.CUSTOM_BACKWARD and not torch.jit.is_tracing()):
            return False
        return all(type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats
                   for bn in self._branch_modules()[1])

    def _forward_fused(self, x: Tensor) -> Tensor:
        convs, bns, dilations = self._branch_modules()
        momenta = []
        for bn in bns:  # nn.BatchNorm2d's bookkeeping of the running averages
            bn.num_batches_tracked.add_(1)
            momenta.append(1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                           else bn.momentum)
        return conv_bn_sum(x, [c.weight for c in convs], dilations, [bn.weight for bn in bns],
                           [bn.bias for bn in bns], [bn.running_mean for bn in bns],
                           [bn.running_var for bn in bns], momenta, [bn.eps for bn in bns])

    def _inference_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """:meth:`equivalent_kernel_bias`, kept until what it is made of changes: a parameter
        or statistic updated in place (an optimizer step, a load), moved to another device or
        dtype (the key: address, version, dtype and device of each), or a forward of this block
        with batch statistics (:meth:`forward` drops it). The merge is some fifty small
        operations, not worth redoing per call. The cache holds the tensors it was made from,
        so that their memory, and with it the addresses in the key, cannot be reused while it
        stands."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self.equivalent_kernel_bias()
        convs, bns, _ = self._branch_modules()
        sources = [c.weight for c in convs] + [t for bn in bns for t in (
            bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        cached = self.__dict__.get('_merged')
        if cached is None or cached[0] != key:
            kernel, bias = self.equivalent_kernel_bias()
            self.__dict__['_merged'] = cached = (key, kernel, bias,
                                                 [t.detach() for t in sources])
        return cached[1], cached[2]

    def _merge_at_inference(self) -> bool:
        """Inference (no autograd) with every BN using its running statistics, outside
        :func:`separate_branches`."""
        if getattr(_SEPARATE, 'depth', 0) > 0:
            return False
        return not torch.is_grad_enabled() and not any(
            m.training for m in self.modules() if isinstance(m, nn.BatchNorm2d))

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The single KxK kernel and bias that reproduce the training form in eval mode."""
        kernel, bias = fuse_conv_bn(self.lk_origin.weight, None, self.origin_bn)
        for k, r in self.branches:
            branch_kernel, branch_bias = fuse_conv_bn(
                getattr(self, f'dil_conv_k{k}_{r}').weight, None, getattr(self, f'dil_bn_k{k}_{r}'))
            kernel = kernel + pad_kernel_to(dilate_kernel(branch_kernel, r), self.kernel_size)
            bias = bias + branch_bias
        return kernel, bias

    def reparameterize(self) -> None:
        """Switch to the deploy form in place (one conv with bias)."""
        if self.deploy:
            return
        kernel, bias = self.equivalent_kernel_bias()
        conv = nn.Conv2d(self.channels, self.channels, self.kernel_size,
                         padding=self.kernel_size // 2, groups=self.channels, bias=True)
        conv = conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.data.copy_(kernel)
        conv.bias.data.copy_(bias)
        self.lk_origin = conv
        del self.origin_bn
        for k, r in self.branches:
            delattr(self, f'dil_conv_k{k}_{r}')
            delattr(self, f'dil_bn_k{k}_{r}')
        self.branches = []
        self.deploy = True
