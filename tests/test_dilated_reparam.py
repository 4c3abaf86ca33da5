"""Structural re-parameterisation of the dilated large-kernel block, piece by piece."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmoverlock.models.layers.dilated_reparam import (
    DILATED_BRANCHES,
    DilatedReparamBlock,
    dilate_kernel,
    fuse_conv_bn,
    pad_kernel_to,
)


def test_dilate_kernel_is_equivalent_to_dilated_conv() -> None:
    x = torch.randn(1, 3, 20, 20)
    kernel = torch.randn(3, 1, 3, 3)
    dense = dilate_kernel(kernel, 4)
    assert dense.shape[-1] == 9
    dilated = F.conv2d(x, kernel, padding=4, dilation=4, groups=3)
    assert torch.allclose(F.conv2d(x, dense, padding=4, groups=3), dilated, atol=1e-5)


def test_pad_kernel_keeps_it_centred() -> None:
    kernel = torch.randn(2, 1, 3, 3)
    padded = pad_kernel_to(kernel, 7)
    assert torch.equal(padded[..., 2:5, 2:5], kernel)
    border = padded.clone()
    border[..., 2:5, 2:5] = 0
    assert not border.any()
    with pytest.raises(ValueError):
        pad_kernel_to(kernel, 1)


def test_fuse_conv_bn() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    bn.eval()
    kernel, bias = fuse_conv_bn(conv.weight, None, bn)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(F.conv2d(x, kernel, bias, padding=1, groups=4), bn(conv(x)), atol=1e-5)


@pytest.mark.parametrize('kernel_size', sorted(DILATED_BRANCHES))
def test_reparameterize_every_kernel_size(kernel_size: int) -> None:
    torch.manual_seed(kernel_size)
    block = DilatedReparamBlock(6, kernel_size)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    block.eval()
    x = torch.randn(2, 6, kernel_size + 5, kernel_size + 2)
    expected = block(x).detach()  # with autograd: every branch and BN run separately
    with torch.no_grad():
        merged_on_the_fly = block(x)  # inference: the equivalent kernel, built on the fly
        block.reparameterize()
        got = block(x)
    assert block.deploy and not hasattr(block, 'origin_bn')
    assert set(dict(block.named_parameters())) == {'lk_origin.weight', 'lk_origin.bias'}
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(merged_on_the_fly, expected, atol=1e-5)


def test_branches_run_separately_whenever_a_bn_uses_batch_statistics() -> None:
    block = DilatedReparamBlock(4, 7).train()
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        out = block(x)  # training BNs: batch statistics, no single equivalent kernel
    expected = sum(
        F.batch_norm(conv(x), None, None, training=True, eps=bn.eps)
        for conv, bn in [(block.lk_origin, block.origin_bn)] + [
            (getattr(block, f'dil_conv_k{k}_{r}'), getattr(block, f'dil_bn_k{k}_{r}'))
            for k, r in block.branches])
    assert torch.allclose(out, expected, atol=1e-5)


def test_unknown_kernel_size() -> None:
    with pytest.raises(ValueError, match='supports kernel sizes'):
        DilatedReparamBlock(4, 21)


def test_inference_kernel_is_kept_until_a_source_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    block = DilatedReparamBlock(4, 9).eval()
    merges = []
    original = DilatedReparamBlock.equivalent_kernel_bias

    def counting(self):
        merges.append(1)
        return original(self)

    monkeypatch.setattr(DilatedReparamBlock, 'equivalent_kernel_bias', counting)
    x = torch.randn(1, 4, 12, 12)

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return block(x)

    def fresh() -> torch.Tensor:  # a copy with autograd: branches one by one, no cache
        return copy.deepcopy(block)(x).detach()

    first = infer()
    assert torch.equal(infer(), first) and len(merges) == 1  # reused
    with torch.no_grad():
        block.dil_conv_k5_1.weight.add_(0.1)  # an optimizer step
    assert torch.allclose(infer(), fresh(), atol=1e-5) and len(merges) == 2
    block.train()
    block(x)  # a training step updates the BN statistics
    block.eval()
    assert torch.allclose(infer(), fresh(), atol=1e-5) and len(merges) == 3
    infer()
    state = {k: v + 0.05 if v.is_floating_point() else v for k, v in block.state_dict().items()}
    block.load_state_dict(state)  # in place: new versions
    assert torch.allclose(infer(), fresh(), atol=1e-5) and len(merges) == 4
    block.double()
    assert infer_dtype(block, x.double()) == torch.float64 and len(merges) == 5


def infer_dtype(block: DilatedReparamBlock, x: torch.Tensor) -> torch.dtype:
    with torch.no_grad():
        return block(x).dtype
