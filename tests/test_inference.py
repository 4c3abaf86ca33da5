"""Inference as users run it (issue 13.6, 16.7): mmdet's DetInferencer and mmseg's MMSegInferencer
with our configs and a checkpoint saved by tools/train.py, tools/infer.py, large images resized."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import (
    ALL_CONFIGS,
    DET_DEMO,
    REPO,
    SEG_DEMO,
    TINY_SIZE,
    cli_error,
    load_tool,
    write_tiny_config,
)
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.registry import init_default_scope

from mmoverlock.apis import (
    DEMO_PHOTO,
    UsageError,
    build_inferencer,
    check_device,
    expand_images,
    infer_images,
)

pytestmark = pytest.mark.usefixtures('single_thread')

PHOTO_SHAPE = (400, 600)  # demo/images/coffee.jpg, height x width
DET_CLASSES = ('circle', 'square', 'triangle')
SEG_CLASSES = ('background', 'circle', 'square', 'triangle')


def _rescaled(shape: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest factor with long side <= max(scale) and short side
    <= min(scale), sides rounded to the nearest integer."""
    h, w = shape
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.fixture(scope='module')
def det_run(tmp_path_factory: pytest.TempPathFactory, coco_root: str, single_thread) -> tuple:
    """The tiny Mask R-CNN config and the checkpoint tools/train.py saves after 2 iterations."""
    tmp = tmp_path_factory.mktemp('det_run')
    config = write_tiny_config(tmp, 'det', coco_root)
    load_tool('train').main([config, '--work-dir', str(tmp / 'work')])
    return config, str(tmp / 'work' / 'iter_2.pth')


@pytest.fixture(scope='module')
def seg_run(tmp_path_factory: pytest.TempPathFactory, ade_root: str, single_thread) -> tuple:
    """The tiny UperNet config (the demo's test pipeline) and tools/train.py's checkpoint."""
    tmp = tmp_path_factory.mktemp('seg_run')
    config = write_tiny_config(tmp, 'seg', ade_root)
    load_tool('train').main([config, '--work-dir', str(tmp / 'work')])
    return config, str(tmp / 'work' / 'iter_2.pth')


@pytest.fixture(scope='module')
def large_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3000 x 2000 photograph-like image (smooth gradients and a disc)."""
    h, w = 2000, 3000
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    cv2.circle(image, (1500, 1000), 600, (40, 60, 220), -1)
    path = tmp_path_factory.mktemp('large') / 'large.jpg'
    cv2.imwrite(str(path), image)
    return str(path)


def test_shipped_photo_and_licence() -> None:
    photo = Path(DEMO_PHOTO)
    assert photo == REPO / 'demo' / 'images' / 'coffee.jpg'
    assert photo.stat().st_size < 100_000
    assert cv2.imread(str(photo)).shape == (*PHOTO_SHAPE, 3)
    licence = (photo.parent / 'LICENSE.md').read_text()
    assert 'coffee.jpg' in licence and 'CC0' in licence and 'scikit-image' in licence


def test_det_inferencer_with_our_config_and_checkpoint(det_run: tuple) -> None:
    from mmdet.apis import DetInferencer
    config, checkpoint = det_run
    ours = build_inferencer(config, checkpoint, device='cpu')
    plain = DetInferencer(model=config, weights=checkpoint, device='cpu', show_progress=False)
    assert isinstance(ours, DetInferencer)
    for inferencer in (plain, ours):
        assert tuple(inferencer.model.dataset_meta['classes']) == DET_CLASSES  # from the checkpoint
        sample = inferencer(DEMO_PHOTO, return_datasamples=True)['predictions'][0]
        assert sample.ori_shape == PHOTO_SHAPE
        assert sample.img_shape == _rescaled(PHOTO_SHAPE, (TINY_SIZE, TINY_SIZE))
        pred = sample.pred_instances
        n = len(pred)
        assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,)
        assert pred.labels.shape == (n,) and bool((pred.labels < len(DET_CLASSES)).all())
        assert tuple(pred.masks.shape) == (n, *PHOTO_SHAPE)  # masks at the photograph's size
        if n:
            assert float(pred.bboxes[:, 2].max()) <= PHOTO_SHAPE[1] + 1
    # both load the same weights: the same predictions
    a = plain(DEMO_PHOTO, return_datasamples=True)['predictions'][0].pred_instances
    b = ours(DEMO_PHOTO, return_datasamples=True)['predictions'][0].pred_instances
    assert np.allclose(a.scores.numpy(), b.scores.numpy())


def test_seg_inferencer_with_our_config_and_checkpoint(seg_run: tuple) -> None:
    from mmseg.apis import MMSegInferencer
    config, checkpoint = seg_run
    ours = build_inferencer(config, checkpoint, device='cpu')
    plain = MMSegInferencer(model=config, weights=checkpoint, device='cpu')
    assert isinstance(ours, MMSegInferencer)
    for inferencer in (plain, ours):
        assert tuple(inferencer.model.dataset_meta['classes']) == SEG_CLASSES
        sample = inferencer(DEMO_PHOTO, return_datasamples=True)
        assert sample.ori_shape == PHOTO_SHAPE
        assert sample.img_shape == _rescaled(PHOTO_SHAPE, (512, 128))  # the demo test pipeline
        labels = sample.pred_sem_seg.data
        assert tuple(labels.shape) == (1, *PHOTO_SHAPE)
        assert int(labels.max()) < len(SEG_CLASSES)
        assert inferencer(DEMO_PHOTO)['predictions'].shape == PHOTO_SHAPE


def test_demo_test_pipelines_resize_large_images(large_image: str) -> None:
    """The demo configs' own test pipelines (as the inferencers use them) run a 3000x2000 image at
    the training scale, as mmdet's / mmseg's stock test pipelines do at theirs."""
    for config, scope, expected in ((SEG_DEMO, 'mmseg', _rescaled((2000, 3000), (512, 128))),
                                    (DET_DEMO, 'mmdet', _rescaled((2000, 3000), (128, 128)))):
        init_default_scope(scope)
        steps = [t for t in Config.fromfile(str(config)).test_dataloader.dataset.pipeline
                 if t['type'] != 'LoadAnnotations']
        packed = Compose(steps)(dict(img_path=large_image, img_id=0))
        assert tuple(packed['inputs'].shape) == (3, *expected), config
        assert packed['data_samples'].ori_shape == (2000, 3000)
    assert _rescaled((2000, 3000), (512, 128)) == (128, 192)


def test_large_image_is_resized_and_predicted_at_its_size(seg_run: tuple, det_run: tuple,
                                                          large_image: str) -> None:
    seg = build_inferencer(*seg_run, device='cpu')
    sample = seg(large_image, return_datasamples=True)
    assert sample.img_shape == (128, 192)
    assert tuple(sample.pred_sem_seg.data.shape) == (1, 2000, 3000)
    det = build_inferencer(*det_run, device='cpu')
    sample = det(large_image, return_datasamples=True)['predictions'][0]
    assert sample.img_shape == _rescaled((2000, 3000), (TINY_SIZE, TINY_SIZE))
    assert tuple(sample.pred_instances.masks.shape)[1:] == (2000, 3000)


@pytest.mark.parametrize('config', [c for c in ALL_CONFIGS if not c.endswith('_demo.py')],
                         ids=lambda c: Path(c).name)
def test_coco_and_ade_configs_resize_as_the_stock_pipelines(config: str) -> None:
    cfg = Config.fromfile(config)
    resize = [t for t in cfg.test_dataloader.dataset.pipeline if t['type'] == 'Resize']
    stock = (1333, 800) if cfg.default_scope == 'mmdet' else (2048, 512)
    assert len(resize) == 1 and tuple(resize[0]['scale']) == stock and resize[0]['keep_ratio']




def test_infer_tool_det(det_run: tuple, tmp_path: Path) -> None:
    small = tmp_path / 'small.png'
    cv2.imwrite(str(small), np.full((48, 80, 3), 127, np.uint8))
    out = tmp_path / 'out'
    load_tool('infer').main([*det_run, DEMO_PHOTO, str(small), '--out-dir', str(out),
                             '--device', 'cpu', '--score-thr', '0.05', '--save-preds'])
    assert sorted(p.name for p in out.glob('*.png')) == ['coffee.png', 'small.png']
    assert cv2.imread(str(out / 'coffee.png')).shape == (*PHOTO_SHAPE, 3)
    assert cv2.imread(str(out / 'small.png')).shape == (48, 80, 3)
    pred = json.loads((out / 'preds' / 'coffee.json').read_text())
    n = len(pred['scores'])
    assert len(pred['labels']) == len(pred['bboxes']) == len(pred['masks']) == n
    assert all(m['size'] == list(PHOTO_SHAPE) for m in pred['masks'])
    assert all(0 <= label < len(DET_CLASSES) for label in pred['labels'])


def test_infer_tool_seg_and_folders(seg_run: tuple, tmp_path: Path) -> None:
    folder = tmp_path / 'images'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), np.full((50, 70, 3), 200, np.uint8))
    cv2.imwrite(str(folder / 'b.jpg'), np.full((90, 40, 3), 30, np.uint8))
    (folder / 'notes.txt').write_text('not an image')
    out = tmp_path / 'out'
    results = load_tool('infer').main([*seg_run, DEMO_PHOTO, str(folder), '--out-dir', str(out),
                                       '--save-preds'])
    assert [Path(r['image']).name for r in results] == ['coffee.jpg', 'a.png', 'b.jpg']
    for name, shape in (('coffee', PHOTO_SHAPE), ('a', (50, 70)), ('b', (90, 40))):
        drawn = cv2.imread(str(out / f'{name}.png'))
        assert drawn.shape == (*shape, 3)
        labels = cv2.imread(str(out / 'preds' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        assert labels.shape == shape and labels.max() < len(SEG_CLASSES)
    # every pixel is overlaid with its class colour (opacity 0.8): the drawing is not the photo
    photo = cv2.imread(DEMO_PHOTO).astype(int)
    assert np.abs(cv2.imread(str(out / 'coffee.png')).astype(int) - photo).mean() > 10


def test_infer_tool_errors(det_run: tuple, seg_run: tuple, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    det_config, det_ckpt = det_run
    seg_config, _ = seg_run
    out = ['--out-dir', str(tmp_path / 'out'), '--device', 'cpu']
    missing = str(tmp_path / 'nope.jpg')
    err = cli_error('infer', [det_config, det_ckpt, missing, *out], capsys)
    assert 'nope.jpg' in err and 'does not exist' in err
    err = cli_error('infer', [det_config, str(tmp_path / 'nope.pth'), DEMO_PHOTO, *out], capsys)
    assert 'nope.pth' in err and 'does not exist' in err
    text = tmp_path / 'text.jpg'
    text.write_text('this is not a JPEG')
    err = cli_error('infer', [det_config, det_ckpt, str(text), *out], capsys)
    assert 'cannot read image' in err and 'text.jpg' in err
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'\x00' * 64)
    err = cli_error('infer', [det_config, str(garbage), DEMO_PHOTO, *out], capsys)
    assert 'garbage.pth' in err
    # a detector's weights for a segmentor
    err = cli_error('infer', [seg_config, det_ckpt, DEMO_PHOTO, *out], capsys)
    assert 'does not fit' in err and 'not interchangeable' in err
    err = cli_error('infer', [seg_config, det_ckpt, DEMO_PHOTO, '--score-thr', '0.5', *out], capsys)
    assert '--score-thr' in err and 'detection' in err
    assert not (tmp_path / 'out').exists()  # nothing written by a failed run


def test_expand_images_refuses_duplicate_names(tmp_path: Path) -> None:
    for sub in ('x', 'y'):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / 'same.png'), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UsageError, match='same name'):
        expand_images([str(tmp_path / 'x' / 'same.png'), str(tmp_path / 'y')])
    with pytest.raises(UsageError, match='holds no image'):
        (tmp_path / 'empty').mkdir()
        expand_images([str(tmp_path / 'empty')])


def test_infer_images_score_thr_only_for_detection(seg_run: tuple, tmp_path: Path) -> None:
    inferencer = build_inferencer(*seg_run, device='cpu')
    with pytest.raises(UsageError, match='detection configs only'):
        infer_images(inferencer, [DEMO_PHOTO], str(tmp_path), score_thr=0.5)


def test_check_device() -> None:
    assert check_device('cpu') == 'cpu'
    assert check_device(None) == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(UsageError, match='not a device name'):
        check_device('gpu0')
    with pytest.raises(UsageError, match='only cpu and cuda'):
        check_device('meta')
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match='no CUDA GPU'):
            check_device('cuda')
