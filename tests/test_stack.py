"""The installed stack: pinned versions, registration, compiled ops, safe checkpoint loading."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pinned(name: str) -> str:
    text = (REPO / 'requirements.txt').read_text()
    match = re.search(rf'^{re.escape(name)}==([^\s#]+)', text, re.M)
    assert match, f'{name} is not pinned in requirements.txt'
    return match.group(1)


@pytest.mark.parametrize('module, dist', [
    ('torch', 'torch'), ('mmengine', 'mmengine'), ('mmcv', 'mmcv'), ('mmdet', 'mmdet'),
    ('mmseg', 'mmsegmentation'), ('timm', 'timm'), ('natten', 'natten')])
def test_pinned_versions_are_installed(module: str, dist: str) -> None:
    mod = __import__(module)
    assert mod.__version__.split('+')[0] == pinned(dist)


def test_registered_in_mmdet_and_mmseg() -> None:
    import mmdet.registry
    import mmseg.registry

    import mmoverlock
    for registry in (mmdet.registry.MODELS, mmseg.registry.MODELS):
        assert registry.get('OverLoCK') is mmoverlock.OverLoCK
        # built through the registry, as a config's backbone=dict(type=...) is
        model = registry.build(dict(type='OverLoCK', arch='xt', out_indices=(3,)))
        assert isinstance(model, mmoverlock.OverLoCK)


def test_custom_imports_is_enough() -> None:
    from mmengine.config import Config
    cfg = Config(dict(custom_imports=dict(imports=['mmoverlock'], allow_failed_imports=False)))
    from mmengine.utils import import_modules_from_strings
    import_modules_from_strings(**cfg.custom_imports)
    from mmdet.registry import MODELS
    assert 'OverLoCK' in MODELS.module_dict


def test_mmcv_nms_runs_on_cpu() -> None:
    from mmcv.ops import nms
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # box 1 overlaps box 0 with IoU 81/119 > 0.5 and is suppressed
    assert keep.tolist() == [0, 2]
    assert torch.allclose(dets[:, 4], torch.tensor([0.9, 0.7]))


def test_mmcv_roi_align_samples_bilinearly() -> None:
    from mmcv.ops import RoIAlign
    # A ramp f(y, x) = x: every bilinear sample of it equals its x coordinate.
    feat = torch.arange(16, dtype=torch.float32).repeat(16, 1)[None, None]
    rois = torch.tensor([[0, 2.0, 3.0, 10.0, 11.0]])  # (batch, x1, y1, x2, y2)
    out = RoIAlign((4, 4), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
    # aligned=True shifts by half a pixel: bin centres at x1 - 0.5 + (i + 0.5) * 2
    expected = torch.tensor([2.0 - 0.5 + (i + 0.5) * 2 for i in range(4)])
    assert torch.allclose(out[0, 0], expected.expand(4, 4), atol=1e-5)



def _toy_runner(work_dir: Path, max_iters: int, **kwargs):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class ToyModel(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, inputs, labels=None, mode='tensor'):
            inputs = torch.stack(inputs) if isinstance(inputs, list) else inputs
            out = self.linear(inputs)
            if mode == 'loss':
                labels = torch.stack(labels) if isinstance(labels, list) else labels
                return dict(loss=((out.squeeze(-1) - labels) ** 2).mean())
            return out

    data = [dict(inputs=torch.randn(2), labels=torch.randn(())) for _ in range(16)]
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=data, sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=4, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2)),
        param_scheduler=dict(type='MultiStepLR', milestones=[2], by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        log_level='WARNING', **kwargs)


def test_runner_checkpoint_resumes_with_weights_only(tmp_path: Path) -> None:
    import mmoverlock  # noqa: F401  (installs the allow-list)
    runner = _toy_runner(tmp_path, max_iters=2)
    runner.train()
    ckpt = tmp_path / 'iter_2.pth'
    assert ckpt.is_file()
    # The file needs more than tensors (HistoryBuffer, numpy), yet loads with weights_only=True.
    state = torch.load(ckpt, weights_only=True)
    assert state['meta']['iter'] == 2
    assert 'message_hub' in state

    resumed = _toy_runner(tmp_path, max_iters=4, resume=True, load_from=str(ckpt))
    resumed.train()
    assert resumed.iter == 4
    # the scheduler and optimizer state came back too
    assert resumed.message_hub.get_info('iter') == 3
    assert (tmp_path / 'iter_4.pth').is_file()


class _Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_code_executing_checkpoint_is_refused(tmp_path: Path, monkeypatch) -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    import mmoverlock
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'payload': _Payload(marker)}, evil)

    with pytest.raises(mmoverlock.UnsafeCheckpointError) as info:
        CheckpointLoader.load_checkpoint(str(evil), map_location='cpu')
    message = str(info.value)
    assert 'pathlib.Path' in message  # names the offending global
    assert 'trust_checkpoint' in message and 'MMOVERLOCK_TRUSTED_CHECKPOINTS' in message
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()

    # the explicit opt-in, for this one file only
    monkeypatch.setenv('MMOVERLOCK_TRUSTED_CHECKPOINTS', str(evil))
    CheckpointLoader.load_checkpoint(str(evil), map_location='cpu')
    assert marker.exists()


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    import mmoverlock  # noqa: F401
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'nope.pth'))


def test_natten_na2d_av_runs_on_cpu() -> None:
    from natten.functional import na2d_av

    from mmoverlock.ops import na2d_av_reference
    attn = torch.randn(1, 2, 9, 10, 25).softmax(-1)
    value = torch.randn(1, 2, 9, 10, 4)
    out = na2d_av(attn, value, 5, 1)
    assert out.shape == value.shape
    assert torch.allclose(out, na2d_av_reference(attn, value), atol=1e-5)
