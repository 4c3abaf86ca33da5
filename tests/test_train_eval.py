"""A few training iterations of each task on generated data, evaluation, resume (tools/*.py)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import find_log, load_tool, train_iterations, write_tiny_config
from mmengine.evaluator import Evaluator
from mmengine.registry import init_default_scope

from mmoverlock.apis import load_config, run_demo

pytestmark = pytest.mark.usefixtures('single_thread')


def _checkpoint_iter(path: Path) -> int:
    return torch.load(path, map_location='cpu', weights_only=True)['meta']['iter']


def _evaluate(cfg_path: str, samples: list[dict]) -> dict:
    """Metrics of the config's own test evaluator for ``samples`` (prediction dicts)."""
    cfg = load_config(cfg_path)
    evaluator = Evaluator(cfg.test_evaluator)
    dataset = build_dataset(cfg)
    evaluator.dataset_meta = dataset.metainfo
    evaluator.process(data_samples=samples)
    return evaluator.evaluate(len(samples))


def build_dataset(cfg):
    from mmengine.registry import DATASETS
    init_default_scope(cfg.default_scope)
    return DATASETS.build(cfg.test_dataloader.dataset)


def _ground_truth_as_detections(cfg_path: str) -> list[dict]:
    """Every annotated object of the test split, as a detection with score 1."""
    from pycocotools.coco import COCO
    cfg = load_config(cfg_path)
    coco = COCO(cfg.test_evaluator.ann_file)
    cat_ids = sorted(coco.getCatIds())
    samples = []
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        boxes = [[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                  a['bbox'][1] + a['bbox'][3]] for a in anns]
        samples.append(dict(img_id=img_id, ori_shape=(info['height'], info['width']),
                            pred_instances=dict(
                                bboxes=torch.tensor(boxes, dtype=torch.float32),
                                scores=torch.ones(len(anns)),
                                labels=torch.tensor([cat_ids.index(a['category_id'])
                                                     for a in anns]),
                                masks=torch.from_numpy(np.stack(
                                    [coco.annToMask(a) for a in anns])).bool())))
    return samples


def test_det_demo_trains_evaluates_and_draws(tiny_det_config: str, tmp_path: Path) -> None:
    # The evaluator as configured scores the ground truth as perfect (annotation file, category
    # order and mask encoding agree with the data)...
    perfect = _evaluate(tiny_det_config, _ground_truth_as_detections(tiny_det_config))
    assert perfect['coco/bbox_mAP'] == perfect['coco/segm_mAP'] == 1.0
    result = run_demo(tiny_det_config, str(tmp_path / 'work'), num_images=2)
    metrics = result['metrics']
    # ... and the trained model's checkpoint, evaluated again by tools/test.py, scores exactly
    # what the run reported (the checkpoint holds the evaluated model).
    again = load_tool('test').main([tiny_det_config, result['checkpoint'],
                                    '--work-dir', str(tmp_path / 'test')])
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert again[key] == metrics[key], key
    assert train_iterations(str(tmp_path / 'work')) == [1, 2]
    assert _checkpoint_iter(Path(result['checkpoint'])) == 2
    picture = cv2.imread(result['picture'])
    # two rows (one per image), each ground truth | prediction at 2x scale plus a caption band
    assert picture.shape[1] == 2 * 2 * 64 and picture.shape[0] == 2 * (2 * 64 + 18)
    assert len(list(Path(result['picture']).with_suffix('').glob('*.png'))) == 2


def test_seg_demo_trains_evaluates_and_draws(tiny_seg_config: str, tmp_path: Path) -> None:
    # The configured evaluator scores the ground truth as perfect...
    dataset = build_dataset(load_config(tiny_seg_config))
    samples = []
    for i in range(len(dataset)):
        gt = dataset[i]['data_samples'].gt_sem_seg.data
        samples.append(dict(pred_sem_seg=dict(data=gt), gt_sem_seg=dict(data=gt)))
    perfect = _evaluate(tiny_seg_config, samples)
    assert perfect['mIoU'] == perfect['aAcc'] == 100.0
    result = run_demo(tiny_seg_config, str(tmp_path / 'work'), num_images=1)
    metrics = result['metrics']
    # ... and tools/test.py on the saved checkpoint reproduces the run's metrics.
    again = load_tool('test').main([tiny_seg_config, result['checkpoint'],
                                    '--work-dir', str(tmp_path / 'test')])
    for key in ('mIoU', 'aAcc', 'mAcc'):
        assert again[key] == metrics[key], key
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


@pytest.mark.parametrize('options', [['--amp'], ['--compile', 'aot_eager']],
                         ids=['amp-bf16', 'compile'])
def test_train_tool_with_amp_or_compile(options: list[str], tmp_path: Path,
                                        ade_root: str) -> None:
    """``--amp`` (bfloat16 autocast on the CPU) and ``--compile`` train through tools/train.py:
    the runner holds the switched wrapper / compile options, the losses are finite and the
    backbone's weights move."""
    from mmengine.runner import Runner

    import mmoverlock.apis.launch as launch
    config = write_tiny_config(tmp_path, 'seg', ade_root, max_iters=2)
    runners = []
    build = launch.build_runner

    def keep(cfg):
        runners.append(build(cfg))
        return runners[-1]

    train = load_tool('train')
    train.build_runner = keep
    train.main([config, '--work-dir', str(tmp_path / 'work'), *options])
    runner: Runner = runners[0]
    if options[0] == '--amp':
        wrapper = runner.optim_wrapper
        assert type(wrapper).__name__ == 'CPUAmpOptimWrapper'
        assert wrapper.cast_dtype == torch.bfloat16
    else:
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        assert model.backbone._compiled_call_impl is not None  # nn.Module.compile, in place
        assert [h for h in runner.cfg.custom_hooks if h['type'] == 'CompileBackboneHook'] == [
            dict(type='CompileBackboneHook', backend='aot_eager')]
    assert train_iterations(str(tmp_path / 'work')) == [1, 2]
    state = torch.load(tmp_path / 'work' / 'iter_2.pth', map_location='cpu',
                       weights_only=True)['state_dict']
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
