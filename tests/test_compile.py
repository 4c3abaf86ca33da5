"""``torch.compile`` of the backbones (issue 14, point 4).

The operators of :mod:`mmoverlock.ops` choose routes in Python (by device, dtype, autocast,
tracing, measured speed) and some run custom autograd functions or sparse tensors. Compiled, both
backbones trace into one graph, training included (no graph break: the CPU's sparse aggregation is
an opaque custom operator there, the oneDNN 1x1 route and the custom depthwise backward step
aside for the compiler's own; a graph break in every block made compiling OverLoCK ~10x slower).
Results must equal eager execution: within 1e-4 of the outputs' scale (``assert_close_to_scale``:
the compiled graph orders sums differently, and takes the fixed CPU routes where eager takes the
measured ones). Every test compiles through a counting backend and checks what was captured, so a
silent fallback to eager cannot pass.

Timings on the 2-core machine (one thread, measured): ``aot_eager`` (no code generation) 3-11 s
per backbone test, 15-16 s for OverLoCK's training steps; ``inductor`` (C++ code generation)
~9 s for the smallest OverLoCK's inference, the one inductor test; the whole file ~60 s.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from backbone_testing import assert_close_to_scale, random_loss, randomize_bn
from helpers import TINY_ARCH
from mmengine.config import Config
from test_glnet import TINY_G
from test_overlock import TINY
from torch._dynamo.testing import CompileCounterWithBackend

import mmoverlock  # noqa: F401  (registration)
from mmoverlock.apis import compile_amp
from mmoverlock.apis.compile_amp import enable_compile
from mmoverlock.apis.errors import UsageError
from mmoverlock.models.backbones.glnet import GLNet
from mmoverlock.models.backbones.overlock import OverLoCK
from mmoverlock.ops import depthwise_conv2d, neighborhood_aggregate, pointwise_conv2d

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


def _build(name: str, arch: dict | None = None, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = (OverLoCK(arch or TINY, **kwargs) if name == 'overlock'
             else GLNet(arch or TINY_G, **kwargs))
    return randomize_bn(model)


def _assert_captured(counter: CompileCounterWithBackend, min_ops: int) -> None:
    """One graph (no graph break) of at least ``min_ops`` operators."""
    assert counter.frame_count == 1 and counter.op_count >= min_ops, (
        f'dynamo captured {counter.frame_count} graphs with {counter.op_count} operators')


def _assert_gradients_close(model: torch.nn.Module, eager: torch.nn.Module, rel: float) -> None:
    """Every parameter's gradient within ``rel`` of its own scale plus 1e-6 of the network's
    largest gradient: some gradients vanish in exact arithmetic (a BatchNorm bias followed by
    another BatchNorm) and are pure float32 rounding noise of sums whose terms are of the
    network's scale (observed up to 2e-7 of it), which another summation order changes by a
    sizeable fraction of itself."""
    noise = 1e-6 * max(q.grad.abs().max().item() for q in eager.parameters())
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert p.grad is not None, name
        err = (p.grad - q.grad).abs().max().item()
        assert err <= rel * q.grad.abs().max().item() + noise, (
            f'{name}: max |difference| {err:.3g}, largest gradient {q.grad.abs().max():.3g}')



# ------------------------------------------------------------------------------------------------
# Operators whose routing happens in Python
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kernel_size, dilation', [(13, 1), (3, 7), (5, 2), (3, 1)],
                         ids=['embedded-13x13', 'prepadded-dilated', 'dilated', '3x3'])
@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
def test_depthwise_conv_routes_compile_in_one_graph(kernel_size: int, dilation: int,
                                                    grad: bool) -> None:
    """The CPU detours of ``same_conv`` (kernel embedding, pre-padding) trace into one graph
    (``fullgraph=True``) and equal the convolution as defined, forward and backward (compiled,
    the backward is the compiler's own, not the custom function's)."""
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


@pytest.mark.parametrize('amp', [False, True], ids=['float32', 'bf16-autocast'])
def test_sparse_aggregation_compiles_in_one_graph(amp: bool) -> None:
    """Dynamo cannot trace sparse tensors: compiled, the CPU's sparse route is one opaque
    operator (no graph break), forward and backward equal to eager, with the same autocast
    policy (float32)."""
    attn = _input(2, 2, 9, 8, 9).softmax(-1)
    value = _input(2, 2, 9, 8, 4, seed=1)

    def aggregate(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            return neighborhood_aggregate(a, v, 'sparse')

    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(aggregate, backend=counter, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (attn, value)]
    refs = [t.clone().requires_grad_() for t in (attn, value)]
    out, expected = compiled(*leaves), aggregate(*refs)
    assert out.dtype == expected.dtype == torch.float32
    assert_close_to_scale(out, expected)
    _assert_captured(counter, 1)
    g = _input(*out.shape, seed=3)
    for got, want in zip(torch.autograd.grad(out, leaves, g),
                         torch.autograd.grad(expected, refs, g), strict=True):
        assert_close_to_scale(got, want)


# ------------------------------------------------------------------------------------------------
# Backbones, aot_eager (dynamo + autograd tracing, no code generation: fast to compile)
# ------------------------------------------------------------------------------------------------
def _assert_compiled_inference_equals_eager(model: torch.nn.Module, x: torch.Tensor,
                                            backend: str) -> None:
    """``torch.compile(model, backend=backend)`` gives eager's outputs, in one captured graph."""
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        expected = model(x)
        outs = compiled(x)
    for out, ref in zip(outs, expected, strict=True):
        assert_close_to_scale(out, ref)
    _assert_captured(counter, 50)


@pytest.mark.parametrize('name', ['overlock', 'glnet'])
def test_compiled_inference_equals_eager(name: str) -> None:
    _assert_compiled_inference_equals_eager(_build(name).eval(), _input(1, 3, 72, 56),
                                            'aot_eager')


@pytest.mark.parametrize('name', ['overlock', 'glnet'])
def test_compiled_training_step_equals_eager(name: str) -> None:
    """Forward and backward in training mode (BatchNorm batch statistics, selective
    recomputation, custom backward functions): outputs, every gradient and the BatchNorm
    running statistics equal eager training. OverLoCK with one ContMix block per stage
    (``TINY_ARCH``): with two (``TINY``), batch statistics over the 2x2 stage-4 maps make the
    gradients ill-conditioned enough that merely taking other CPU routes in eager float32 moves
    them by 1.4e-4 of their scale (measured; see ``test_amp.TRAIN_KWARGS``); here compiled and
    eager differ by 4e-6."""
    model = _build(name, TINY_ARCH if name == 'overlock' else None).train()
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
    _assert_gradients_close(model, eager, rel=1e-4)
    for (b_name, buf), ref in zip(model.named_buffers(), eager.buffers(), strict=True):
        assert_close_to_scale(buf.float(), ref.float(), msg=b_name)
    _assert_captured(counter, 50)


def test_compiled_training_step_under_bf16_autocast() -> None:
    """Compile and autocast together (what ``--compile --amp bf16`` runs): the custom functions'
    autocast declarations, the sparse operator's autocast rule and selective recomputation
    inside the compiled graph. Compared with the float32 eager step within the bfloat16
    tolerance of ``tests/test_amp.py`` (5e-2 of the scale; BatchNorms on running statistics,
    where the network is well-conditioned, see ``test_amp.TRAIN_KWARGS``)."""
    model = _build('overlock', TINY_ARCH, norm_eval=True).train()
    eager = copy.deepcopy(model)
    x = _input(2, 3, 64, 64)
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = compiled(x)
    random_loss([o.float() for o in outs]).backward()
    expected = eager(x)
    random_loss(expected).backward()
    for out, ref in zip(outs, expected, strict=True):
        assert not torch.equal(out.float(), ref)  # autocast was in effect
        assert_close_to_scale(out.float(), ref, rel=5e-2)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads).all()
    assert_close_to_scale(grads, torch.cat([q.grad.flatten() for q in eager.parameters()]),
                          rel=5e-2)
    _assert_captured(counter, 50)


# ------------------------------------------------------------------------------------------------
# inductor (C++ code generation on the CPU): the smallest model, inference
# ------------------------------------------------------------------------------------------------
def test_inductor_compiled_inference_equals_eager() -> None:
    _assert_compiled_inference_equals_eager(_build('overlock', TINY_ARCH).eval(),
                                            _input(1, 3, 64, 64), 'inductor')


# ------------------------------------------------------------------------------------------------
# The compile switch of a training config (mmoverlock.apis.compile_amp.enable_compile)
# ------------------------------------------------------------------------------------------------
def test_enable_compile_adds_the_backbone_hook_once() -> None:
    cfg = Config(dict(custom_hooks=[dict(type='EMAHook')],
                      custom_imports=dict(imports=['mmoverlock'])))
    enable_compile(cfg, device='cpu')
    assert cfg.custom_hooks == [dict(type='EMAHook'),
                                dict(type='CompileBackboneHook', backend='inductor')]
    assert cfg.custom_imports.imports == ['mmoverlock', 'mmoverlock.engine']
    enable_compile(cfg, 'inductor', mode='max-autotune', dynamic=True, device='cuda')
    assert cfg.custom_hooks == [dict(type='EMAHook'), dict(
        type='CompileBackboneHook', backend='inductor', mode='max-autotune', dynamic=True)]
    enable_compile(cfg, 'aot_eager', device='cpu')
    assert cfg.custom_hooks[1:] == [dict(type='CompileBackboneHook', backend='aot_eager')]
    assert cfg.custom_imports.imports == ['mmoverlock', 'mmoverlock.engine']
    assert 'compile' not in cfg  # mmengine's whole-train_step switch stays off


def test_enable_compile_refuses_what_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="unknown torch.compile backend 'inductr'.*aot_eager"):
        enable_compile(Config(), 'inductr', device='cpu')
    with pytest.raises(UsageError, match="mode 'fast' is not one of the inductor modes"):
        enable_compile(Config(), mode='fast', device='cpu')
    with pytest.raises(UsageError, match='apply to backend="inductor" only'):
        enable_compile(Config(), 'aot_eager', mode='max-autotune', device='cpu')
    monkeypatch.delenv('CXX', raising=False)
    monkeypatch.setattr(compile_amp.shutil, 'which', lambda name: None)
    with pytest.raises(UsageError, match='no C\\+\\+ compiler was found.*aot_eager'):
        enable_compile(Config(), device='cpu')
    # no C++ compiler is needed for GPUs or for aot_eager
    assert enable_compile(Config(), device='cuda').custom_hooks
    assert enable_compile(Config(), 'aot_eager', device='cpu').custom_hooks
