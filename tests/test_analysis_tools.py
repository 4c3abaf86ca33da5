"""tools/visualize_erf.py, tools/analysis/benchmark.py and their library parts, on tiny models."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_config

from mmoverlock.apis.analysis import benchmark_config
from mmoverlock.utils.benchmark import time_callable
from mmoverlock.utils.erf import area_ratio

TOOLS = Path(__file__).resolve().parents[1] / 'tools'

TINY_OVERLOCK = ("{'depth': [1, 1, 1, 1], 'sub_depth': [2, 2], 'embed_dim': [16, 32, 64, 96], "
                 "'kernel_size': [9, 7, 7, 5], 'sub_num_heads': [2, 3], 'mlp_ratio': [4, 4, 4, 4],"
                 " 'sub_mlp_ratio': [3, 3]}")
TINY_GLNET = ("{'depth': [1, 1, 2, 1], 'embed_dim': [32, 64, 96, 128], 'mlp_ratios': 2, "
              "'mixing_modes': ['glmix', 'glmix', 'glmix.mha_nchw', 'mha_nchw']}")


def load_tool(relative: str):
    path = TOOLS / relative
    spec = importlib.util.spec_from_file_location(f'mmoverlock_tool_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('backbone,arch', [('OverLoCK', TINY_OVERLOCK), ('GLNet', TINY_GLNET)])
def test_visualize_erf(tmp_path: Path, backbone: str, arch: str) -> None:
    out = tmp_path / 'erf.png'
    result = load_tool('visualize_erf.py').main(
        ['--backbone', backbone, '--arch', arch, '--size', '96', '--num-images', '2',
         '--batch-size', '2', '--out', str(out), '--save-maps', str(tmp_path / 'maps.pt')])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (tmp_path / 'maps.pt').is_file()
    maps = result['maps']
    assert maps.shape == (4, 96, 96) and bool((maps.sum(dim=(1, 2)) > 0).all())
    for method in ('square', 'pixels'):
        ratios = result['ratios'][method]
        # the ERF widens with depth: the last stage's covers more than the first's
        assert ratios[3][0.5] > ratios[0][0.5]
        assert ratios[3][0.99] > ratios[0][0.99]
        for stage in ratios:
            assert stage[0.2] <= stage[0.5] <= stage[0.99] <= 1


def test_area_ratio_definitions() -> None:
    point = torch.zeros(9, 9)
    point[4, 4] = 1.0
    assert area_ratio(point, 0.99, 'square') == area_ratio(point, 0.99, 'pixels') == 1 / 81
    uniform = torch.ones(10, 10)
    assert area_ratio(uniform, 0.5, 'pixels') == 0.5
    assert area_ratio(uniform, 1.0, 'square') == 1.0
    ring = torch.zeros(11, 11)
    ring[5, 5], ring[5, 7] = 1.0, 1.0  # half the mass two pixels right of the centre
    assert area_ratio(ring, 0.5, 'square') == 1 / 121
    assert area_ratio(ring, 0.99, 'square') == 25 / 121
    assert area_ratio(ring, 0.99, 'pixels') == 2 / 121


def test_time_callable() -> None:
    calls = []
    timing = time_callable(lambda: calls.append(1), iters=4, warmup=2, batch_size=3)
    assert len(calls) == 6 and len(timing.times) == 4
    assert timing.fps == pytest.approx(3 / timing.median)
    assert set(timing.as_dict()) >= {'mean_s', 'median_s', 'fps', 'times_s'}


def test_benchmark_detector_deploy_fuse(tmp_path: Path) -> None:
    """The core function on a tiny Mask R-CNN: predict mode, re-parameterised and BN-fused."""
    config = write_tiny_config(tmp_path, 'det', str(tmp_path / 'no_data'))
    result = benchmark_config(config, shape=(64, 64), iters=2, warmup=1, deploy=True,
                              fuse=True)
    timing = result['timing']
    assert len(timing.times) == 2 and timing.fps > 0
    assert result['conversion']['reparameterized'] == ['backbone']
    assert result['conversion']['rel_diff'] < 1e-4


def test_benchmark_cli_segmentor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_tiny_config(tmp_path, 'seg', str(tmp_path / 'no_data'))
    out = tmp_path / 'bench.json'
    load_tool('analysis/benchmark.py').main(
        [config, '--shape', '64', '--iters', '2', '--warmup', '1', '--mode', 'tensor',
         '--device', 'cpu', '--json', str(out)])
    assert '| tiny_seg | 64x64 | 1 | tensor |' in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record['timing']['iters'] == 2 and record['timing']['fps'] > 0
