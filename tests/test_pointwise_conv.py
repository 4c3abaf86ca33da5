"""The 1x1 convolution on oneDNN against F.conv2d, its routing, and its place in recomputation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmoverlock.models.layers import PointwiseConv2d
from mmoverlock.models.utils.recompute import save_dense_products
from mmoverlock.ops import pointwise_conv, pointwise_conv2d
from mmoverlock.ops.pointwise_conv import uses_onednn, weight_grad_onednn


@pytest.mark.parametrize('in_ch,out_ch', [(6, 10), (10, 6)])  # both branches of the weight grad
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('bias', [False, True])
def test_matches_conv2d_forward_and_backward(in_ch: int, out_ch: int, channels_last: bool,
                                             bias: bool) -> None:
    torch.manual_seed(in_ch + 2 * channels_last + bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, in_ch, 7, 9).contiguous(memory_format=fmt)
    weight = torch.randn(out_ch, in_ch, 1, 1)
    b = torch.randn(out_ch) if bias else None
    grad = torch.randn(2, out_ch, 7, 9)
    results = []
    for fn in (F.conv2d, pointwise_conv2d):
        leaves = [t.clone().requires_grad_() for t in (x, weight, b) if t is not None]
        out = fn(*leaves) if bias else fn(*leaves, None)
        out.backward(grad)
        results.append((out, *[t.grad for t in leaves]))
        if fn is pointwise_conv2d:
            # parameter gradients in the parameters' layout (DDP's buckets expect it)
            assert all(t.grad.stride() == t.stride() for t in leaves[1:])
            assert type(out.grad_fn).__name__ == '_OneDNNPointwiseConvBackward'
            assert out.is_contiguous(memory_format=fmt)
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_channel_slice_of_a_channels_last_map() -> None:
    # OverLoCK's dynamic blocks feed 1x1 convs with channel slices of channels-last maps
    torch.manual_seed(3)
    full = torch.randn(2, 12, 5, 6).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(4, 7, 1, 1), torch.randn(4)
    grads = []
    for fn in (F.conv2d, pointwise_conv2d):
        leaves = [t.clone().requires_grad_() for t in (full, weight, bias)]
        out = fn(leaves[0][:, 3:10], leaves[1], leaves[2])
        out.backward(torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0)))
        grads.append((out, *[t.grad for t in leaves]))
    for got, expected in zip(*reversed(grads)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_weight_grad_is_the_pixel_sum_of_outer_products() -> None:
    torch.manual_seed(0)
    for in_ch, out_ch in [(5, 12), (12, 5), (7, 7)]:
        grad, x = torch.randn(300, out_ch), torch.randn(300, in_ch)
        expected = torch.einsum('no,nc->oc', grad.double(), x.double())
        torch.testing.assert_close(weight_grad_onednn(grad, x).double(), expected,
                                   atol=1e-4, rtol=1e-5)


def test_routing(monkeypatch) -> None:
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 1, 1)
    assert uses_onednn(x, weight)
    assert not uses_onednn(x.double(), weight.double())  # oneDNN has no float64: F.conv2d
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not uses_onednn(x, weight)
    # a JIT trace (FLOP counters) sees an ordinary convolution
    traced = torch.jit.trace(PointwiseConv2d(4, 3), x)
    assert 'aten::_convolution' in str(traced.inlined_graph)
    monkeypatch.setattr(pointwise_conv, 'ONEDNN', False)
    assert not uses_onednn(x, weight)
    out = pointwise_conv2d(x.requires_grad_(), weight)
    assert type(out.grad_fn).__name__ == 'ConvolutionBackward0'
    with pytest.raises(ValueError, match=r'\(O, C, 1, 1\)'):
        pointwise_conv2d(x, torch.randn(3, 4, 3, 3))


def test_module_is_a_drop_in_for_conv2d() -> None:
    torch.manual_seed(0)
    ours, plain = PointwiseConv2d(8, 4), nn.Conv2d(8, 4, 1)
    plain.load_state_dict(ours.state_dict())  # same keys and shapes
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('op', ['mkldnn_convolution', 'convolution'])
def test_selective_recomputation_policy(op: str) -> None:
    conv = getattr(torch.ops.aten, op).default
    groups_at = 6 if op == 'mkldnn_convolution' else 8

    def decision(weight_shape: tuple, groups: int) -> str:
        args = [None] * (groups_at + 1)
        args[1], args[groups_at] = torch.empty(weight_shape), groups
        return save_dense_products(None, conv, *args).name

    assert decision((64, 64, 1, 1), 1) == 'MUST_SAVE'  # 1x1 that keeps or narrows the width
    assert decision((64, 256, 1, 1), 1) == 'MUST_SAVE'
    assert decision((64, 32, 3, 3), 1) == 'MUST_SAVE'  # dense 3x3
    assert decision((256, 64, 1, 1), 1) == 'PREFER_RECOMPUTE'  # widening 1x1 of a narrow map
    assert decision((1024, 255, 1, 1), 1) == 'PREFER_RECOMPUTE'
    assert decision((1024, 256, 1, 1), 1) == 'MUST_SAVE'  # costly to recompute per element kept
    assert decision((64, 1, 3, 3), 64) == 'PREFER_RECOMPUTE'  # depthwise
