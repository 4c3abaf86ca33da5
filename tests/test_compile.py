"""``torch.compile`` of the backbones (issue 14, point 4).

The operators of :mod:`mmoverlock.ops` choose routes in Python (by device, dtype, autocast,
tracing, measured speed) and some run custom autograd functions or sparse tensors; dynamo traces
most of them and breaks the graph around the rest (the CSR product of the aggregation). Results
must equal eager execution: within 1e-4 of the outputs' scale (``assert_close_to_scale``: the
compiled graph may order sums differently and the CPU routes may differ from the measured eager
ones, as in the float32 route tests). Every test compiles through a counting backend and checks
that graphs were captured, so a silent fallback to eager cannot pass.

Timings on the 2-core CI machine (one thread): ``aot_eager`` (no code generation) 3-10 s per
test; ``inductor`` (C++ code generation) ~60 s for the smallest OverLoCK, so one test only.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from backbone_testing import assert_close_to_scale, random_loss, randomize_bn
from helpers import TINY_ARCH
from test_glnet import TINY_G
from test_overlock import TINY
from torch._dynamo.testing import CompileCounterWithBackend

import mmoverlock  # noqa: F401  (registration)
from mmoverlock.models.backbones.glnet import GLNet
from mmoverlock.models.backbones.overlock import OverLoCK
from mmoverlock.ops import depthwise_conv2d, pointwise_conv2d

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (dynamo's caches are per code object: earlier tests'
    graphs would count against its recompilation limit and hide what this test compiles)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _input(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build(name: str, arch: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = OverLoCK(arch or TINY) if name == 'overlock' else GLNet(arch or TINY_G)
    return randomize_bn(model)


def _assert_captured(counter: CompileCounterWithBackend, min_ops: int) -> None:
    assert counter.frame_count >= 1 and counter.op_count >= min_ops, (
        f'dynamo captured {counter.frame_count} graphs with {counter.op_count} operators')


# ------------------------------------------------------------------------------------------------
# Operators whose routing happens in Python
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kernel_size, dilation', [(13, 1), (3, 7), (5, 2), (3, 1)],
                         ids=['embedded-13x13', 'prepadded-dilated', 'dilated', '3x3'])
@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
def test_depthwise_conv_routes_compile_in_one_graph(kernel_size: int, dilation: int,
                                                    grad: bool) -> None:
    """The CPU detours of ``same_conv`` (kernel embedding, pre-padding) and the custom backward
    trace into one graph (``fullgraph=True``) and equal the convolution as defined."""
    c = 6
    x = _input(2, c, 20, 18).contiguous(memory_format=torch.channels_last)
    weight, bias = _input(c, 1, kernel_size, kernel_size, seed=1), _input(c, seed=2)
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(depthwise_conv2d, backend=counter, fullgraph=True)
    leaves = [t.clone().requires_grad_(grad) for t in (x, weight, bias)]
    refs = [t.clone().requires_grad_(grad) for t in (x, weight, bias)]
    out = compiled(*leaves, dilation)
    expected = F.conv2d(*refs, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                        groups=c)
    assert_close_to_scale(out, expected)
    _assert_captured(counter, 1)
    if grad:
        gen = torch.Generator().manual_seed(3)
        g = torch.randn(out.shape, generator=gen)
        for got, want in zip(torch.autograd.grad(out, leaves, g),
                             torch.autograd.grad(expected, refs, g)):
            assert_close_to_scale(got, want)


@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
def test_pointwise_conv_compiles_in_one_graph(grad: bool) -> None:
    """The oneDNN route's operator has no fake-tensor kernel, so dynamo could not trace it;
    compiled, the 1x1 convolution is ``F.conv2d`` (inductor picks its own kernel)."""
    x = _input(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    weight, bias = _input(12, 8, 1, 1, seed=1), _input(12, seed=2)
    leaves = [t.clone().requires_grad_(grad) for t in (x, weight, bias)]
    counter = CompileCounterWithBackend('aot_eager')
    out = torch.compile(pointwise_conv2d, backend=counter, fullgraph=True)(*leaves)
    expected = F.conv2d(x, weight, bias)
    assert_close_to_scale(out, expected)
    _assert_captured(counter, 1)
    if grad:
        out.square().sum().backward()
        assert all(t.grad is not None for t in leaves)


# ------------------------------------------------------------------------------------------------
# Backbones, aot_eager (dynamo + autograd tracing, no code generation: fast to compile)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['overlock', 'glnet'])
def test_compiled_inference_equals_eager(name: str) -> None:
    model = _build(name).eval()
    x = _input(1, 3, 72, 56)
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        expected = model(x)
        outs = compiled(x)
    for out, ref in zip(outs, expected, strict=True):
        assert_close_to_scale(out, ref)
    _assert_captured(counter, 50)


@pytest.mark.parametrize('name', ['overlock', 'glnet'])
def test_compiled_training_step_equals_eager(name: str) -> None:
    """Forward and backward in training mode (BatchNorm batch statistics, selective
    recomputation, custom backward functions): outputs, every gradient and the BatchNorm
    running statistics equal eager training."""
    model = _build(name).train()
    eager = copy.deepcopy(model)
    x = _input(2, 3, 64, 64)
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter)
    outs = compiled(x)
    random_loss(outs).backward()
    expected = eager(x)
    random_loss(expected).backward()
    for out, ref in zip(outs, expected, strict=True):
        assert_close_to_scale(out, ref)
    for (p_name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert p.grad is not None, p_name
        assert_close_to_scale(p.grad, q.grad, msg=p_name)
    for (b_name, buf), ref in zip(model.named_buffers(), eager.buffers(), strict=True):
        assert_close_to_scale(buf.float(), ref.float(), msg=b_name)
    _assert_captured(counter, 50)


# ------------------------------------------------------------------------------------------------
# inductor (C++ code generation on the CPU): the smallest model, inference
# ------------------------------------------------------------------------------------------------
def test_inductor_compiled_inference_equals_eager() -> None:
    model = _build('overlock', TINY_ARCH).eval()
    x = _input(1, 3, 64, 64)
    counter = CompileCounterWithBackend('inductor')
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        expected = model(x)
        outs = compiled(x)
    for out, ref in zip(outs, expected, strict=True):
        assert_close_to_scale(out, ref)
    _assert_captured(counter, 50)
