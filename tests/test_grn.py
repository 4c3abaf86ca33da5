"""GRN's hand-written backward against autograd through the ConvNeXt-V2 formula."""
from __future__ import annotations

import pytest
import torch

from mmoverlock.models.layers import GRN
from mmoverlock.ops.grn import grn


def convnext_v2_grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:
    """The definition as the ConvNeXt-V2 paper writes it (L2 norm over H, W)."""
    g = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)
    n = g / (g.mean(dim=1, keepdim=True) + eps)
    return gamma * (x * n) + beta + x


def _leaves(channels_last: bool, dtype: torch.dtype = torch.float64):
    torch.manual_seed(int(channels_last))
    x = torch.randn(2, 5, 6, 7, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(1, 5, 1, 1, dtype=dtype)
    beta = torch.randn(1, 5, 1, 1, dtype=dtype)
    return [t.requires_grad_() for t in (x, gamma, beta)]


@pytest.mark.parametrize('channels_last', [False, True])
def test_forward_and_gradients_match_the_definition(channels_last: bool) -> None:
    x, gamma, beta = _leaves(channels_last)
    grad = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    out = grn(x, gamma, beta)
    expected = convnext_v2_grn(x, gamma, beta)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    got = torch.autograd.grad(out, (x, gamma, beta), grad)
    want = torch.autograd.grad(expected, (x, gamma, beta), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)


@pytest.mark.parametrize('channels_last', [False, True])
def test_gradcheck_with_an_all_zero_channel(channels_last: bool) -> None:
    x, gamma, beta = _leaves(channels_last)
    with torch.no_grad():
        x[0, 1] = 0  # the clamp: finite, zero gradient through that channel's norm
    assert torch.autograd.gradcheck(grn, (x, gamma, beta))
    out = grn(x, gamma, beta)
    (grad_x,) = torch.autograd.grad(out.sum(), (x,))
    assert torch.isfinite(grad_x).all()


def test_module_uses_it() -> None:
    module = GRN(5)
    torch.nn.init.normal_(module.gamma)
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    out = module(x)
    assert type(out.grad_fn).__name__ == '_GRNBackward'
    torch.testing.assert_close(out, convnext_v2_grn(x, module.gamma, module.beta),
                               atol=1e-5, rtol=1e-5)
