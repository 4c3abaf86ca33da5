"""Missing files and mismatched configs give one clear message, not a traceback deep in mmdet."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DET_DEMO, REPO, load_tool, write_tiny_config

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

pytestmark = pytest.mark.usefixtures('single_thread')

T_1X = str(REPO / 'configs' / 'detection' / 'maskrcnn_overlock_t_1x.py')
SEG_T = str(REPO / 'configs' / 'segmentation' / 'upernet_overlock_t_160k_ade20k.py')


def _cli_error(tool: str, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``tools/<tool>.py`` in-process; it must exit with status 2 and one error line."""
    module = load_tool(tool)
    with pytest.raises(SystemExit) as exc:
        from _cli import run_main
        run_main(lambda: module.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def test_missing_config_file(capsys: pytest.CaptureFixture) -> None:
    wrong = str(REPO / 'configs' / 'detection' / 'maskrcnn_overlock_t_1X.py')
    err = _cli_error('train', [wrong], capsys)
    assert 'does not exist' in err and 'maskrcnn_overlock_t_1x.py' in err  # the close match
    with pytest.raises(ConfigNotFoundError):
        load_config('no/such/config.py')


def test_missing_coco_data_root(tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where data/coco/ is certainly missing
    err = _cli_error('train', [T_1X, '--work-dir', str(tmp_path / 'w')], capsys)
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
    err = _cli_error('test', [config, str(tmp_path / 'missing.pth')], capsys)
    assert 'missing.pth' in err and 'does not exist' in err
    err = _cli_error('train', [config, '--resume', str(tmp_path / 'missing.pth'),
                               '--work-dir', str(tmp_path / 'w')], capsys)
    assert '--resume' in err
    err = _cli_error('convert_checkpoint', [str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')],
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


def test_amp_needs_cuda(tmp_path: Path, coco_root: str, capsys: pytest.CaptureFixture) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip('CUDA is available: --amp is valid here')
    err = _cli_error('train', [write_tiny_config(tmp_path, 'det', coco_root), '--amp'], capsys)
    assert 'CUDA' in err
    assert issubclass(ConfigMismatchError, UsageError)
