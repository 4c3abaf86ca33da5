"""GELU on channels-last maps (mmoverlock.ops.gelu): the contiguous kernel, bit for bit the values
of GELU on the authors' contiguous NCHW maps, the layout kept."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_glnet import TINY_G
from test_overlock import TINY
from torch import nn

from mmoverlock.models.backbones.glnet import GLNet
from mmoverlock.models.backbones.overlock import OverLoCK
from mmoverlock.ops import gelu


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
def test_channels_last_gelu_equals_the_nchw_values_bit_for_bit(approximate: str) -> None:
    # large values as well: there PyTorch's other kernel (any non-contiguous layout) differs in
    # the last bit and is slow (denormal intermediates)
    x = torch.randn(2, 24, 9, 11, generator=torch.Generator().manual_seed(0)) * 10
    grad = torch.randn_like(x)
    ref_in = x.clone().requires_grad_(True)
    ref = F.gelu(ref_in, approximate=approximate)
    ref.backward(grad)
    cl_in = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = gelu(cl_in, approximate=approximate)
    out.backward(grad.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, ref)
    assert torch.equal(cl_in.grad, ref_in.grad)


def test_other_layouts_are_plain_gelu() -> None:
    for x in (torch.randn(2, 3, 4, 5) * 10, torch.randn(7, 5) * 10,
              torch.randn(2, 3, 4, 5).transpose(1, 2)):
        assert torch.equal(gelu(x), F.gelu(x))
    # a map whose every layout is contiguous (1x1): no permutation needed
    pooled = torch.randn(2, 8, 1, 1)
    assert torch.equal(gelu(pooled), F.gelu(pooled))


def test_backbones_use_it_everywhere_on_maps() -> None:
    for model in (OverLoCK(TINY), GLNet(TINY_G)):
        plain = [name for name, m in model.named_modules() if type(m) is nn.GELU]
        # GLNet's token MLPs (nn.Linear on (B, L, C) rows) are contiguous anyway
        assert all(name.endswith('mlp.1') for name in plain), plain
