"""Missing files and mismatched configs give one clear message, not a traceback deep in mmdet."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import DET_DEMO, REPO, cli_error, load_tool, write_tiny_config

from mmoverlock.apis import (
    CheckpointNotFoundError,
    ConfigMismatchError,
    ConfigNotFoundError,
    DataNotFoundError,
    UsageError,
    check_model_config,
    load_config,
    prepare_config,
)
from mmoverlock.apis.errors import MissingFilesError

pytestmark = pytest.mark.usefixtures('single_thread')

T_1X = str(REPO / 'configs' / 'detection' / 'maskrcnn_overlock_t_1x.py')
SEG_T = str(REPO / 'configs' / 'segmentation' / 'upernet_overlock_t_160k_ade20k.py')
GLNET_1X = str(REPO / 'configs' / 'detection' / 'maskrcnn_glnet_4g_1x.py')
# Stock OpenMMLab configs with OverLoCK-XT dropped in (tests/test_dropin.py trains them).
SEM_FPN = str(REPO / 'configs' / 'dropin' / 'fpn_overlock_xt_160k_ade20k-512x512.py')
MASK2FORMER = str(REPO / 'configs' / 'dropin' / 'mask2former_overlock_xt_160k_ade20k-512x512.py')
RETINANET = str(REPO / 'configs' / 'dropin' / 'retinanet_overlock_xt_fpn_1x_coco.py')
DINO = str(REPO / 'configs' / 'dropin' / 'dino-4scale_overlock_xt_12e_coco.py')
XT = [56, 112, 340, 420]




def test_missing_config_file(capsys: pytest.CaptureFixture) -> None:
    wrong = str(REPO / 'configs' / 'detection' / 'maskrcnn_overlock_t_1X.py')
    err = cli_error('train', [wrong], capsys)
    assert 'does not exist' in err and 'maskrcnn_overlock_t_1x.py' in err  # the close match
    with pytest.raises(ConfigNotFoundError):
        load_config('no/such/config.py')


def test_missing_coco_data_root(tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where data/coco/ is certainly missing
    err = cli_error('train', [T_1X, '--work-dir', str(tmp_path / 'w')], capsys)
    assert "'data/coco/'" in err
    assert 'train_dataloader.dataset.data_root' in err
    assert 'cocodataset.org' in err and '--cfg-options' in err and 'tools/demo.py' in err


def test_missing_annotation_file_and_evaluator_file(tmp_path: Path, coco_root: str) -> None:
    cfg = load_config(write_tiny_config(tmp_path, 'det', coco_root))
    cfg.train_dataloader.dataset.ann_file = 'annotations/nope.json'
    with pytest.raises(DataNotFoundError, match='nope.json') as exc:
        prepare_config(cfg, 'train')
    assert 'train_dataloader.dataset.ann_file' in str(exc.value)
    cfg = load_config(write_tiny_config(tmp_path, 'det', coco_root))
    cfg.test_evaluator.ann_file = str(tmp_path / 'gone.json')
    with pytest.raises(DataNotFoundError, match='test_evaluator.ann_file'):
        prepare_config(cfg, 'test')


def test_missing_ade_images(tmp_path: Path) -> None:
    cfg = load_config(SEG_T)
    cfg.merge_from_dict({f'{s}_dataloader.dataset.data_root': str(tmp_path / 'ade')
                         for s in ('train', 'val', 'test')})
    (tmp_path / 'ade').mkdir()
    with pytest.raises(DataNotFoundError) as exc:
        prepare_config(cfg, 'test')
    assert 'images/validation' in str(exc.value) and 'sceneparsing' in str(exc.value)


def test_missing_pretrained_weights(tmp_path: Path, coco_root: str) -> None:
    config = write_tiny_config(tmp_path, 'det', coco_root)
    for resume in (False, True):
        cfg = load_config(config)
        cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint='checkpoints/none.pth')
        cfg.resume = resume
        if not resume:
            with pytest.raises(CheckpointNotFoundError, match='model.backbone.init_cfg=None'):
                prepare_config(cfg, 'train')
        else:  # resuming replaces the ImageNet weights: they are not needed then
            prepare_config(cfg, 'train')
            assert cfg.model.backbone.init_cfg is None


def test_missing_checkpoints(tmp_path: Path, coco_root: str,
                             capsys: pytest.CaptureFixture) -> None:
    config = write_tiny_config(tmp_path, 'det', coco_root)
    err = cli_error('test', [config, str(tmp_path / 'missing.pth')], capsys)
    assert 'missing.pth' in err and 'does not exist' in err
    err = cli_error('train', [config, '--resume', str(tmp_path / 'missing.pth'),
                               '--work-dir', str(tmp_path / 'w')], capsys)
    assert '--resume' in err
    err = cli_error('convert_checkpoint', [str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')],
                     capsys)
    assert 'a.pth' in err


def test_neck_widths_of_another_arch() -> None:
    cfg = load_config(T_1X)
    cfg.model.backbone.arch = 's'  # the T config's FPN with an S backbone
    with pytest.raises(ConfigMismatchError) as exc:
        check_model_config(cfg)
    message = str(exc.value)
    assert 'model.neck.in_channels = [64, 128, 384, 640]' in message
    assert '[64, 128, 448, 640]' in message


def test_decode_head_widths_and_out_indices() -> None:
    cfg = load_config(SEG_T)
    cfg.model.auxiliary_head.in_channels = 640
    with pytest.raises(ConfigMismatchError, match=r'model.auxiliary_head.in_channels = 640'):
        check_model_config(cfg)
    cfg = load_config(SEG_T)
    cfg.model.backbone.out_indices = (1, 2, 3)
    with pytest.raises(ConfigMismatchError, match='model.decode_head'):
        check_model_config(cfg)


def test_unknown_arch_and_class_count() -> None:
    cfg = load_config(T_1X)
    cfg.model.backbone.arch = 'huge'
    with pytest.raises(ConfigMismatchError, match="unknown OverLoCK arch 'huge'"):
        check_model_config(cfg)
    cfg = load_config(str(DET_DEMO))
    cfg.model.roi_head.mask_head.num_classes = 80
    with pytest.raises(ConfigMismatchError, match='mask_head.num_classes = 80.*3 classes'):
        check_model_config(cfg)
    cfg = load_config(SEG_T)
    cfg.model.decode_head.num_classes = 19
    with pytest.raises(ConfigMismatchError, match='150 classes'):
        check_model_config(cfg)


def test_fp16_amp_needs_a_gpu(tmp_path: Path, coco_root: str,
                              capsys: pytest.CaptureFixture, monkeypatch) -> None:
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    err = cli_error('train', [write_tiny_config(tmp_path, 'det', coco_root), '--amp', 'fp16'],
                     capsys)
    assert 'float16 AMP needs a GPU' in err and 'bf16' in err
    err = cli_error('train', [write_tiny_config(tmp_path, 'det', coco_root), '--amp', 'fp8'],
                     capsys)
    assert 'fp8' in err
    assert issubclass(ConfigMismatchError, UsageError)


# ------------------------------------------------------------------------------------------------
# Issue 16.1: the model check follows the maps through the neck to the heads
# ------------------------------------------------------------------------------------------------
def _mismatch(cfg) -> str:
    with pytest.raises(ConfigMismatchError) as exc:
        check_model_config(cfg)
    return str(exc.value)


def _apply_suggested_fix(cfg, message: str) -> None:
    """Apply the ``--cfg-options "..."`` of an error message as tools/train.py parses it."""
    option = re.search(r'--cfg-options "([^"]+)"', message).group(1)
    args = load_tool('train').parse_args(['config.py', '--cfg-options', option])
    cfg.merge_from_dict(args.cfg_options)


def test_semantic_fpn_head_reads_the_neck_not_the_backbone() -> None:
    cfg = load_config(SEM_FPN)
    assert cfg.model.decode_head.in_channels == [256, 256, 256, 256]  # the stock FPN head
    check_model_config(cfg)
    # the FPN itself still has to take the backbone's widths ...
    cfg.model.neck.in_channels = [256, 512, 1024, 2048]
    message = _mismatch(cfg)
    assert 'model.neck.in_channels = [256, 512, 1024, 2048]' in message and str(XT) in message
    _apply_suggested_fix(cfg, message)
    check_model_config(cfg)
    # ... and the head reads the FPN's maps: 128 channels each once the FPN gives 128
    cfg.model.neck.out_channels = 128
    message = _mismatch(cfg)
    assert 'model.decode_head.in_channels = [256, 256, 256, 256]' in message
    assert 'model.neck (FPN' in message and '[128, 128, 128, 128]' in message
    _apply_suggested_fix(cfg, message)
    assert cfg.model.decode_head.in_channels == [128, 128, 128, 128]
    check_model_config(cfg)


def test_head_selecting_some_of_the_neck_maps() -> None:
    cfg = load_config(SEM_FPN)
    cfg.model.decode_head.in_index = [1, 2, 3]
    cfg.model.decode_head.in_channels = [256, 256, 256]
    cfg.model.decode_head.feature_strides = [8, 16, 32]
    check_model_config(cfg)
    cfg.model.decode_head.in_index = [1, 2, 4]  # the FPN returns num_outs=4 maps
    message = _mismatch(cfg)
    assert 'model.decode_head.in_index=[1, 2, 4]' in message and 'only 4 maps' in message


def test_mask2former_head_reads_every_backbone_map() -> None:
    cfg = load_config(MASK2FORMER)
    check_model_config(cfg)  # the pixel decoder takes the four widths, not in_index=-1's 420
    cfg.model.decode_head.in_channels = [256, 512, 1024, 2048]  # the stock ResNet widths
    message = _mismatch(cfg)
    assert 'model.decode_head.in_channels = [256, 512, 1024, 2048]' in message
    assert f'Set model.decode_head.in_channels={XT}' in message
    _apply_suggested_fix(cfg, message)  # the suggested fix, as written, is a valid config
    check_model_config(cfg)
    assert cfg.model.decode_head.in_channels == XT


def test_multi_input_heads_on_the_backbone() -> None:
    """A 'resize_concat' head (as HRNet's FCN) and UperNet's 'multiple_select', by in_index."""
    cfg = load_config(SEG_T)
    cfg.model.auxiliary_head = dict(
        type='FCNHead', in_channels=[128, 384, 640], in_index=[1, 2, 3],
        input_transform='resize_concat', channels=64, num_convs=1, concat_input=False,
        num_classes=150)
    check_model_config(cfg)
    cfg.model.auxiliary_head.in_channels = [128, 640, 384]
    message = _mismatch(cfg)
    assert 'model.auxiliary_head.in_channels = [128, 640, 384]' in message
    assert 'in_index=[1, 2, 3]' in message and 'Set model.auxiliary_head.in_channels=' \
        '[128, 384, 640]' in message
    cfg = load_config(SEG_T)
    cfg.model.decode_head.in_index = [0, 1, 3]
    cfg.model.decode_head.in_channels = [64, 128, 640]
    check_model_config(cfg)


def test_dense_and_transformer_detectors() -> None:
    cfg = load_config(RETINANET)
    check_model_config(cfg)
    cfg.model.bbox_head.in_channels = 420  # RetinaHead reads the FPN's 256-channel maps
    message = _mismatch(cfg)
    assert 'model.bbox_head.in_channels = 420' in message and 'Set model.bbox_head.in_channels' \
        '=256' in message
    cfg = load_config(DINO)  # ChannelMapper on the maps of strides 8-32
    check_model_config(cfg)
    cfg.model.backbone.out_indices = (0, 1, 2, 3)
    assert '[56, 112, 340, 420]' in _mismatch(cfg)


def test_unsure_checks_warn_and_let_the_run_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    logged = []
    monkeypatch.setattr('mmoverlock.apis.config.print_log',
                        lambda msg, logger=None, level=None: logged.append((msg, level)))
    cfg = load_config(SEM_FPN)
    cfg.model.neck = dict(type='SomeoneElsesNeck', in_channels=[420, 340, 112, 56],
                          out_channels=64)
    check_model_config(cfg)  # an unknown neck: its conventions are not known, no error
    assert len(logged) == 1 and logged[0][1] == 30  # one warning
    assert 'model.neck.in_channels = [420, 340, 112, 56]' in logged[0][0]
    assert 'model.decode_head.in_channels' in logged[0][0]


def test_skip_checks_switch(tmp_path: Path, ade_root: str) -> None:
    """A class count the check rejects, run anyway with --skip-checks (tools/train.py, test.py)."""
    config = write_tiny_config(tmp_path, 'seg', ade_root, extra={
        'model.decode_head.num_classes': 5, 'model.auxiliary_head.num_classes': 5})
    with pytest.raises(ConfigMismatchError, match='num_classes = 5'):
        load_tool('train').main([config, '--work-dir', str(tmp_path / 'w')])
    load_tool('train').main([config, '--work-dir', str(tmp_path / 'w'), '--skip-checks'])
    metrics = load_tool('test').main([config, str(tmp_path / 'w' / 'iter_2.pth'),
                                      '--work-dir', str(tmp_path / 't'), '--skip-checks'])
    assert 'mIoU' in metrics
    cfg = load_config(config)
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'nowhere')
    prepare_config(cfg, 'train', skip_checks=True)  # paths not checked either
    with pytest.raises(CheckpointNotFoundError, match='gone.pth'):  # the argument still is
        prepare_config(cfg, 'test', checkpoint=str(tmp_path / 'gone.pth'), skip_checks=True)


# ------------------------------------------------------------------------------------------------
# Issue 16.8: every missing file in one error, each with where to get it
# ------------------------------------------------------------------------------------------------
def test_missing_data_and_weights_reported_together(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # neither data/coco/ nor checkpoints/ exist here
    err = cli_error('train', [T_1X, '--work-dir', str(tmp_path / 'w')], capsys)
    assert "'data/coco/'" in err and 'cocodataset.org' in err
    assert "'checkpoints/overlock_t_in1k_224.pth'" in err
    assert 'https://github.com/LMMMEng/OverLoCK/releases' in err
    assert 'model.backbone.init_cfg=None' in err and 'tools/demo.py' in err
    cfg = load_config(T_1X)
    with pytest.raises(MissingFilesError) as exc:
        prepare_config(cfg, 'train')
    assert isinstance(exc.value, DataNotFoundError)
    assert isinstance(exc.value, CheckpointNotFoundError)
    with pytest.raises(MissingFilesError, match='https://github.com/LMMMEng/GLNet/releases'):
        prepare_config(load_config(GLNET_1X), 'train')


def test_every_missing_data_path_is_named(tmp_path: Path) -> None:
    (tmp_path / 'coco').mkdir()  # the root exists, nothing in it
    cfg = load_config(T_1X)
    cfg.merge_from_dict({f'{s}_dataloader.dataset.data_root': f'{tmp_path}/coco/'
                         for s in ('train', 'val', 'test')})
    cfg.model.backbone.init_cfg = None
    with pytest.raises(DataNotFoundError) as exc:
        prepare_config(cfg, 'train')
    message = str(exc.value)
    for path in ('annotations/instances_train2017.json', 'train2017/',
                 'annotations/instances_val2017.json', 'val2017/'):
        assert f'{tmp_path}/coco/{path}' in message, path
    assert 'val_evaluator.ann_file' in message
    assert not isinstance(exc.value, CheckpointNotFoundError)


def test_missing_test_checkpoint_and_data_together(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    cfg_options = [f'{s}_dataloader.dataset.data_root={tmp_path}/ade'
                   for s in ('train', 'val', 'test')]
    err = cli_error('test', [SEG_T, str(tmp_path / 'trained.pth'), '--cfg-options',
                              *cfg_options], capsys)
    assert 'trained.pth' in err and f'{tmp_path}/ade' in err and 'sceneparsing' in err


def test_panoptic_fpn_heads_count_the_thing_classes(tmp_path: Path) -> None:
    """Stock Panoptic FPN: its box and mask heads predict the 80 thing classes of COCO panoptic's
    133 (the semantic head all of them)."""
    path = tmp_path / 'panoptic_fpn_overlock_xt.py'
    path.write_text(
        "_base_ = 'mmdet::panoptic_fpn/panoptic-fpn_r50_fpn_1x_coco.py'\n"
        "custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)\n"
        "model = dict(backbone=dict(_delete_=True, type='OverLoCK', arch='xt'),\n"
        "             neck=dict(in_channels=[56, 112, 340, 420]))\n")
    cfg = load_config(str(path))
    check_model_config(cfg)
    cfg.model.roi_head.mask_head.num_classes = 133
    with pytest.raises(ConfigMismatchError, match=r'mask_head.num_classes = 133 but .* 80 classes'):
        check_model_config(cfg)
