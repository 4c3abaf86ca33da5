"""The depthwise convolution with its own CPU backward against PyTorch and the definition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backbone_testing import spy_on_conv2d

from mmoverlock.ops import cpu_routes, depthwise_conv, depthwise_conv2d, memory_format_of
from mmoverlock.ops.depthwise_conv import (
    FFT_MIN_KERNEL,
    _fft_size,
    channels_first,
    depthwise_weight_grad_fft,
    depthwise_weight_grad_grouped,
)


def _aten_grads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int,
                grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    pad = dilation * (weight.shape[-1] - 1) // 2
    out = F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=x.shape[1])
    out.backward(grad)
    return out, x.grad, weight.grad, bias.grad


@pytest.mark.parametrize('kernel_size,dilation',
                         [(3, 1), (3, 2), (5, 1), (5, 3), (7, 1), (9, 1), (11, 1), (13, 1), (17, 1),
                          (19, 1), (3, 4), (3, 7), (9, 2), (5, 4)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_matches_pytorch_forward_and_backward(kernel_size: int, dilation: int,
                                              channels_last: bool) -> None:
    torch.manual_seed(kernel_size + dilation)
    x = torch.randn(2, 6, 23, 29)  # odd, non-square sizes: no accidental symmetry
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 1, kernel_size, kernel_size) * 0.1
    bias = torch.randn(6)
    ref_out, ref_gx, ref_gw, ref_gb = _aten_grads(x, weight, bias, dilation,
                                                   grad := torch.randn(2, 6, 23, 29))
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    out = depthwise_conv2d(x, weight, bias, dilation)
    out.backward(grad)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, ref_gx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight.grad, ref_gw, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(bias.grad, ref_gb, atol=1e-4, rtol=1e-4)
    assert memory_format_of(out) == memory_format_of(x)
    assert type(out.grad_fn).__name__ == '_DepthwiseConv2dBackward'
    assert weight.grad.stride() == weight.stride()  # DDP's buckets expect the param's layout


def _weight_grad_by_definition(x: torch.Tensor, grad: torch.Tensor, k: int,
                               d: int) -> torch.Tensor:
    """dW[c, u, v] = sum_{b, y, x} xpad[b, c, y + d*u, x + d*v] * g[b, c, y, x], tap by tap."""
    h, w = x.shape[-2:]
    pad = d * (k - 1) // 2
    xpad = F.pad(x, [pad] * 4)
    return torch.stack([torch.stack([
        (xpad[:, :, d * u:d * u + h, d * v:d * v + w] * grad).sum((0, 2, 3))
        for v in range(k)], -1) for u in range(k)], -2).unsqueeze(1)


@pytest.mark.parametrize('route', [depthwise_weight_grad_fft, depthwise_weight_grad_grouped])
@pytest.mark.parametrize('kernel_size,dilation', [(3, 1), (5, 2), (7, 1), (3, 3)])
def test_weight_grad_routes_are_the_cross_correlation(route, kernel_size: int,
                                                      dilation: int) -> None:
    torch.manual_seed(kernel_size * dilation)
    x, grad = (torch.randn(3, 4, 16, 20, dtype=torch.float64) for _ in range(2))
    expected = _weight_grad_by_definition(x, grad, kernel_size, dilation)
    got = route(x, grad, kernel_size, dilation)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('kernel_size,dilation', [(3, 1), (5, 2), (FFT_MIN_KERNEL, 1)])
def test_gradcheck_float64(kernel_size: int, dilation: int) -> None:
    x = torch.randn(1, 2, 12, 13, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: depthwise_conv2d(*a, dilation=dilation),
                                    (x, weight, bias))


def test_plain_pytorch_without_grad_or_when_switched_off(monkeypatch) -> None:
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    weight = torch.randn(4, 1, 5, 5, requires_grad=True)
    with torch.no_grad():
        assert depthwise_conv2d(x, weight).grad_fn is None
    monkeypatch.setattr(depthwise_conv, 'CUSTOM_BACKWARD', False)
    assert type(depthwise_conv2d(x, weight).grad_fn).__name__ == 'ConvolutionBackward0'


def test_fft_sizes_are_smooth_and_large_enough() -> None:
    for n in range(1, 300):
        size = _fft_size(n)
        assert size >= n and size < 2 * n + 2
        for p in (2, 3, 5):
            while size % p == 0:
                size //= p
        assert size == 1


def test_rejects_non_depthwise_kernels() -> None:
    with pytest.raises(ValueError, match=r'\(C, 1, K, K\)'):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 4, 4))
    with pytest.raises(ValueError, match='C=4'):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(2, 1, 3, 3))


@pytest.mark.parametrize('kernel_size,dilation,conv_pad,conv_kernel',
                         [(9, 2, 0, 9), (3, 7, 0, 3), (5, 4, 0, 5), (3, 5, 0, 3), (13, 1, 7, 15),
                          (11, 1, 7, 15), (17, 1, 8, 17), (7, 1, 3, 7)])
@pytest.mark.parametrize('grad', [False, True])
def test_same_conv_routes_around_slow_onednn_kernels(monkeypatch, kernel_size: int, dilation: int,
                                                     conv_pad: int, conv_kernel: int,
                                                     grad: bool) -> None:
    """With the fixed routes (no measuring), dilated kernels are padded beforehand and 11x11 /
    13x13 kernels run embedded in 15x15 ones, in inference and training alike, with PyTorch's
    result; the baseline switch runs plain ``F.conv2d``."""
    monkeypatch.setitem(cpu_routes._state, 'mode', 'fixed')
    torch.manual_seed(kernel_size)
    x = torch.randn(2, 4, 21, 26).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 1, kernel_size, kernel_size)
    pad = dilation * (kernel_size - 1) // 2
    ref = F.conv2d(x, weight, None, padding=pad, dilation=dilation, groups=4)
    calls = spy_on_conv2d(monkeypatch, depthwise_conv)
    with torch.set_grad_enabled(grad):
        out = depthwise_conv2d(x.requires_grad_(grad), weight, None, dilation)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    extra = pad - conv_pad if dilation > 1 else 0  # pixels padded beforehand
    assert calls[0] == ((21 + 2 * extra, 26 + 2 * extra), conv_kernel, conv_pad)
    monkeypatch.setattr(depthwise_conv, 'CUSTOM_BACKWARD', False)  # the baseline: plain F.conv2d
    calls.clear()
    depthwise_conv2d(x.detach(), weight, None, dilation)
    assert calls == [((21, 26), kernel_size, pad)]


@pytest.mark.parametrize('batch', [1, 3])
def test_channels_first_copies_every_layout(batch: int) -> None:
    x = torch.randn(batch, 5, 7, 9)
    for t in (x, x.contiguous(memory_format=torch.channels_last),
              x.contiguous(memory_format=torch.channels_last)[:, 1:4],  # a channel slice
              x[:, :, 1:6]):
        out = channels_first(t)
        assert out.is_contiguous()
        assert torch.equal(out, t)


def test_same_conv_keeps_the_defined_convolution_while_tracing(monkeypatch) -> None:
    """FLOP counters trace the model: they must see the 13x13 / dilated kernels as defined."""
    calls = []
    conv2d = F.conv2d

    def spy(inp, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
        calls.append((w.shape[-1], padding))
        return conv2d(inp, w, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(depthwise_conv.F, 'conv2d', spy)
    x = torch.randn(1, 4, 20, 20)
    for k, d in ((13, 1), (9, 2)):
        weight = torch.randn(4, 1, k, k)
        torch.jit.trace(lambda t, w=weight, d=d: depthwise_conv2d(t, w, None, d), (x,),
                        check_trace=False)
        assert calls[-1] == (k, d * (k - 1) // 2)


@pytest.mark.parametrize('channels_last', [False, True])
def test_residual_depthwise_conv_is_x_plus_conv(channels_last: bool) -> None:
    # ResDWConv folds the shortcut into the kernel's centre tap: same output and gradients as
    # the definition x + conv(x) computed by PyTorch
    from mmoverlock.models.layers import ResDWConv
    from mmoverlock.models.layers.basic import with_identity_tap

    torch.manual_seed(0)
    module = ResDWConv(6, 3)
    x = torch.randn(2, 6, 11, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 6, 11, 13)
    ref_out, ref_gx, ref_gw, ref_gb = _aten_grads(x, module.weight, module.bias, 1, grad)
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    torch.testing.assert_close(out, ref_out + x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, ref_gx + grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.weight.grad, ref_gw, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(module.bias.grad, ref_gb, atol=1e-4, rtol=1e-5)
    identity = with_identity_tap(torch.zeros(6, 1, 3, 3))
    assert torch.equal(F.conv2d(x.detach(), identity, padding=1, groups=6), x.detach())
