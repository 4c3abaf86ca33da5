"""The backbones name a bad input batch (empty, wrong channel count, not 4-D) at the top of forward,
and the tools report it as one ``error:`` line."""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TINY_ARCH, load_tool

from mmoverlock import GLNet, OverLoCK
from mmoverlock.models.utils.image_batch import ImageBatchError, check_image_batch

pytestmark = pytest.mark.usefixtures('single_thread')

TINY_G = dict(depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128], mlp_ratios=2,
              mixing_modes=['glmix', 'glmix', 'glmix.mha_nchw', 'mha_nchw'])


def _backbones() -> list[torch.nn.Module]:
    return [OverLoCK(TINY_ARCH).eval(), GLNet(TINY_G).eval()]


@pytest.mark.parametrize('index', [0, 1], ids=['OverLoCK', 'GLNet'])
def test_bad_batches_are_named_at_the_top_of_forward(index: int) -> None:
    model = _backbones()[index]
    name = type(model).__name__
    with torch.no_grad():
        assert len(model(torch.randn(1, 3, 64, 64))) == 4  # a good batch still runs
        with pytest.raises(ValueError, match=rf'{name} got an empty batch \(input shape '
                                             r'\(0, 3, 64, 64\)\).*dataset may be empty'):
            model(torch.zeros(0, 3, 64, 64))
        with pytest.raises(ImageBatchError, match=r'3-channel \(RGB\) images, got 4 channels '
                                                  r'\(input shape \(2, 4, 64, 64\)\).*alpha'):
            model(torch.zeros(2, 4, 64, 64))
        with pytest.raises(ImageBatchError, match=r'got 64 channels.*\(N, H, W, C\)'):
            model(torch.zeros(1, 64, 64, 3))  # channels-last numpy layout
        with pytest.raises(ImageBatchError, match=r'3-D tensor of shape \(3, 64, 64\).*x\[None\]'):
            model(torch.zeros(3, 64, 64))


def _stem(x: torch.Tensor) -> torch.Tensor:
    check_image_batch(x, 'Net')
    return x.mean(dim=(1, 2, 3))


@pytest.mark.parametrize('dynamic', [False, True])
def test_check_is_compile_friendly(dynamic: bool) -> None:
    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 8)
    whole = torch.compile(_stem, backend='eager', fullgraph=True, dynamic=dynamic)
    assert torch.equal(whole(x), _stem(x))  # fullgraph=True: a graph break would raise
    assert whole(torch.randn(5, 3, 9, 9)).shape == (5,)
    compiled = torch.compile(_stem, backend='eager', dynamic=dynamic)
    with pytest.raises(ImageBatchError, match='got 1 channels'):
        compiled(torch.randn(2, 1, 8, 8))
    with pytest.raises(ImageBatchError, match='empty batch'):
        compiled(torch.randn(0, 3, 8, 8))


def test_check_is_silent_under_jit_trace() -> None:
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter('error', torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='.*torch.jit.trace.* is deprecated')
        traced = torch.jit.trace(_stem, x)
    assert [n.kind() for n in traced.graph.nodes()].count('aten::mean') == 1
    assert 'aten::size' not in str(traced.graph) and torch.equal(traced(x), _stem(x))


def test_tools_report_a_bad_batch_in_one_line(capsys: pytest.CaptureFixture) -> None:
    run_main = load_tool('_cli').run_main
    model = OverLoCK(TINY_ARCH).eval()
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: model(torch.zeros(0, 3, 64, 64)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: OverLoCK got an empty batch') and err.count('\n') == 1, err
