"""Helpers shared by the backbone tests."""
from __future__ import annotations

import io
import json
import lzma
from functools import cache
from pathlib import Path

import torch
from torch import nn

#: Reference data of the authors' code (see tests/data/README.md).
DATA = Path(__file__).resolve().parent / 'data'


@cache
def _decompressed(name: str) -> bytes:
    path = DATA / f'{name}.xz'
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing: the reference data ships with the repository '
                                '(tests/data); restore it from git')
    return lzma.decompress(path.read_bytes())


def load_reference(name: str) -> dict:
    """The authors' reference ``tests/data/<name>_tiny_reference.pt`` (weights, inputs, outputs)."""
    return torch.load(io.BytesIO(_decompressed(f'{name}_tiny_reference.pt')), weights_only=True)


def load_manifest(name: str) -> dict:
    """The authors' state-dict manifest ``tests/data/<name>_state_dict_keys.json``."""
    return json.loads(_decompressed(f'{name}_state_dict_keys.json'))


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


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4,
                          msg: str = '', floor: float = 0.0) -> None:
    """``max|actual - expected| <= rel * max|expected|``: two float32 computations of one network
    that differ in summation order, memory layout or kernel (the CPU routes, channels-last vs
    contiguous, recomputation, re-parameterisation).

    Why a tolerance relative to the tensor's scale: float32 has a unit roundoff of 6e-8; an output
    or gradient of the test networks passes ~30 layers, each summing up to ~1e4 terms (a 17x17
    kernel over 64 channels, a weight gradient over a 2x64x96 map), so two summation orders differ
    by a few 1e-6 of the tensor's largest value (observed: up to 1.2e-5 absolute on AMD Zen 3 for
    values of order 1; which order a processor uses depends on its vector width: AVX2 vs AVX-512).
    A bound of 1e-4 of the scale leaves an order of magnitude of headroom on any processor, while
    a real error (a wrong tap, border or layout) moves values by a sizeable fraction of the scale.
    An absolute bound would be too loose for small gradients and too tight for large ones.

    ``floor``: a lower bound of the scale. The rounding error of a sum is relative to the sum of
    its terms' magnitudes, not to the result: a gradient that nearly cancels (a BatchNorm weight's
    gradient can be 1e-6 of the network's largest) carries the rounding of its large terms. The
    gradient comparisons pass a fraction of the largest gradient of the model as the floor
    (:func:`gradient_floor`).
    """
    scale = max(expected.abs().max().item(), floor, torch.finfo(torch.float32).tiny)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, (f'{msg}: max |difference| {err:.3g} exceeds {rel:g} x the '
                                f'largest magnitude {scale:.3g}')


def gradient_floor(grads: dict, fraction: float = 1e-3) -> float:
    """``fraction`` of the largest gradient magnitude in ``grads`` (name -> tensor), the
    ``floor`` of :func:`assert_close_to_scale` for gradient comparisons."""
    return fraction * max(g.abs().max().item() for g in grads.values() if g is not None)


def spy_on_conv2d(monkeypatch, module) -> list[tuple]:
    """Record every ``F.conv2d`` call made through ``module.F`` as ``((H, W) of the input,
    kernel size, padding)``; the calls still compute. Returns the (growing) list."""
    import torch.nn.functional as F
    calls: list[tuple] = []
    conv2d = F.conv2d

    def spy(inp, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
        calls.append((tuple(inp.shape[-2:]), w.shape[-1], padding))
        return conv2d(inp, w, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(module.F, 'conv2d', spy)
    return calls
