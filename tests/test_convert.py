"""The authors' COCO (mmdet 2.x) and ADE20K (mmseg 0.x) checkpoint layouts load into our models.

The layout of their files is written here from two sources: the backbone keys of the authors'
models (tests/data/overlock_state_dict_keys.json.xz) and the head / neck keys that mmdet 2.28
and mmseg 0.30 give these detectors and segmentors, inside an mmcv 1.x checkpoint container.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from backbone_testing import load_manifest
from helpers import REPO, load_tool, write_tiny_arch_config

from mmoverlock.apis import (
    CheckpointMismatchError,
    build_model,
    load_checkpoint_strict,
    load_config,
)

pytestmark = pytest.mark.usefixtures('single_thread')

BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
WB = ('weight', 'bias')


def _params(prefix: str, names=WB) -> list[str]:
    return [f'{prefix}.{n}' for n in names]


def _conv_module(prefix: str, norm: bool) -> list[str]:
    """mmcv ConvModule: a conv with bias when there is no norm, else conv + BN (``bn``)."""
    return _params(f'{prefix}.conv', ('weight',) if norm else WB) + (
        _params(f'{prefix}.bn', BN) if norm else [])


def mmdet2_fpn_rpn(levels: int = 4) -> list[str]:
    keys = []
    for i in range(levels):
        keys += _conv_module(f'neck.lateral_convs.{i}', False)
        keys += _conv_module(f'neck.fpn_convs.{i}', False)
    for name in ('rpn_conv', 'rpn_cls', 'rpn_reg'):
        keys += _params(f'rpn_head.{name}')
    return keys


def mmdet2_roi_heads(prefix: str, mask_convs: int = 4) -> list[str]:
    """Shared2FCBBoxHead + FCNMaskHead keys of mmdet 2.x under ``prefix`` (``roi_head`` or
    ``roi_head`` with a stage index for Cascade R-CNN)."""
    bbox, mask = prefix.format(head='bbox_head'), prefix.format(head='mask_head')
    keys = [k for name in ('shared_fcs.0', 'shared_fcs.1', 'fc_cls', 'fc_reg')
            for k in _params(f'{bbox}.{name}')]
    for i in range(mask_convs):
        keys += _conv_module(f'{mask}.convs.{i}', False)
    return keys + _params(f'{mask}.upsample') + _params(f'{mask}.conv_logits')


def mmseg0_upernet(levels: int = 4, pool_scales: int = 4) -> list[str]:
    keys = _params('decode_head.conv_seg') + _params('auxiliary_head.conv_seg')
    keys += [k for i in range(pool_scales)
             for k in _conv_module(f'decode_head.psp_modules.{i}.1', True)]
    keys += _conv_module('decode_head.bottleneck', True)
    for i in range(levels - 1):
        keys += _conv_module(f'decode_head.lateral_convs.{i}', True)
        keys += _conv_module(f'decode_head.fpn_convs.{i}', True)
    keys += _conv_module('decode_head.fpn_bottleneck', True)
    return keys + _conv_module('auxiliary_head.convs.0', True)


def legacy_head_keys(kind: str, mask_convs: int = 4) -> list[str]:
    if kind == 'mask_rcnn':
        return mmdet2_fpn_rpn() + mmdet2_roi_heads('roi_head.{head}', mask_convs)
    if kind == 'cascade':
        return mmdet2_fpn_rpn() + [k for s in range(3)
                                   for k in mmdet2_roi_heads(f'roi_head.{{head}}.{s}', mask_convs)]
    return mmseg0_upernet()


def legacy_checkpoint(state: dict, library: str, classes: tuple) -> dict:
    """An mmcv 1.x checkpoint as mmdet 2.28 / mmseg 0.30 save it."""
    version = {'mmdet': ('mmdet_version', '2.28.2'), 'mmseg': ('mmseg_version', '0.30.0')}
    key, value = version[library]
    meta = {key: value, 'mmcv_version': '1.7.1', 'CLASSES': classes, 'epoch': 12,
            'iter': 87960, 'time': 'Sun Mar  2 10:00:00 2025', 'config': "model = dict(...)",
            'env_info': 'sys.platform: linux', 'seed': 0, 'exp_name': 'overlock.py',
            'hook_msgs': {'last_ckpt': 'work_dirs/x/epoch_12.pth'}}
    if library == 'mmseg':
        meta['PALETTE'] = [[120, 120, 120]] * len(classes)
    optimizer = {'state': {0: {'step': torch.tensor(10.0), 'exp_avg': torch.zeros(3)}},
                 'param_groups': [{'lr': 2e-6, 'betas': (0.9, 0.999), 'weight_decay': 0.05,
                                   'params': [0]}]}
    return {'meta': meta, 'state_dict': OrderedDict(state), 'optimizer': optimizer}


CASES = {
    # config, model kind, arch in the reference json, backbone form
    'mask_rcnn_xt': ('configs/detection/maskrcnn_overlock_xt_1x.py', 'mask_rcnn', 'xt',
                     'detection'),
    'cascade_t': ('configs/detection/cascade_maskrcnn_overlock_t_3x.py', 'cascade', 't',
                  'detection'),
    'upernet_xt': ('configs/segmentation/upernet_overlock_xt_160k_ade20k.py', 'upernet', 'xt',
                   'segmentation'),
}


def _model(config: str):
    cfg = load_config(str(REPO / config))
    cfg.model.backbone.init_cfg = None
    return build_model(cfg)


@pytest.fixture(scope='module')
def reference_keys() -> dict:
    return load_manifest('overlock')


@pytest.mark.parametrize('case', list(CASES))
def test_authors_layout_is_our_layout(case: str, reference_keys: dict) -> None:
    """Their backbone (json) + mmdet 2.x / mmseg 0.x heads: exactly our model's keys/shapes."""
    config, kind, arch, form = CASES[case]
    ours = _model(config).state_dict()
    backbone = {f'backbone.{name}': tuple(shape) for name, shape in reference_keys[arch][form]}
    heads = legacy_head_keys(kind)
    assert len(set(heads)) == len(heads)
    assert set(ours) == set(backbone) | set(heads)
    assert {k: tuple(ours[k].shape) for k in backbone} == backbone


def _their_checkpoint(model, kind: str, library: str, classes: tuple, path: Path) -> Path:
    """Write ``model``'s weights as the authors' file would hold them."""
    ours = model.state_dict()
    heads = legacy_head_keys(kind)
    legacy = OrderedDict((k, v.clone()) for k, v in ours.items() if k.startswith('backbone.'))
    legacy.update((k, ours[k].clone()) for k in heads)  # KeyError if a 2.x name were gone
    torch.save(legacy_checkpoint(legacy, library, classes), path)
    return path


def test_mmdet2_checkpoint_converts_and_loads_strictly(tmp_path: Path) -> None:
    # the COCO Mask R-CNN config, with a tiny backbone arch to keep the file small
    config = write_tiny_arch_config(tmp_path, 'configs/detection/maskrcnn_overlock_xt_1x.py')
    cfg = load_config(config)
    source = build_model(cfg)
    source.init_weights()
    from mmdet.datasets import CocoDataset
    classes = CocoDataset.METAINFO['classes']
    theirs = _their_checkpoint(source, 'mask_rcnn', 'mmdet', classes, tmp_path / 'theirs.pth')

    converted = tmp_path / 'converted.pth'
    load_tool('convert_checkpoint').main([str(theirs), str(converted), '--config', config])
    result = torch.load(converted, map_location='cpu', weights_only=True)
    assert set(result) == {'meta', 'state_dict'}  # mmcv-1 optimizer state dropped
    assert result['meta']['dataset_meta'] == {'classes': classes}
    assert result['meta']['converted_from'] == 'mmdet 2.28.2, mmcv 1.7.1'
    assert set(result['state_dict']) == set(source.state_dict())

    for path in (theirs, converted):  # converted on load, or converted before
        target = build_model(cfg)
        meta = load_checkpoint_strict(target, str(path))
        assert meta['dataset_meta']['classes'] == classes
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def test_mmseg0_checkpoint_evaluates_with_test_tool(tiny_seg_config: str, tmp_path: Path) -> None:
    cfg = load_config(tiny_seg_config)
    source = build_model(cfg)
    source.init_weights()
    classes = ('background', 'circle', 'square', 'triangle')
    theirs = _their_checkpoint(source, 'upernet', 'mmseg', classes, tmp_path / 'theirs.pth')
    shows = tmp_path / 'shows'
    metrics = load_tool('test').main([tiny_seg_config, str(theirs), '--show-dir', str(shows),
                                      '--work-dir', str(tmp_path / 'work')])
    # the converted file holds the same model: it scores exactly what the source model scores
    ours = tmp_path / 'ours.pth'
    torch.save(dict(state_dict=source.state_dict(), meta=dict(dataset_meta=dict(
        classes=classes))), ours)
    expected = load_tool('test').main([tiny_seg_config, str(ours),
                                       '--work-dir', str(tmp_path / 'work_ours')])
    for key in ('mIoU', 'aAcc', 'mAcc'):
        assert metrics[key] == expected[key], key
    assert len(list(shows.rglob('*.png'))) == 4  # one drawing per validation image


def test_ddp_prefixed_bare_state_dict_loads(tiny_seg_config: str, tmp_path: Path) -> None:
    model = build_model(load_config(tiny_seg_config))
    path = tmp_path / 'bare.pth'
    torch.save({f'module.{k}': v for k, v in model.state_dict().items()}, path)
    load_checkpoint_strict(build_model(load_config(tiny_seg_config)), str(path))


def test_wrong_task_or_form_is_refused(tiny_seg_config: str, tmp_path: Path) -> None:
    det_config = write_tiny_arch_config(tmp_path, 'configs/detection/maskrcnn_overlock_xt_1x.py')
    det = build_model(load_config(det_config))
    seg = build_model(load_config(tiny_seg_config))
    det_file, seg_file = tmp_path / 'det.pth', tmp_path / 'seg.pth'
    torch.save({'state_dict': det.state_dict()}, det_file)
    torch.save({'state_dict': seg.state_dict()}, seg_file)
    with pytest.raises(CheckpointMismatchError, match='not interchangeable'):
        load_checkpoint_strict(seg, str(det_file))
    with pytest.raises(CheckpointMismatchError, match='detection form of OverLoCK'):
        load_checkpoint_strict(seg, str(det_file))
    with pytest.raises(CheckpointMismatchError, match='segmentation form'):
        load_checkpoint_strict(det, str(seg_file))
    # a head with other class counts: named, with the hint
    cfg = load_config(det_config)
    cfg.model.roi_head.bbox_head.num_classes = 3
    cfg.model.roi_head.mask_head.num_classes = 3
    with pytest.raises(CheckpointMismatchError, match='num_classes'):
        load_checkpoint_strict(build_model(cfg), str(det_file))
