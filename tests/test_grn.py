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


@pytest.mark.parametrize('batch, with_bias', [(1, True), (2, True), (3, False)])
def test_grn_then_1x1_conv_folded_at_inference(batch: int, with_bias: bool) -> None:
    from mmoverlock.ops.grn import grn_pointwise_conv
    from mmoverlock.ops.pointwise_conv import pointwise_conv2d
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 6, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    gamma, beta = (torch.randn(1, 6, 1, 1, generator=gen) for _ in range(2))
    weight = torch.randn(4, 6, 1, 1, generator=gen)
    bias = torch.randn(4, generator=gen) if with_bias else None
    with torch.no_grad():
        expected = pointwise_conv2d(grn(x, gamma, beta), weight, bias)
        got = grn_pointwise_conv(x, gamma, beta, 1e-6, weight, bias)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, expected)  # the fold ran (its rounding differs)
    # with autograd (training), and on NCHW maps: the two operations as they are
    x.requires_grad_()
    torch.testing.assert_close(grn_pointwise_conv(x, gamma, beta, 1e-6, weight, bias),
                               pointwise_conv2d(grn(x, gamma, beta), weight, bias),
                               rtol=0, atol=0)
    with torch.no_grad():
        plain = x.detach().contiguous()
        assert torch.equal(grn_pointwise_conv(plain, gamma, beta, 1e-6, weight, bias),
                           pointwise_conv2d(grn(plain, gamma, beta), weight, bias))


def test_inference_fused_sequential() -> None:
    from mmoverlock.models.layers.basic import InferenceFusedSequential, PointwiseConv2d
    torch.manual_seed(0)
    seq = InferenceFusedSequential(PointwiseConv2d(4, 8), GRN(8), PointwiseConv2d(8, 4))
    torch.nn.init.normal_(seq[1].gamma)
    torch.nn.init.normal_(seq[1].beta)
    plain = torch.nn.Sequential(*seq)
    assert list(seq.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), plain(x), rtol=1e-5, atol=1e-5)
        calls = []
        handle = seq[1].register_forward_hook(lambda *_: calls.append(1))
        hooked = seq(x)
        handle.remove()
        assert calls == [1]  # a hooked GRN runs as a module: the hook sees it
        assert torch.equal(hooked, plain(x))
    assert torch.equal(seq(x), plain(x))  # training / autograd: nn.Sequential itself
