"""Mixed precision (issue 14, point 3): the custom autograd functions and both backbones under
``torch.autocast('cpu', dtype=torch.bfloat16)``, and the AMP switch of a training config.

Each function of :mod:`mmoverlock.ops` declares what it does under autocast: GRN, the fused
conv + BatchNorm sum, the oneDNN 1x1 convolution and the two hand-written aggregations compute in
float32 (operands cast on entry, float32 output, each gradient back in its input's dtype), the
depthwise convolution in the autocast dtype as autocast runs ``F.conv2d``. The operator tests
feed them mixed dtypes (a bfloat16 map with float32 parameters: what a network under autocast
produces) and compare with an exact reference: the same function in float32 on the float32 copies
of the operands (bit-for-bit), or PyTorch's own autocast convolution.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from backbone_testing import assert_close_to_scale, random_loss, randomize_bn
from mmengine.config import Config
from mmengine.optim import AmpOptimWrapper, build_optim_wrapper
from test_glnet import TINY_G
from test_overlock import TINY
from torch import Tensor

import mmoverlock  # noqa: F401  (registration)
from mmoverlock.apis.compile_amp import CPUAmpOptimWrapper, enable_amp
from mmoverlock.apis.errors import UsageError
from mmoverlock.models.backbones.glnet import GLNet
from mmoverlock.models.backbones.overlock import OverLoCK
from mmoverlock.models.layers import DilatedReparamBlock
from mmoverlock.ops import conv_bn_sum, depthwise_conv2d, grn, neighborhood_aggregate
from mmoverlock.ops.pointwise_conv import _OneDNNPointwiseConv, pointwise_conv2d

pytestmark = pytest.mark.usefixtures('single_thread')

BF16 = torch.bfloat16
#: Backbone outputs and gradients under bfloat16 autocast vs float32, relative to their scale.
#: bfloat16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 ~ 2e-3 of itself
#: (~4e-3 between neighbouring values). Every convolution / matrix product of the tiny networks
#: rounds its operands and its output; the LayerNorms / BatchNorms between them renormalise, so
#: the relative errors of the ~20-30 rounding layers on an output's path add up roughly like a
#: random walk: sqrt(30) x 4e-3 ~ 2e-2 of the output's scale. 5e-2 leaves 2-3x headroom (the
#: observed errors are 1-2e-2, see the tests), while a wrong cast, a dropped branch or a wrong
#: gradient formula moves values by a sizeable fraction of their scale.
OUTPUT_REL = 5e-2
#: Weight gradients sum over every pixel of a map; their rounding errors are of the same kind but
#: the smallest parameters' gradients are sums of few, cancelling terms. Compared as a whole
#: (all gradients of the network concatenated, relative to the largest), with the same bound.
GRAD_REL = 5e-2


def _seed_input(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------------------------------
# Each operator's autograd function under autocast, with mixed-dtype operands
# ------------------------------------------------------------------------------------------------
def _grads(out: Tensor, inputs: list[Tensor], seed: int = 5) -> list[Tensor]:
    grad = _seed_input(*out.shape, seed=seed).to(out.dtype)
    return list(torch.autograd.grad(out, inputs, grad))


def _float32_twins(tensors: list[Tensor]) -> list[Tensor]:
    return [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


def _assert_float32_island(fn, inputs: list[Tensor]) -> None:
    """``fn`` under autocast == ``fn`` without autocast on the float32 copies of its operands,
    bit for bit, with a float32 output; each gradient in its input's dtype, equal to the float32
    gradient rounded to that dtype."""
    with torch.autocast('cpu', dtype=BF16):
        out = fn(*inputs)
    assert out.dtype == torch.float32
    twins = _float32_twins(inputs)
    expected = fn(*twins)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want, leaf in zip(_grads(out, inputs), _grads(expected, twins), inputs):
        assert got.dtype == leaf.dtype
        torch.testing.assert_close(got, want.to(leaf.dtype), rtol=0, atol=0)


@pytest.mark.parametrize('channels_last', [False, True])
def test_grn_runs_in_float32_under_autocast(channels_last: bool) -> None:
    x = _seed_input(2, 6, 5, 7, dtype=BF16) * 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = _seed_input(1, 6, 1, 1, seed=1), _seed_input(1, 6, 1, 1, seed=2)
    _assert_float32_island(grn, [t.requires_grad_() for t in (x, gamma, beta)])


def _cbs_operands(x_dtype: torch.dtype) -> tuple[Tensor, list, list, list, list, list]:
    weights = [_seed_input(4, 1, k, k, seed=10 + k).requires_grad_() for k in (5, 3)]
    gammas = [(_seed_input(4, seed=20 + i).abs() + 0.5).requires_grad_() for i in range(2)]
    betas = [_seed_input(4, seed=30 + i).requires_grad_() for i in range(2)]
    means = [torch.zeros(4) for _ in range(2)]
    variances = [torch.ones(4) for _ in range(2)]
    x = _seed_input(2, 4, 9, 8, dtype=x_dtype).requires_grad_()
    return x, weights, gammas, betas, means, variances


def test_conv_bn_sum_runs_in_float32_under_autocast() -> None:
    x, weights, gammas, betas, means, variances = _cbs_operands(BF16)
    ref_means, ref_vars = [m.clone() for m in means], [v.clone() for v in variances]
    # the first call (under autocast) updates means / variances, the float32 twin the copies
    stats = iter([(means, variances), (ref_means, ref_vars)])

    def fn(x: Tensor, *params: Tensor) -> Tensor:
        return conv_bn_sum(x, params[:2], [1, 2], params[2:4], params[4:], *next(stats),
                           [0.1, 0.1], [1e-5, 1e-5])

    _assert_float32_island(fn, [x, *weights, *gammas, *betas])
    # the running statistics were updated in place, in float32, like the float32 run's
    for got, want in zip(means + variances, ref_means + ref_vars):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(got, torch.zeros(4)) and not torch.equal(got, torch.ones(4))


def test_conv_bn_sum_refuses_half_precision_statistics_under_autocast() -> None:
    x, weights, gammas, betas, means, variances = _cbs_operands(BF16)
    with torch.autocast('cpu', dtype=BF16), pytest.raises(ValueError, match='must be float32'):
        conv_bn_sum(x, weights, [1, 2], gammas, betas, [m.to(BF16) for m in means], variances,
                    [0.1, 0.1], [1e-5, 1e-5])


def test_dilated_reparam_block_trains_in_the_autocast_dtype() -> None:
    """Under autocast the block runs its branches as modules (convolutions in bfloat16, BN
    statistics in float32) instead of the float32 fused function."""
    torch.manual_seed(0)
    block = randomize_bn(DilatedReparamBlock(8, 7)).train()
    reference = copy.deepcopy(block)
    x = _seed_input(2, 8, 12, 10)
    with torch.autocast('cpu', dtype=BF16):
        out = block(x.requires_grad_())
    assert out.dtype == BF16
    expected = reference(x.detach().requires_grad_())
    assert_close_to_scale(out.float(), expected, rel=2e-2)
    out.float().square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert_close_to_scale(p.grad, q.grad, rel=GRAD_REL, msg=name)
    for (name, buf), ref in zip(block.named_buffers(), reference.buffers()):
        assert buf.dtype == ref.dtype
        torch.testing.assert_close(buf.float(), ref.float(), rtol=2e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize('kernel_size, dilation', [(3, 1), (5, 2), (13, 1), (3, 7)])
@pytest.mark.parametrize('x_dtype', [torch.float32, BF16])
def test_depthwise_conv_runs_in_the_autocast_dtype(kernel_size: int, dilation: int,
                                                   x_dtype: torch.dtype) -> None:
    """Against PyTorch's own autocast convolution (same bfloat16 operands, float32 accumulation):
    the two differ only in summation order and where the output is rounded, ~1 bfloat16 step."""
    c = 6
    x = _seed_input(2, c, 24, 22, dtype=x_dtype).contiguous(memory_format=torch.channels_last)
    weight = _seed_input(c, 1, kernel_size, kernel_size, seed=1)
    bias = _seed_input(c, seed=2)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    pad = dilation * (kernel_size - 1) // 2
    with torch.autocast('cpu', dtype=BF16):
        out = depthwise_conv2d(x, weight, bias, dilation)
        expected = F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=c)
    assert type(out.grad_fn).__name__ == '_DepthwiseConv2dBackward'
    assert out.dtype == expected.dtype == BF16
    assert_close_to_scale(out.float(), expected.float(), rel=1e-2)
    for got, want, leaf in zip(_grads(out, inputs), _grads(expected, inputs), inputs):
        assert got.dtype == want.dtype == leaf.dtype
        assert_close_to_scale(got.float(), want.float(), rel=2e-2)


def test_pointwise_conv_function_runs_in_float32_under_autocast() -> None:
    x = _seed_input(2, 8, 5, 6, dtype=BF16).contiguous(memory_format=torch.channels_last)
    weight, bias = _seed_input(12, 8, 1, 1, seed=1), _seed_input(12, seed=2)
    _assert_float32_island(_OneDNNPointwiseConv.apply,
                           [t.requires_grad_() for t in (x, weight, bias)])
    # the public function leaves autocast to F.conv2d: the autocast dtype
    with torch.autocast('cpu', dtype=BF16):
        out = pointwise_conv2d(x, weight, bias)
        expected = F.conv2d(x, weight, bias)
    assert out.dtype == BF16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize('backend', ['sparse', 'taps'])
@pytest.mark.parametrize('value_dtype', [torch.float32, BF16])
def test_aggregation_functions_run_in_float32_under_autocast(backend: str,
                                                             value_dtype: torch.dtype) -> None:
    attn = _seed_input(2, 2, 9, 8, 9).softmax(-1)
    value = _seed_input(2, 2, 9, 8, 4, dtype=value_dtype, seed=1)
    _assert_float32_island(lambda a, v: neighborhood_aggregate(a, v, backend),
                           [attn.requires_grad_(), value.requires_grad_()])


def test_banded_aggregation_runs_in_the_autocast_dtype() -> None:
    """The banded route is a ``bmm``: autocast runs it in bfloat16 (float32 accumulation)."""
    attn = _seed_input(2, 2, 9, 8, 9).softmax(-1).requires_grad_()
    value = _seed_input(2, 2, 9, 8, 4, dtype=BF16, seed=1).requires_grad_()
    with torch.autocast('cpu', dtype=BF16):
        out = neighborhood_aggregate(attn, value, 'banded')
    assert out.dtype == BF16
    expected = neighborhood_aggregate(attn.detach().double().requires_grad_(),
                                      value.detach().double().requires_grad_(), 'taps')
    assert_close_to_scale(out.double(), expected, rel=1e-2)
    grads = _grads(out, [attn, value])
    assert [g.dtype for g in grads] == [torch.float32, BF16]
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------
# Both backbones: training step and inference under autocast vs float32
# ------------------------------------------------------------------------------------------------
def _build(name: str, **kwargs):
    torch.manual_seed(0)
    model = OverLoCK(TINY, **kwargs) if name == 'overlock' else GLNet(TINY_G, **kwargs)
    return randomize_bn(model)


def _flat_grads(model) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _assert_every_gradient_finite(model) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert p.grad.dtype == p.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name


def _train_step(model, x: Tensor, amp: bool) -> list[Tensor]:
    with torch.autocast('cpu', dtype=BF16, enabled=amp):
        outs = model(x)
    random_loss([o.float() for o in outs]).backward()
    return outs


#: OverLoCK's BatchNorms with batch statistics over a 64-pixel batch of 2 see 8 values per
#: channel in stage 4 (2x2 maps): there the float32 network itself is ill-conditioned. Measured:
#: perturbing only the input by 4e-3 of itself (one bfloat16 rounding) moves the stage-4 output
#: by 6% and the gradients by 100% of their scale (cosine 0.7), and a bfloat16 run differs as
#: much. With the BatchNorms on their running statistics (``norm_eval``) the same perturbation
#: moves the outputs by 0.1% and the gradients by 0.03%, and bfloat16 differs by 1.3% / 0.9%:
#: so the comparison with float32 runs there (GLNet, whose only BatchNorms sit in the
#: downsampling layers, is well-conditioned with batch statistics: 1.5% / 1.9%). Training with
#: batch statistics is checked for what precision does not change (next test).
TRAIN_KWARGS = dict(overlock=dict(norm_eval=True), glnet=dict())


@pytest.mark.parametrize('name', ['overlock', 'glnet'])
def test_backbone_trains_under_bf16_autocast(name: str) -> None:
    model = _build(name, **TRAIN_KWARGS[name]).train()
    reference = copy.deepcopy(model)
    x = _seed_input(2, 3, 64, 64)
    outs = _train_step(model, x, amp=True)
    expected = _train_step(reference, x, amp=False)
    for out, ref in zip(outs, expected):
        assert torch.isfinite(out).all()
        assert not torch.equal(out.float(), ref)  # autocast was in effect
        assert_close_to_scale(out.float(), ref, rel=OUTPUT_REL)
    _assert_every_gradient_finite(model)
    assert_close_to_scale(_flat_grads(model), _flat_grads(reference), rel=GRAD_REL)
    for (b_name, buf), ref in zip(model.named_buffers(), reference.buffers()):
        assert buf.dtype == ref.dtype, b_name  # BN statistics stay float32
        assert_close_to_scale(buf.float(), ref.float(), rel=OUTPUT_REL, msg=b_name)


def test_overlock_trains_with_batch_statistics_under_bf16_autocast() -> None:
    """Plain training mode: the re-parameterisable blocks take their module path (BNs on batch
    statistics in float32); every gradient is there and finite, and each BatchNorm updated its
    running statistics once, like the float32 step. The updates are compared as a whole (all
    buffers, relative to the largest update): they average batch statistics, which on the
    ill-conditioned stage-4 maps (see ``TRAIN_KWARGS``) differ by up to 4% (measured); a
    missing or doubled update would differ by 100%."""
    model = _build('overlock').train()
    reference = copy.deepcopy(model)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = _seed_input(2, 3, 64, 64)
    outs = _train_step(model, x, amp=True)
    _train_step(reference, x, amp=False)
    assert all(torch.isfinite(o).all() for o in outs)
    _assert_every_gradient_finite(model)
    updates, expected = [], []
    for (b_name, buf), ref in zip(model.named_buffers(), reference.buffers()):
        assert buf.dtype == ref.dtype, b_name
        if b_name.endswith('num_batches_tracked'):
            assert torch.equal(buf, ref) and int(buf) == int(before[b_name]) + 1, b_name
        else:
            updates.append((buf - before[b_name]).flatten())
            expected.append((ref - before[b_name]).flatten())
    assert_close_to_scale(torch.cat(updates), torch.cat(expected), rel=1e-1)


@pytest.mark.parametrize('name', ['overlock', 'glnet'])
def test_backbone_inference_under_bf16_autocast(name: str) -> None:
    model = _build(name).eval()
    x = _seed_input(1, 3, 72, 56)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast('cpu', dtype=BF16):
            outs = model(x)
    for out, ref in zip(outs, expected):
        assert not torch.equal(out.float(), ref)
        assert_close_to_scale(out.float(), ref, rel=OUTPUT_REL)


# ------------------------------------------------------------------------------------------------
# The AMP switch of a training config (mmoverlock.apis.compile_amp.enable_amp)
# ------------------------------------------------------------------------------------------------
def _train_config(**wrapper) -> Config:
    optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1, weight_decay=0.01),
                         paramwise_cfg=dict(norm_decay_mult=0.0), clip_grad=dict(max_norm=1.0))
    optim_wrapper.update(wrapper)
    return Config(dict(optim_wrapper=optim_wrapper, default_scope='mmdet',
                       custom_imports=dict(imports=['mmoverlock'], allow_failed_imports=False)))


@pytest.mark.parametrize('dtype', ['bf16', 'bfloat16', BF16])
def test_enable_amp_on_the_cpu_builds_a_bfloat16_autocast_wrapper(dtype) -> None:
    cfg = enable_amp(_train_config(loss_scale='dynamic'), dtype, device='cpu')
    assert cfg.optim_wrapper == dict(
        type='CPUAmpOptimWrapper', optimizer=dict(type='SGD', lr=0.1, weight_decay=0.01),
        paramwise_cfg=dict(norm_decay_mult=0.0), clip_grad=dict(max_norm=1.0), dtype='bfloat16')
    assert cfg.custom_imports.imports == ['mmoverlock', 'mmoverlock.apis.compile_amp']
    assert enable_amp(copy.deepcopy(cfg), 'bf16', device='cpu').to_dict() == cfg.to_dict()

    conv = torch.nn.Conv2d(3, 4, 3)
    before = conv.weight.detach().clone()
    wrapper = build_optim_wrapper(conv, cfg.optim_wrapper)
    assert type(wrapper) is CPUAmpOptimWrapper and isinstance(wrapper, AmpOptimWrapper)
    assert not wrapper.loss_scaler.is_enabled()
    with wrapper.optim_context(conv):
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == BF16
        out = conv(_seed_input(2, 3, 6, 6))
    assert out.dtype == BF16 and not torch.is_autocast_enabled('cpu')
    wrapper.update_params(out.float().square().mean())
    assert not torch.equal(conv.weight.detach(), before)  # the step ran
    assert wrapper.state_dict()['loss_scaler'] == {}


def test_enable_amp_on_gpus_takes_mmengines_wrapper() -> None:
    fp16 = enable_amp(_train_config(), 'fp16', device='cuda').optim_wrapper
    assert (fp16.type, fp16.dtype, fp16.loss_scale) == ('AmpOptimWrapper', 'float16', 'dynamic')
    kept = enable_amp(_train_config(loss_scale=512.0), 'float16', device='cuda').optim_wrapper
    assert kept.loss_scale == 512.0  # an explicit loss scale is the user's choice
    bf16 = enable_amp(_train_config(), 'bf16', device='cuda')
    assert (bf16.optim_wrapper.type, bf16.optim_wrapper.dtype) == ('AmpOptimWrapper', 'bfloat16')
    assert bf16.optim_wrapper.loss_scale == dict(enabled=False)  # no scaling for bfloat16
    assert bf16.custom_imports.imports == ['mmoverlock']
    # switching bfloat16 -> float16 turns loss scaling back on
    assert enable_amp(bf16, 'fp16', device='cuda').optim_wrapper.loss_scale == 'dynamic'
    # an AMP wrapper of the CPU becomes the GPU's
    cpu = enable_amp(_train_config(), 'bf16', device='cpu')
    assert enable_amp(cpu, 'fp16', device='cuda').optim_wrapper.type == 'AmpOptimWrapper'


def test_enable_amp_refuses_what_cannot_work() -> None:
    with pytest.raises(UsageError, match='float16 AMP needs a GPU.*bf16'):
        enable_amp(_train_config(), 'fp16', device='cpu')
    with pytest.raises(UsageError, match="unknown AMP dtype 'fp8'.*bf16.*fp16"):
        enable_amp(_train_config(), 'fp8', device='cpu')
    with pytest.raises(UsageError, match="'mps' is not supported"):
        enable_amp(_train_config(), 'bf16', device='mps')
    with pytest.raises(UsageError, match='no optim_wrapper'):
        enable_amp(Config(dict(model=dict(type='X'))), 'bf16', device='cpu')
    with pytest.raises(UsageError, match='ApexOptimWrapper, which AMP would drop'):
        enable_amp(_train_config(type='ApexOptimWrapper'), 'bf16', device='cpu')
    several = Config(dict(optim_wrapper=dict(
        constructor='MultiOptimWrapperConstructor',
        generator=dict(optimizer=dict(type='SGD', lr=0.1)),
        discriminator=dict(optimizer=dict(type='SGD', lr=0.1)))))
    with pytest.raises(UsageError, match='single optim_wrapper'):
        enable_amp(several, 'bf16', device='cpu')
    with pytest.raises(ValueError, match='bfloat16 only'):
        CPUAmpOptimWrapper(dtype='float16', optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1))
    with pytest.raises(ValueError, match='no loss_scale'):
        CPUAmpOptimWrapper(loss_scale='dynamic',
                           optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1))
