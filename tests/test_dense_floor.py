"""benchmarks/dense_floor.py: what it records and how it compares with the goals."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import load_benchmark

from mmoverlock.models.backbones.overlock import OverLoCK

TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96],
            kernel_size=[7, 7, 5, 5], sub_num_heads=[2, 2], mlp_ratio=[4, 4, 4, 4],
            sub_mlp_ratio=[3, 3])


def load():
    return load_benchmark('dense_floor')


def test_records_every_dense_convolution_once_per_forward() -> None:
    floor = load()
    model = OverLoCK(TINY)
    convs = floor.record_dense_convs(model, torch.randn(1, 3, 64, 64), train=False)
    dense = [m for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    # every dense Conv2d module runs once in eval (a re-parameterised block has none of its own)
    assert sum(convs.values()) == len(dense)
    assert all(len(key[2]) == 4 and key[2][1] > 0 for key in convs)
    trained = floor.record_dense_convs(model, torch.randn(2, 3, 64, 64), train=True)
    assert sum(trained.values()) == len(dense)  # recomputation happens in backward, not counted


def test_routes_compute_the_same_convolution() -> None:
    floor = load()
    key = ((1, 8, 6, 5), True, (12, 8, 1, 1), True, (1, 1), (0, 0), (1, 1))
    routes = floor.conv_routes(key, train=False)
    assert set(routes) == {'aten', 'onednn'}
    outs = [fn() for fn in routes.values()]
    assert outs[0].shape == (1, 12, 6, 5)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    train_routes = floor.conv_routes(key, train=True)
    assert set(train_routes) == {'aten', 'mmoverlock'}
    assert floor.time_route(train_routes['mmoverlock'], runs=1) > 0


def test_goals_from_a_backbone_result(tmp_path: Path) -> None:
    floor = load()
    result = dict(rows=[
        dict(arch='t', mode='eval', ours=dict(median_s=0.8), baseline=dict(median_s=2.0),
             swin=dict(median_s=0.6)),
        dict(arch='t', mode='train', ours=dict(median_s=9.0), baseline=dict(median_s=30.0),
             swin=dict(median_s=3.0)),
        dict(arch='xt', mode='eval', ours=dict(median_s=0.4), baseline=dict(median_s=1.0))])
    path = tmp_path / 'r.json'
    path.write_text(json.dumps(result))
    goals = floor.goals_of(str(path))
    assert goals[('t', 'eval')] == dict(ours_s=0.8, baseline_goal_s=0.5, swin_goal_s=0.6)
    assert goals[('t', 'train')]['baseline_goal_s'] == 12.0
    assert goals[('t', 'train')]['swin_goal_s'] == 4.5
    assert goals[('xt', 'eval')]['swin_goal_s'] == 0.6  # XT is held to T's Swin-T time
