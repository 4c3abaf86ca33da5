"""FLOPs / parameter counting (mmoverlock.utils.flops, tools/analysis/get_flops.py).

The published figures are checked on the ``meta`` device (no compute): about 5 s for all four.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARCH, write_tiny_config
from torch import nn

import mmoverlock.ops as ops
from mmoverlock.apis.analysis import (
    build_backbone,
    build_config_model,
    count_config_complexity,
    count_model_complexity,
)
from mmoverlock.apis.errors import UsageError
from mmoverlock.models.backbones.overlock import OverLoCK
from mmoverlock.models.layers.basic import DepthwiseConv2d
from mmoverlock.models.layers.dilated_reparam import DILATED_BRANCHES, DilatedReparamBlock
from mmoverlock.models.layers.overlock_blocks import DynamicConvBlock, contmix_logits
from mmoverlock.utils.flops import MacCounter, count_complexity

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'analysis' / 'get_flops.py'

#: Paper (CVPR 2025) Table: params (M) and FLOPs (G) of the ImageNet classifiers at 224 x 224.
PUBLISHED = {'xt': (16, 2.6), 't': (33, 5.5), 's': (56, 9.7), 'b': (95, 16.7)}


def load_get_flops():
    spec = importlib.util.spec_from_file_location('mmoverlock_tool_get_flops', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('arch', list(PUBLISHED))
def test_published_classifier_figures(arch: str) -> None:
    """Deploy classifier at 224, params without aux_head, FLOPs = conv + matmul MACs."""
    model = build_backbone('OverLoCK', arch, classifier=True, deploy=True, device='meta')
    result = count_complexity(model, torch.empty(1, 3, 224, 224, device='meta'),
                              exclude_params=('aux_head.',))
    params, flops = PUBLISHED[arch]
    assert result.num_params / 1e6 == pytest.approx(params, rel=0.03)
    assert result.paper() / 1e9 == pytest.approx(flops, rel=0.03)
    # The aggregation op is counted (about 1 % of the total) and reported on its own.
    assert 0.005 < result.category('aggregation') / result.total() < 0.02
    assert result.total() == result.paper() + result.category('aggregation')
    assert result.operators['neighborhood_aggregate'] == result.category('aggregation')
    assert result.excluded_params > 0  # aux_head


def test_neighborhood_op_alone() -> None:
    """The op alone: B * G * H * W * K * K * C MACs, nothing else counted (all backends)."""
    b, g, h, w, k, c = 2, 3, 9, 11, 5, 4
    attn = torch.rand(b, g, h, w, k * k)
    value = torch.rand(b, g, h, w, c)
    for backend in ('torch', 'unfold'):
        result = count_complexity(
            nn.Identity(), lambda be=backend: ops.neighborhood_aggregate(attn, value, be))
        assert result.total() == b * g * h * w * k * k * c == result.category('aggregation')
        assert result.calls['neighborhood_aggregate'] == 1


def test_conv_linear_attention_by_hand() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    linear = nn.Linear(6, 5)
    result = count_complexity(conv, torch.rand(2, 4, 10, 12))
    assert result.total() == result.category('conv') == 2 * 10 * 12 * 8 * (4 // 2) * 9
    result = count_complexity(linear, torch.rand(3, 7, 6))
    assert result.category('matmul') == 3 * 7 * 6 * 5
    q, k, v = torch.rand(2, 4, 16, 8), torch.rand(2, 4, 10, 8), torch.rand(2, 4, 10, 6)
    result = count_complexity(nn.Identity(), lambda: F.scaled_dot_product_attention(q, k, v))
    assert result.category('matmul') == 2 * 4 * 16 * 10 * (8 + 6)


def test_contmix_by_hand() -> None:
    """One DynamicConvBlock: ContMix's matmuls and aggregation against their formulas."""
    dim, ctx, kernel, heads, size = 32, 8, 7, 2, 14
    block = DynamicConvBlock(dim, ctx, kernel, heads, is_first=True).eval()
    x, h = torch.rand(1, dim, size, size), torch.rand(1, ctx, size, size)
    result = count_complexity(block, (x, h, h))
    groups, pixels, regions = 2 * heads, size * size, 7 * 7
    taps = kernel ** 2 + 5 ** 2
    affinity = pixels * (dim // 2) * regions  # q^T k over all groups
    weight_proj = groups * pixels * regions * taps
    assert result.category('matmul') == affinity
    assert result.category('aggregation') == pixels * (dim // 2) * taps
    assert result.calls['neighborhood_aggregate'] == 2
    # the kernel logits alone: q^T k (a matmul) and weight_proj (a 1x1 conv over the affinities)
    query, key = torch.rand(1, dim // 2, size, size), torch.rand(1, dim // 2, 7, 7)
    proj = block.weight_proj
    logits = count_complexity(nn.Identity(), lambda: contmix_logits(
        query, key, proj.weight, proj.bias, groups))
    assert logits.category('matmul') == affinity
    assert logits.category('conv') == weight_proj


def test_get_flops_cli_classifier(capsys: pytest.CaptureFixture) -> None:
    rows = load_get_flops().main(['--classifier', '--arch', 'xt'])
    out = capsys.readouterr().out
    assert '| OverLoCK-cls xt | 224x224 | deploy | 16.45 |' in out
    assert rows[0]['published_flops'] == 2.6e9
    assert math.isclose(rows[0]['paper'] / 2.6e9, 1, rel_tol=0.03)


def test_get_flops_cli_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_tiny_config(tmp_path, 'det', str(tmp_path / 'no_data'))
    rows = load_get_flops().main([config, '--shape', '64', '--json', str(tmp_path / 'f.json')])
    out = capsys.readouterr().out
    assert rows[0]['aggregation'] > 0 and rows[0]['conv'] > 0
    for module in ('backbone', 'neck', 'rpn_head', 'roi_head'):
        assert f'| {module} |' in out
    assert (tmp_path / 'f.json').is_file()


def test_convolutions_count_alike_on_cpu_and_meta() -> None:
    # on real CPU tensors 1x1 convs run as aten.mkldnn_convolution (pointwise_conv2d), on the meta
    # device as aten.convolution: the same MACs either way
    block = DynamicConvBlock(32, 8, 7, 2, is_first=True).eval()
    shapes = ((1, 32, 14, 14), (1, 8, 14, 14), (1, 8, 14, 14))
    cpu = count_complexity(block, tuple(torch.rand(s) for s in shapes))
    meta = count_complexity(block.to('meta'), tuple(torch.rand(s, device='meta') for s in shapes))
    assert cpu.operators.get('mkldnn_convolution', 0) > 0
    for category in ('conv', 'matmul', 'aggregation'):
        assert cpu.category(category) == meta.category(category) > 0


# ----------------------------------------------------------------------------------------------
# Convolutions count as defined (issue 13): whatever route the CPU takes, in either form
# ----------------------------------------------------------------------------------------------
def branch_taps(kernel_size: int) -> int:
    """Taps of a DilatedReparamBlock's small branches (each k x k, whatever its dilation)."""
    return sum(k * k for k in DILATED_BRANCHES[kernel_size][0])


def extra_branch_macs(arch: dict, size: int) -> int:
    """MACs the training form adds to the deploy form on one ``size x size`` image, from the arch
    definition: each DilatedReparamBlock (C channels, large kernel K, on an h x w map) runs its
    branches besides the K x K kernel both forms have, ``C * h * w * sum(k * k)``. Stage i's
    ``depth[i]`` RepConvBlocks run at stride 2^(i+2), the ``sub_depth`` DynamicConvBlocks of
    stages 3 and 4 (one block each) at strides 16 and 32."""
    blocks = [(arch['depth'][i], arch['embed_dim'][i], arch['kernel_size'][i], 2 ** (i + 2))
              for i in range(4)]
    blocks += [(arch['sub_depth'][s], arch['embed_dim'][2 + s], arch['kernel_size'][2 + s],
                2 ** (4 + s)) for s in range(2)]
    return sum(count * channels * branch_taps(kernel) * (size // stride) ** 2
               for count, channels, kernel, stride in blocks)


@pytest.mark.usefixtures('single_thread')
@pytest.mark.parametrize('device', ['cpu', 'meta'])
@pytest.mark.parametrize('kernel_size,dilation', [(13, 1), (11, 1), (9, 2), (3, 7)])
def test_depthwise_conv_counts_its_defined_taps(device: str, kernel_size: int,
                                                dilation: int) -> None:
    """On the CPU 11x11 / 13x13 kernels run zero-embedded in 15x15 and dilated maps are padded
    beforehand; counted, every kernel is its own k x k taps (not 15 x 15, not the dilated
    extent) on every device."""
    channels, size = 256, 32
    conv = DepthwiseConv2d(channels, kernel_size, dilation=dilation, bias=False).to(device)
    x = torch.rand(1, channels, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    result = count_complexity(conv, x)
    assert result.total() == result.category('conv') == \
        channels * kernel_size * kernel_size * size * size
    if (kernel_size, dilation) == (13, 1):
        assert result.total() == 44_302_336


@pytest.mark.usefixtures('single_thread')
def test_counting_does_not_change_the_values() -> None:
    conv = DepthwiseConv2d(64, 13, bias=True)
    x = torch.rand(2, 64, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, conv.bias, padding=6, groups=64)
        plain = conv(x)
        with MacCounter(conv):
            counted = conv(x)
        after = conv(x)
    torch.testing.assert_close(counted, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, plain)  # the CPU route is back after counting


@pytest.mark.usefixtures('single_thread')
def test_fused_training_branches_count_their_defined_taps() -> None:
    """Training on the CPU runs a DilatedReparamBlock as one function (conv_bn_sum); counted by
    hand, its K x K kernel and each branch count their own taps."""
    channels, kernel, size = 32, 13, 16
    block = DilatedReparamBlock(channels, kernel).train()
    x = torch.rand(2, channels, size, size)
    assert block._fuse_in_training(x)
    with MacCounter(block) as counter:
        block(x)
    taps = kernel * kernel + branch_taps(kernel)
    assert counter.inclusive()['']['conv'] == 2 * channels * taps * size * size
    assert counter.calls['convolution'] == 1 + len(DILATED_BRANCHES[kernel][0])


@pytest.mark.usefixtures('single_thread')
@pytest.mark.parametrize('device', ['cpu', 'meta'])
def test_block_forms_count_their_defined_kernels(device: str) -> None:
    """In eval mode a training-form block merges its branches into one 13 x 13 kernel on the fly
    (counted as that: 169 taps); counted as the training form, every branch on its own."""
    channels, kernel, size = 32, 13, 16
    block = DilatedReparamBlock(channels, kernel).to(device).eval()
    x = torch.rand(1, channels, size, size, device=device)
    merged = count_model_complexity(block, x)
    train = count_model_complexity(block, x, train_form=True)
    assert merged.total() == channels * kernel * kernel * size * size
    assert train.total() == channels * (kernel * kernel + branch_taps(kernel)) * size * size
    assert train.calls['convolution'] == 1 + len(DILATED_BRANCHES[kernel][0])
    block.reparameterize()
    assert count_model_complexity(block, x).total() == merged.total()
    with pytest.raises(UsageError, match='already re-parameterised'):
        count_model_complexity(block, x, train_form=True)


@pytest.mark.usefixtures('single_thread')
def test_whole_overlock_counts_alike_on_cpu_and_meta() -> None:
    """OverLoCK-XT's classifier (13x13 kernels in stage 3, dilated branches padded beforehand on
    the CPU) at 64 x 64: the same MACs on the CPU as on the meta device, in both forms, and the
    training form exceeds the deploy form by exactly its branch taps."""
    arch, size = OverLoCK.arch_zoo['xt'], 64
    counts = {}
    for device in ('cpu', 'meta'):
        model = build_backbone('OverLoCK', 'xt', classifier=True, device=device)
        x = torch.rand(1, 3, size, size, device=device)
        for train_form in (True, False):
            result = count_model_complexity(model, x, train_form=train_form)
            counts[device, train_form] = {c: result.category(c) for c in ('conv', 'matmul',
                                                                           'aggregation')}
    for train_form in (True, False):
        assert counts['cpu', train_form] == counts['meta', train_form]
    train, deploy = counts['cpu', True], counts['cpu', False]
    assert train['conv'] - deploy['conv'] == extra_branch_macs(arch, size)
    assert train['matmul'] == deploy['matmul'] and train['aggregation'] == deploy['aggregation']


def test_get_flops_train_form_counts_every_branch(capsys: pytest.CaptureFixture) -> None:
    tool = load_get_flops()
    size = 64
    common = ['--arch', repr(TINY_ARCH), '--shape', str(size)]
    deploy = tool.main(common)[0]
    train = tool.main(common + ['--train-form'])[0]
    assert (deploy['form'], train['form']) == ('deploy', 'train')
    assert train['macs'] - deploy['macs'] == extra_branch_macs(TINY_ARCH, size) > 0
    assert train['params'] > deploy['params']  # the branches' kernels and BNs
    with pytest.raises(UsageError, match='already re-parameterised'):
        tool.main(common + ['--train-form', '--backbone-args', 'deploy=True'])


@pytest.mark.usefixtures('single_thread')
def test_config_train_form_counts_every_branch(tmp_path: Path) -> None:
    """A whole detector on the CPU: the backbone's training form adds its branch taps."""
    config = write_tiny_config(tmp_path, 'det', str(tmp_path / 'no_data'))
    model, _ = build_config_model(config)
    size = 64
    deploy = count_config_complexity(model, (size, size))
    train = count_config_complexity(model, (size, size), train_form=True)
    assert train.total('backbone') - deploy.total('backbone') == extra_branch_macs(TINY_ARCH, size)
