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
from helpers import write_tiny_config
from torch import nn

import mmoverlock.ops as ops
from mmoverlock.apis.analysis import build_backbone
from mmoverlock.models.layers.overlock_blocks import DynamicConvBlock, contmix_logits
from mmoverlock.utils.flops import count_complexity

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
