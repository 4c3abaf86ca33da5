"""A few training iterations of each task on generated data, evaluation, resume (tools/*.py)."""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch
from helpers import find_log, load_tool, train_iterations, write_tiny_config

from mmoverlock.apis import run_demo

pytestmark = pytest.mark.usefixtures('single_thread')


def _checkpoint_iter(path: Path) -> int:
    return torch.load(path, map_location='cpu', weights_only=True)['meta']['iter']


def test_det_demo_trains_evaluates_and_draws(tiny_det_config: str, tmp_path: Path) -> None:
    result = run_demo(tiny_det_config, str(tmp_path / 'work'), num_images=2)
    metrics = result['metrics']
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert train_iterations(str(tmp_path / 'work')) == [1, 2]
    assert _checkpoint_iter(Path(result['checkpoint'])) == 2
    picture = cv2.imread(result['picture'])
    # two rows (one per image), each ground truth | prediction at 2x scale plus a caption band
    assert picture.shape[1] == 2 * 2 * 64 and picture.shape[0] == 2 * (2 * 64 + 18)
    assert len(list(Path(result['picture']).with_suffix('').glob('*.png'))) == 2


def test_seg_demo_trains_evaluates_and_draws(tiny_seg_config: str, tmp_path: Path) -> None:
    result = run_demo(tiny_seg_config, str(tmp_path / 'work'), num_images=1)
    metrics = result['metrics']
    assert 0.0 <= metrics['mIoU'] <= 100.0 and 0.0 <= metrics['aAcc'] <= 100.0
    assert train_iterations(str(tmp_path / 'work')) == [1, 2]
    assert cv2.imread(result['picture']).shape[1] == 2 * 2 * 64


def test_train_resume_and_test_tools(tmp_path: Path, ade_root: str) -> None:
    train, test = load_tool('train'), load_tool('test')
    work = tmp_path / 'work'
    first = write_tiny_config(tmp_path, 'seg', ade_root, max_iters=2)
    train.main([first, '--work-dir', str(work)])
    assert _checkpoint_iter(work / 'iter_2.pth') == 2
    assert (work / 'last_checkpoint').read_text().strip().endswith('iter_2.pth')

    # Same work dir, 4 iterations, --resume without a path: continues after iteration 2.
    longer = write_tiny_config(tmp_path, 'seg', ade_root, max_iters=4,
                               extra={'default_hooks.checkpoint.interval': 1,
                                      'default_hooks.checkpoint.max_keep_ckpts': -1})
    train.main([longer, '--work-dir', str(work), '--resume'])
    assert train_iterations(str(work)) == [1, 2, 3, 4]
    assert _checkpoint_iter(work / 'iter_4.pth') == 4
    assert not (work / 'iter_1.pth').exists()  # iteration 1 was not run again
    assert 'resumed' in find_log(str(work)).lower()

    # --resume PATH picks that checkpoint (here iteration 3) and goes on to 4.
    again = tmp_path / 'again'
    train.main([longer, '--work-dir', str(again), '--resume', str(work / 'iter_3.pth')])
    assert train_iterations(str(again)) == [4]

    metrics = test.main([longer, str(work / 'iter_4.pth'), '--work-dir', str(tmp_path / 'test')])
    assert set(metrics) >= {'mIoU', 'aAcc', 'mAcc'}
