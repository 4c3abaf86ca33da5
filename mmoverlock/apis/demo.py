"""The demo: train OverLoCK-XT on the built-in shapes data, evaluate, draw predictions.

Used by ``tools/demo.py``; each task is one :func:`run_demo` call. After training, the saved
checkpoint also goes through the library's own inferencer (:mod:`mmoverlock.apis.inference`) on a
real photograph that the repository ships (:data:`DEMO_PHOTO`).
"""
from __future__ import annotations

import os
import os.path as osp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import IO, TYPE_CHECKING, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import print_log

from .config import library_of, load_config, prepare_config
from .errors import UsageError
from .inference import build_inferencer, infer_images
from .launch import build_runner, configure_run, unwrap
from .progress import STATUS_FILE, ProgressDisplay, ProgressFileHook, follow, write_status

if TYPE_CHECKING:
    from mmengine.runner import Runner

#: Headline metric of each library's evaluator, as quoted in the demo summary.
HEADLINE_METRICS = {'mmdet': ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                              'coco/segm_mAP_50'),
                    'mmseg': ('mIoU', 'aAcc', 'mAcc')}
#: The photograph the demo runs its trained models on (CC0; source and licence in
#: demo/images/LICENSE.md). In a source checkout only: it is not part of the installed package.
DEMO_PHOTO = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'demo',
                      'images', 'coffee.jpg')


def _caption(frame: np.ndarray, text: str) -> np.ndarray:
    band = np.full((18, frame.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, frame], axis=0)


@torch.no_grad()
def draw_predictions(runner: Runner, out_file: str, indices: Sequence[int] = (0, 1, 2, 3),
                     score_thr: float = 0.5, scale: int = 2) -> str:
    """Draw ground truth (left) next to the prediction (right) for test images ``indices``.

    Every pair is also written to ``<out_file without extension>/<index>.png``; ``out_file`` gets
    them stacked, enlarged ``scale`` times. Returns ``out_file``.
    """
    model = unwrap(runner.model)
    model.eval()
    dataset = runner.test_dataloader.dataset
    visualizer = runner.visualizer
    visualizer.dataset_meta = dataset.metainfo
    folder = osp.splitext(out_file)[0]
    os.makedirs(folder, exist_ok=True)
    is_det = library_of(runner.cfg) == 'mmdet'
    frames = []
    for index in [i for i in indices if i < len(dataset)]:
        sample = model.test_step(pseudo_collate([dataset[index]]))[0]
        image = cv2.cvtColor(cv2.imread(sample.img_path), cv2.COLOR_BGR2RGB)
        extra = dict(pred_score_thr=score_thr) if is_det else dict(with_labels=False)
        pair_file = osp.join(folder, f'{index}.png')
        visualizer.add_datasample(f'demo_{index}', image, data_sample=sample, draw_gt=True,
                                  draw_pred=True, show=False, out_file=pair_file, **extra)
        frame = cv2.resize(cv2.imread(pair_file), None, fx=scale, fy=scale,
                           interpolation=cv2.INTER_NEAREST)
        frames.append(_caption(frame, f'{osp.basename(sample.img_path)}: ground truth (left), '
                                      'prediction (right)'))
    width = max(f.shape[1] for f in frames)
    frames = [np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0)), constant_values=255)
              for f in frames]
    cv2.imwrite(out_file, np.concatenate(frames, axis=0))
    return out_file


def run_demo(config: str, work_dir: str, cfg_options: Optional[dict] = None,
             num_images: int = 4, progress_file: Optional[str] = None,
             photo: Optional[str] = DEMO_PHOTO) -> dict:
    """Train the demo config, evaluate it once on the test split, draw predictions and run the
    saved checkpoint through the library's inferencer on ``photo``.

    Args:
        config: the demo config (or any config training from scratch on local data).
        work_dir: logs, checkpoint, ``predictions.png`` and ``photo/<photo name>.png`` go here.
        cfg_options: ``--cfg-options`` pairs merged into the config.
        num_images: test images drawn into ``predictions.png``.
        progress_file: if given, the run's progress is written there as it goes
            (:class:`~mmoverlock.apis.progress.ProgressFileHook`), for ``tools/demo.py``'s display.
        photo: an image file to draw the trained model's prediction on (None: none).

    Returns:
        ``dict(metrics=..., picture=..., photo=..., checkpoint=..., seconds=...)``; ``photo`` is
        the drawn prediction of ``photo`` (None without one).
    """
    start = time.time()

    def status(phase: str, message: str = '') -> None:
        if progress_file:
            write_status(progress_file, phase=phase, message=message,
                         elapsed=time.time() - start)

    if photo is not None and not osp.isfile(photo):
        raise UsageError(f'demo photograph {photo!r} does not exist; it ships with the '
                         'repository (demo/images/), run the demo from a source checkout')
    status('start', 'building the model and data')
    try:
        cfg = load_config(config, cfg_options)
        configure_run(cfg, config, work_dir)
        prepare_config(cfg, 'train')
        # One evaluation, after training, whose metrics come back to the caller.
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
        runner = build_runner(cfg)
        if progress_file:
            runner.register_hook(ProgressFileHook(progress_file))
        runner.train()
        metrics = runner.test()
        status('draw', 'test images')
        picture = draw_predictions(runner, osp.join(cfg.work_dir, 'predictions.png'),
                                   indices=range(num_images))
        checkpoint = osp.join(cfg.work_dir, f'iter_{runner.iter}.pth')
        drawn_photo = None
        if photo is not None:
            status('draw', f'inference on {osp.basename(photo)}')
            drawn_photo = infer_photo(config, cfg_options, checkpoint, photo,
                                      osp.join(cfg.work_dir, 'photo'))
    except BaseException as err:
        status('failed', f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}')
        raise
    seconds = time.time() - start
    summary = summarize_metrics(cfg, metrics)
    status('done', summary)
    print_log(f'demo {osp.basename(config)}: {summary} in {seconds:.0f} s; picture {picture}'
              + (f', photo {drawn_photo}' if drawn_photo else ''), logger='current')
    return dict(metrics=metrics, picture=picture, photo=drawn_photo, checkpoint=checkpoint,
                seconds=seconds)


def infer_photo(config: str, cfg_options: Optional[dict], checkpoint: str, photo: str,
                out_dir: str) -> str:
    """Draw the prediction of ``checkpoint`` on ``photo`` with the library's inferencer, as
    ``tools/infer.py`` does; returns the drawn file (``<out_dir>/<photo name>.png``)."""
    inferencer = build_inferencer(config, checkpoint, cfg_options=cfg_options)
    return infer_images(inferencer, [photo], out_dir)[0]['drawn']


def run_demo_worker(config: str, work_dir: str, cfg_options: Optional[dict], threads: int,
                    log_file: str, progress_file: str) -> dict:
    """:func:`run_demo` in a worker process: its output goes to ``log_file``, its progress to
    ``progress_file``, and it runs ``threads`` intra-op threads."""
    from ..utils.cpu_allocator import keep_freed_memory
    os.makedirs(osp.dirname(log_file) or '.', exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)
    keep_freed_memory()  # a spawned worker does not inherit the parent's malloc settings
    return run_demo(config, work_dir, cfg_options, progress_file=progress_file)


def run_demos(configs: Mapping[str, str], work_dir: str, cfg_options: Optional[dict] = None,
              jobs: int = 2, threads: Optional[int] = None,
              stream: Optional[IO[str]] = None) -> dict[str, dict]:
    """Run :func:`run_demo` for each ``task: config`` in worker processes, showing progress.

    Each task runs in ``<work_dir>/<task>``, its output going to ``console.log`` there; ``stream``
    (default stdout) shows one progress line or bar per task
    (:class:`~mmoverlock.apis.progress.ProgressDisplay`).

    Args:
        configs: task name (``'det'``, ``'seg'``) to config path.
        work_dir: parent of the tasks' work dirs.
        cfg_options: merged into every config.
        jobs: tasks run at the same time.
        threads: intra-op threads of each task (default: the CPU's cores shared among the jobs).
        stream: where progress goes.

    Returns:
        The :func:`run_demo` result of each task. A task's exception is raised after every task
        has ended, with the path of its output on stderr.
    """
    stream = stream if stream is not None else sys.stdout
    tasks = list(configs)
    jobs = max(1, min(jobs, len(tasks)))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    logs = {t: osp.join(work_dir, t, 'console.log') for t in tasks}
    status_files = {t: osp.join(work_dir, t, STATUS_FILE) for t in tasks}
    for path in status_files.values():  # a previous run's status is not this run's
        if osp.exists(path):
            os.remove(path)
    how = 'side by side' if jobs > 1 else 'one after the other'
    print(f'training {" and ".join(tasks)} {how} ({threads} thread(s) each); their output goes '
          f'to {" and ".join(logs.values())}', file=stream, flush=True)
    display = ProgressDisplay(tasks, stream=stream)
    with ProcessPoolExecutor(jobs, mp_context=get_context('spawn')) as pool:
        futures = {t: pool.submit(run_demo_worker, configs[t], osp.join(work_dir, t),
                                  cfg_options, threads, logs[t], status_files[t])
                   for t in tasks}
        try:
            follow(futures, status_files, display)
        finally:
            display.close()
    results = {}
    for task, future in futures.items():
        if future.exception() is not None:
            print(f'{task} failed; its output is in {logs[task]}', file=sys.stderr)
            raise future.exception()
        results[task] = future.result()
    return results


def summarize_metrics(cfg: Config, metrics: dict) -> str:
    """The headline metrics of ``metrics`` as ``name value`` pairs."""
    keys = HEADLINE_METRICS[library_of(cfg)]
    return ', '.join(f'{k} {metrics[k]:.3f}' if k.startswith('coco') else f'{k} {metrics[k]:.2f}'
                     for k in keys if k in metrics)


__all__ = ['DEMO_PHOTO', 'draw_predictions', 'infer_photo', 'run_demo', 'run_demo_worker',
           'run_demos', 'summarize_metrics']
