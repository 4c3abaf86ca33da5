"""The fused training form of the dilated re-parameterisable block against its modules."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmoverlock.models.layers.dilated_reparam import DilatedReparamBlock
from mmoverlock.ops import conv_bn_sum, depthwise_conv


def _block(kernel_size: int, momentum) -> DilatedReparamBlock:
    torch.manual_seed(kernel_size)
    block = DilatedReparamBlock(6, kernel_size).train()
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return block


def _step(block: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    out = block(x)
    out.backward(grad)
    return out, x.grad, type(out.grad_fn).__name__


@pytest.mark.parametrize('kernel_size', [17, 13, 7, 5])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_fused_training_matches_the_modules(monkeypatch, kernel_size: int, channels_last: bool,
                                            momentum) -> None:
    """Output, input / parameter gradients and running statistics (two steps, so the cumulative
    average of momentum=None is exercised) equal the per-branch modules under plain PyTorch."""
    fused = _block(kernel_size, momentum)
    modules = copy.deepcopy(fused)
    x = torch.randn(2, 6, 23, 29)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 6, 23, 29)
    for _ in range(2):
        out, grad_x, node = _step(fused, x, grad)
        assert node == '_ConvBNSumBackward'
        with monkeypatch.context() as m:
            m.setattr(depthwise_conv, 'CUSTOM_BACKWARD', False)
            ref_out, ref_grad_x, ref_node = _step(modules, x, grad)
        assert ref_node != '_ConvBNSumBackward'
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-4, rtol=1e-4)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    for (name, p), q in zip(fused.named_parameters(), modules.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-3, rtol=1e-4, msg=name)
        assert p.grad.stride() == p.stride(), name
    for (name, b), c in zip(fused.named_buffers(), modules.buffers()):
        torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5, msg=name)


def test_modules_run_where_fusing_does_not_apply() -> None:
    x = torch.randn(1, 6, 16, 16, requires_grad=True)
    block = _block(7, 0.1)
    assert type(block(x).grad_fn).__name__ == '_ConvBNSumBackward'
    block.origin_bn.eval()  # frozen / norm_eval BatchNorm
    assert type(block(x).grad_fn).__name__ != '_ConvBNSumBackward'
    block = _block(7, 0.1)
    block.dil_bn_k5_1 = nn.SyncBatchNorm(6)  # what mmengine's sync_bn conversion installs
    assert not block._fuse_in_training(x)
    with torch.no_grad():
        assert block.train()(x).grad_fn is None


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(2, 1, k, k, dtype=torch.float64, requires_grad=True) for k in (5, 3)]
    gammas = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    betas = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def fn(x, w0, w1, g0, g1, b0, b1):
        stats = [torch.zeros(2, dtype=torch.float64) for _ in range(4)]
        return conv_bn_sum(x, [w0, w1], [1, 2], [g0, g1], [b0, b1], stats[:2], stats[2:],
                           [0.1, 0.1], [1e-5, 1e-5])

    assert torch.autograd.gradcheck(fn, (x, *weights, *gammas, *betas))


def test_rejects_mismatched_branch_lists() -> None:
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match='per kernel'):
        conv_bn_sum(x, [torch.randn(2, 1, 3, 3)], [1, 2], [torch.ones(2)], [torch.zeros(2)],
                    [torch.zeros(2)], [torch.ones(2)], [0.1], [1e-5])
