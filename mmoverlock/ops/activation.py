"""GELU on channels-last maps through PyTorch's contiguous-tensor kernel.

PyTorch's CPU GELU (forward and backward) runs one kernel on contiguous tensors and another on
every other layout, channels-last NCHW tensors included. The second is slower by a factor that
depends on the data: as fast on values of order 1, several times slower once many inputs are large
(|x| above ~13, where ``exp(-x**2 / 2)`` underflows to denormal numbers, which x86 processors
handle in microcode unless flush-to-zero is on) and its results differ from the first kernel's in
the last bit. A channels-last map permuted to ``(N, H, W, C)`` is an ordinary contiguous tensor
over the same memory, so GELU applied to that view takes the contiguous kernel without a copy: the
same values, bit for bit, as the authors' GELU on contiguous NCHW maps, and the output keeps the
channels-last layout. Elsewhere (other layouts, other ranks, other devices) it is ``F.gelu``.

Figures: ``python benchmarks/ops.py`` (section "GELU"), ``benchmarks/results/ops.md``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['gelu']


def gelu(x: Tensor, approximate: str = 'none') -> Tensor:
    """``F.gelu(x, approximate)``, computed on the contiguous ``(N, H, W, C)`` view when ``x`` is
    a channels-last 4-D map (see the module docstring); differentiable, layout preserved.

    Args:
        x: Any tensor.
        approximate: ``'none'`` (the erf form) or ``'tanh'``, as for ``F.gelu``.
    """
    if (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return F.gelu(x.permute(0, 2, 3, 1), approximate=approximate).permute(0, 3, 1, 2)
    return F.gelu(x, approximate=approximate)
