"""A NaN pixel or a NaN loss stops training with a clear error before it spoils the model
(mmoverlock.engine.FiniteTrainingHook, added by tools/train.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_tool, write_tiny_config
from mmcv.transforms import BaseTransform
from mmengine.config import Config
from mmseg.registry import TRANSFORMS

from mmoverlock.apis import (
    build_runner,
    configure_run,
    configure_training,
    load_config,
    prepare_config,
    unwrap,
)
from mmoverlock.engine import NonFiniteTrainingError

pytestmark = pytest.mark.usefixtures('single_thread')


@TRANSFORMS.register_module(force=True)
class NaNPixelForTest(BaseTransform):
    """Turns the image named ``name`` into float32 with one NaN pixel (channel 0 at y=5, x=7)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def transform(self, results: dict) -> dict:
        if os.path.basename(results['img_path']) == self.name:
            img = results['img'].astype(np.float32)
            img[5, 7, 0] = np.nan
            results['img'] = img
        return results


def _poisoned_config(tmp_path: Path, ade_root: str) -> tuple[str, str]:
    """The tiny segmentation config, one iteration over all 8 training images, one of which has
    a NaN pixel; returns (config path, that image's file name)."""
    name = sorted(os.listdir(Path(ade_root) / 'images' / 'training'))[5]
    cfg = Config.fromfile(write_tiny_config(tmp_path, 'seg', ade_root, max_iters=1,
                                            extra={'train_dataloader.batch_size': 8}))
    pipeline = cfg.train_dataloader.dataset.pipeline
    assert pipeline[-1]['type'] == 'PackSegInputs'
    pipeline.insert(len(pipeline) - 1, dict(type='NaNPixelForTest', name=name))
    path = tmp_path / 'poisoned.py'
    cfg.dump(str(path))
    return str(path), name


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def test_nan_pixel_stops_before_batchnorm_and_weights_change(tmp_path: Path,
                                                             ade_root: str) -> None:
    config, name = _poisoned_config(tmp_path, ade_root)
    cfg = load_config(config)
    configure_run(cfg, config, str(tmp_path / 'work'))
    configure_training(cfg)
    assert {'type': 'FiniteTrainingHook'} in cfg.custom_hooks
    prepare_config(cfg, 'train')
    runner = build_runner(cfg)
    model = unwrap(runner.model)
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if 'running_' in k}
    assert bn_before and _finite(model)

    with pytest.raises(NonFiniteTrainingError) as exc:
        runner.train()
    message = str(exc.value)
    assert message.startswith('training iteration 1 of 1: image ')
    assert f'{name}) holds 1 NaN/inf value after the data preprocessor' in message
    assert 'weights and BatchNorm statistics are unchanged' in message
    # the forward never ran: every BatchNorm statistic and weight is as it was, all finite
    assert _finite(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in bn_before.items())


def test_nan_pixel_is_one_error_line_of_the_train_tool(tmp_path: Path, ade_root: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    from _cli import run_main
    config, name = _poisoned_config(tmp_path, ade_root)
    train = load_tool('train')
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: train.main([config, '--work-dir', str(tmp_path / 'work')]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('error: training iteration 1 of 1: image ') and name in lines[0]
    assert not list((tmp_path / 'work').glob('*.pth'))  # nothing saved after the bad step


def _toy_runner(work_dir: Path, loss_fn):
    """An mmengine Runner of a BatchNorm + Linear model whose loss is ``loss_fn(output)``."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class ToyModel(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(2)
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, inputs, labels=None, mode='tensor'):
            out = self.linear(self.norm(torch.stack(inputs)))
            return dict(loss=loss_fn(out), acc=out.sum()) if mode == 'loss' else out

    torch.manual_seed(0)
    data = [dict(inputs=torch.randn(2), labels=torch.randn(())) for _ in range(8)]
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=data, sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=4, collate_fn=dict(type='pseudo_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=3),
        custom_hooks=[dict(type='FiniteTrainingHook')],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=10, by_epoch=False)),
        log_level='WARNING')


def test_nan_loss_stops_before_the_optimizer_step(tmp_path: Path) -> None:
    calls = []

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        calls.append(1)  # finite on the first iteration, NaN (log of -1) on the second
        return out.pow(2).mean() if len(calls) == 1 else torch.log(out.abs().mean() * 0 - 1)

    runner = _toy_runner(tmp_path, loss_fn)
    model = runner.model
    with pytest.raises(NonFiniteTrainingError) as exc:
        runner.train()
    message = str(exc.value)
    assert message.startswith('training iteration 2 of 3: loss is not finite (loss=nan)')
    assert 'optimizer step was not taken' in message and 'Lower the learning rate' in message
    assert 'weights and BatchNorm statistics are still finite' in message
    assert _finite(model) and runner.iter == 1  # iteration 1's step happened, 2's did not


def test_finite_training_is_not_stopped(tmp_path: Path) -> None:
    runner = _toy_runner(tmp_path, lambda out: out.pow(2).mean())
    runner.train()
    assert runner.iter == 3 and _finite(runner.model)
    # the checks are detached after training: evaluation code is not affected
    assert not runner.model._forward_pre_hooks and not runner.model._forward_hooks
