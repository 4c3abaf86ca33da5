"""Helpers shared by the backbone tests."""
from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (fresh ones are identities)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def random_loss(outputs) -> torch.Tensor:
    """A loss with non-zero gradients through output LayerNorms (unlike a mean or a sum of
    squares, which a LayerNorm makes constant)."""
    gen = torch.Generator().manual_seed(123)
    return sum((o * torch.randn(o.shape, generator=gen)).mean() for o in outputs)
