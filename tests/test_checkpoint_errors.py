"""Truncated, damaged and code-running checkpoints on the tools' paths: one ``error:`` line naming
the file and the fix (exit status 2); ``--resume`` alone skips a damaged newest checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli_error, find_log, load_tool, write_tiny_config

from mmoverlock.apis import UsageError
from mmoverlock.apis import launch as launch_module
from mmoverlock.apis.launch import find_resume_checkpoint
from mmoverlock.utils.safe_checkpoint import (
    CorruptCheckpointError,
    checkpoint_problem,
    safe_load,
)

pytestmark = pytest.mark.usefixtures('single_thread')




def _save(path: Path, iteration: int = 1) -> Path:
    torch.save({'meta': {'iter': iteration}, 'state_dict': {'w': torch.randn(64, 64)}}, path)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _flip_a_weight_byte(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    start = data.index(b'data/0') + 200  # inside the stored tensor bytes
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_checkpoint_problems_are_named(tmp_path: Path) -> None:
    good = _save(tmp_path / 'good.pth')
    assert checkpoint_problem(str(good)) is None
    assert 'cut off' in checkpoint_problem(str(_truncate(_save(tmp_path / 'cut.pth'))))
    flipped = _flip_a_weight_byte(_save(tmp_path / 'flipped.pth'))
    assert 'fail their CRC check' in checkpoint_problem(str(flipped))
    (tmp_path / 'empty.pth').write_bytes(b'')
    assert checkpoint_problem(str(tmp_path / 'empty.pth')) == 'the file is empty'
    (tmp_path / 'text.pth').write_text('not a checkpoint\n')
    assert 'neither a zip archive nor a pickle' in checkpoint_problem(str(tmp_path / 'text.pth'))
    # torch.load itself reads the flipped file without complaint: wrong weights, silently
    assert not torch.equal(torch.load(flipped, weights_only=True)['state_dict']['w'],
                           torch.load(good, weights_only=True)['state_dict']['w'])
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint '.*flipped.pth' is unreadable: "
                                                     r'.*CRC.*Copy or download it again'):
        safe_load(str(flipped))


def test_corrupt_checkpoint_of_test_and_resume(tmp_path: Path, coco_root: str,
                                               capsys: pytest.CaptureFixture) -> None:
    config = write_tiny_config(tmp_path, 'det', coco_root)
    cut = _truncate(_save(tmp_path / 'iter_8.pth'))
    err = cli_error('test', [config, str(cut), '--work-dir', str(tmp_path / 't')], capsys)
    assert err.startswith(f"error: checkpoint '{cut}' is unreadable: the zip archive has no end")
    assert 'PytorchStreamReader' not in err and 'download it again' in err
    err = cli_error('train', [config, '--resume', str(cut), '--work-dir', str(tmp_path / 'w')],
                     capsys)
    assert f"'{cut}' is unreadable" in err and '--resume FILE' in err


class _Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_code_running_checkpoint_is_one_error_line(tmp_path: Path, ade_root: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    config = write_tiny_config(tmp_path, 'seg', ade_root)
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'payload': _Payload(marker)}, evil)
    err = cli_error('test', [config, str(evil), '--work-dir', str(tmp_path / 't')], capsys)
    assert err.startswith(f"error: Refusing to load checkpoint '{evil}': it needs ")
    assert 'pathlib.Path' in err  # the class whose unpickling runs code
    assert f'MMOVERLOCK_TRUSTED_CHECKPOINTS={evil}' in err and 'trust_checkpoint' in err
    # resuming from it: refused on that path too (inside mmengine's Runner.resume)
    err = cli_error('train', [config, '--resume', str(evil), '--work-dir', str(tmp_path / 'w')],
                     capsys)
    assert f"Refusing to load checkpoint '{evil}'" in err and 'MMOVERLOCK_TRUSTED' in err
    assert not marker.exists()


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(launch_module, 'print_log', lambda msg, **kw: warnings.append(msg))
    work = tmp_path / 'work'
    work.mkdir()
    assert find_resume_checkpoint(str(work)) is None  # nothing saved yet: start from scratch
    for i in (2, 4, 6, 10):
        _save(work / f'iter_{i}.pth', i)
    _save(work / 'epoch_5.pth', 5)  # another kind: never a fallback for iter_*
    (work / 'last_checkpoint').write_text(str(work / 'iter_6.pth'))
    assert find_resume_checkpoint(str(work)) == str(work / 'iter_6.pth') and not warnings

    _truncate(work / 'iter_6.pth')
    _flip_a_weight_byte(work / 'iter_4.pth')
    assert find_resume_checkpoint(str(work)) == str(work / 'iter_2.pth')  # not iter_10: newer
    assert len(warnings) == 2
    assert 'iter_6.pth' in warnings[0] and 'cut off' in warnings[0]
    assert 'iter_4.pth' in warnings[1] and 'CRC' in warnings[1]

    (work / 'last_checkpoint').write_text(str(tmp_path / 'moved' / 'iter_2.pth'))
    assert find_resume_checkpoint(str(work)) == str(work / 'iter_2.pth')  # work dir was moved

    _truncate(work / 'iter_2.pth')
    (work / 'last_checkpoint').write_text(str(work / 'iter_6.pth'))
    with pytest.raises(UsageError, match=r"no intact checkpoint in .*iter_6.pth \(.*\); .*"
                                         r'iter_2.pth .*--resume FILE'):
        find_resume_checkpoint(str(work))


def test_train_resumes_from_the_checkpoint_before_a_truncated_one(tmp_path: Path,
                                                                  ade_root: str) -> None:
    train = load_tool('train')
    work = tmp_path / 'work'
    every = {'default_hooks.checkpoint.interval': 1, 'default_hooks.checkpoint.max_keep_ckpts': -1,
             'train_cfg.val_interval': 100}  # no validation: not what this test is about
    train.main([write_tiny_config(tmp_path, 'seg', ade_root, max_iters=2, extra=every),
                '--work-dir', str(work)])
    assert (work / 'last_checkpoint').read_text().strip().endswith('iter_2.pth')
    _truncate(work / 'iter_2.pth')

    train.main([write_tiny_config(tmp_path, 'seg', ade_root, max_iters=3, extra=every),
                '--work-dir', str(work), '--resume'])
    runs = sorted(work.glob('*/vis_data/scalars.json'))
    second = [json.loads(line)['iter'] for line in runs[-1].read_text().splitlines()
              if 'loss' in json.loads(line)]
    assert second == [2, 3]  # continued after iteration 1, the last intact checkpoint
    assert f'Load checkpoint from {work / "iter_1.pth"}' in find_log(str(work))
    assert torch.load(work / 'iter_3.pth', weights_only=True)['meta']['iter'] == 3
