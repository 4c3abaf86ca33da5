"""The demo's progress display (issue 13.8) and its photograph inference (13.6), without the
full demo: the status file and its rendering, and a 2-iteration run of the demo machinery."""
from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import pytest
from helpers import load_tool

import mmoverlock.apis.progress as progress
from mmoverlock.apis import (
    DEMO_PHOTO,
    ProgressDisplay,
    UsageError,
    follow,
    format_status,
    read_status,
    run_demo,
    run_demos,
    write_status,
)
from mmoverlock.apis.progress import format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(done: int, total: int = 300, loss: float = 0.5, eta: float = 270.0) -> dict:
    return dict(phase='train', iter=done, total=total, loss=loss, eta=eta, elapsed=10.0)


def test_status_file_round_trip_and_unreadable(tmp_path: Path) -> None:
    path = str(tmp_path / 'sub' / 'progress.json')
    assert read_status(path) is None  # not written yet
    write_status(path, **_train(12))
    assert read_status(path) == _train(12)
    assert list((tmp_path / 'sub').iterdir()) == [Path(path)]  # no temporary file left
    Path(path).write_text('{"phase": "tra')  # a torn write (never produced by write_status)
    assert read_status(path) is None
    Path(path).write_text(json.dumps({'phase': 'sleeping'}))
    assert read_status(path) is None


def test_format_status_and_duration() -> None:
    assert format_duration(45) == '45s'
    assert format_duration(185) == '3m05s'
    assert format_duration(3720) == '1h02m'
    assert format_status('det', _train(120, loss=0.5321, eta=185)) == \
        'det: train 120/300, loss 0.532, ETA 3m05s'
    assert format_status('seg', dict(phase='test', iter=3, total=16, eta=40)) == \
        'seg: test 3/16, ETA 40s'
    assert format_status('seg', dict(phase='done', message='mIoU 94.83')) == \
        'seg: done (mIoU 94.83)'


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(['det', 'seg'], stream=stream)
    assert not display.bars
    display.update('det', dict(phase='start', message='building the model and data'))
    for done in range(0, 301):
        display.update('det', _train(done, eta=300 - done))
        display.update('det', _train(done, eta=300 - done))  # polled twice: printed once
        display.update('seg', None)  # nothing written yet
    display.update('det', dict(phase='test', iter=0, total=16, eta=None))
    for done in range(1, 17):
        display.update('det', dict(phase='test', iter=done, total=16, eta=16 - done))
    display.update('det', dict(phase='done', message='coco/bbox_mAP 0.821'))
    lines = stream.getvalue().splitlines()
    assert lines[0] == 'det: start (building the model and data)'
    # a line every tenth of the training run (30 iterations), the first and the last included
    assert lines[1:12] == [f'det: train {i}/300, loss 0.500, ETA {format_duration(300 - i)}'
                           for i in range(0, 301, 30)]
    assert lines[12:] == ['det: test 0/16', 'det: test 16/16, ETA 0s',
                          'det: done (coco/bbox_mAP 0.821)']
    assert '\r' not in stream.getvalue()  # no bar redraws


def test_bars_on_a_terminal() -> None:
    stream = _Terminal()
    display = ProgressDisplay(['det', 'seg'], stream=stream)
    assert display.bars
    display.update('det', _train(120, loss=0.5321))
    display.update('seg', dict(phase='test', iter=3, total=16))
    text = stream.getvalue()
    assert '120/300' in text and 'loss 0.532' in text and '3/16' in text
    assert 'det train' in text and 'seg test' in text
    assert '\r' in text  # redrawn in place
    display.update('det', _train(150, loss=0.4))
    assert '150/300' in stream.getvalue()[len(text):]
    text = stream.getvalue()
    display.update('seg', dict(phase='done', message='mIoU 90.00'))
    done = stream.getvalue()[len(text):]
    assert 'seg done' in done and ': mIoU 90.00' in done
    assert '/16' not in done and 'it/s' not in done  # no counter for a finished task
    display.close()
    assert 'det: train' not in stream.getvalue()  # no plain lines


def test_follow_shows_statuses_until_the_tasks_end(tmp_path: Path) -> None:
    files = {t: str(tmp_path / t / 'progress.json') for t in ('det', 'seg')}
    release = threading.Event()

    def task(name: str) -> str:
        for done in range(3):
            write_status(files[name], **_train(done, total=2))
            time.sleep(0.02)
        release.wait(5)
        write_status(files[name], phase='done', message=f'{name} ok')
        return name

    stream = io.StringIO()
    display = ProgressDisplay(['det', 'seg'], stream=stream, every=1)
    with ThreadPoolExecutor(2) as pool:
        futures = {t: pool.submit(task, t) for t in files}
        threading.Timer(0.3, release.set).start()
        follow(futures, files, display, interval=0.05)
    lines = stream.getvalue().splitlines()
    assert sorted(lines[-2:]) == ['det: done (det ok)', 'seg: done (seg ok)']
    for name in files:  # the last training status stays until the task ends: certainly seen
        assert f'{name}: train 2/2, loss 0.500, ETA 4m30s' in lines


def test_run_demo_reports_progress_and_draws_the_photo(tiny_seg_config: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo machinery for 2 iterations: every status the hook and run_demo write, in order."""
    written: list[dict] = []
    real = progress.write_status

    def record(path: str, **status: object) -> None:
        written.append(status)
        real(path, **status)

    monkeypatch.setattr(progress, 'write_status', record)
    monkeypatch.setattr('mmoverlock.apis.demo.write_status', record)
    status_file = tmp_path / 'work' / 'progress.json'
    result = run_demo(tiny_seg_config, str(tmp_path / 'work'), num_images=1,
                      progress_file=str(status_file))
    phases = [(s['phase'], s.get('iter'), s.get('total')) for s in written]
    # 2 training iterations; the test split (4 images, batch 4) is one test iteration
    assert phases == [('start', None, None), ('train', 0, 2), ('train', 1, 2), ('train', 2, 2),
                      ('test', 0, 1), ('test', 1, 1),
                      ('draw', None, None), ('draw', None, None), ('done', None, None)]
    losses = [s['loss'] for s in written if s['phase'] == 'train' and s['iter']]
    assert all(isinstance(v, float) and v > 0 for v in losses)
    assert written[-2]['message'] == 'inference on coffee.jpg'
    done = read_status(str(status_file))
    assert done['phase'] == 'done' and 'mIoU' in done['message']
    assert Path(result['photo']) == tmp_path / 'work' / 'photo' / 'coffee.png'
    assert cv2.imread(result['photo']).shape == cv2.imread(DEMO_PHOTO).shape


def test_demo_checks_its_inputs_first(tiny_seg_config: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match='nope.jpg'):
        run_demo(tiny_seg_config, str(tmp_path / 'work'), photo=str(tmp_path / 'nope.jpg'))
    assert not (tmp_path / 'work').exists()  # refused before anything ran
    demo = load_tool('demo')
    with pytest.raises(UsageError, match='--iters'):
        demo.parse_args(['--iters', '0'])
    assert demo.parse_args(['--iters', '2', '--task', 'seg']).iters == 2


def test_run_demos_in_a_worker_with_progress_lines(tiny_seg_config: str, tmp_path: Path) -> None:
    """What tools/demo.py runs (spawned worker, status file, plain progress lines) on the tiny
    segmentation config for 2 iterations."""
    work = tmp_path / 'demo'
    stream = io.StringIO()
    results = run_demos({'seg': tiny_seg_config}, str(work), jobs=1, threads=1, stream=stream)
    out = stream.getvalue().splitlines()
    assert out[0].startswith('training seg one after the other (1 thread(s) each)')
    assert out[-1].startswith('seg: done (mIoU')
    # polled once a second: which statuses are seen depends on the pace, their order does not
    phases = [line.split()[1] for line in out[1:]]
    order = ['start', 'train', 'test', 'draw', 'done']
    assert all(p in order for p in phases)
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases)
    assert Path(results['seg']['photo']) == work / 'seg' / 'photo' / 'coffee.png'
    assert (work / 'seg' / 'console.log').read_text().count('Iter(train)') == 2
    assert read_status(str(work / 'seg' / 'progress.json'))['phase'] == 'done'
