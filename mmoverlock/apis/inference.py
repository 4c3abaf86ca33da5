"""Inference on image files with mmdet's ``DetInferencer`` / mmseg's ``MMSegInferencer``.

The library's own inferencer does the work (its test pipeline, ``test_step``, visualizer); what is
added here is what ``tools/infer.py`` needs around it:

* the checkpoint is read once, converted if it is an mmdet 2.x / mmseg 0.x file
  (:func:`~mmoverlock.apis.convert.convert_checkpoint`) and must fit the model exactly
  (:func:`~mmoverlock.apis.convert.check_state_dict`): the inferencers load non-strictly and would
  otherwise run a half-random model after printing a warning;
* missing or undecodable images, a missing checkpoint or an unusable device are one
  :class:`~mmoverlock.apis.errors.UsageError` each, before any model is built;
* the inferencer is called image by image (mmseg's keeps every prediction of a call, with its
  full-size logits, in memory until the call ends), and each drawn prediction is written as
  ``<out dir>/<image name>.png``, the raw prediction optionally to ``<out dir>/preds/``.
"""
from __future__ import annotations

import copy
import json
import os
import os.path as osp
import pickle
from typing import TYPE_CHECKING, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from mmengine.config import Config

from .config import check_checkpoint_path, check_model_config, library_of, load_config
from .convert import check_state_dict, read_checkpoint
from .errors import UsageError

if TYPE_CHECKING:
    from mmengine.infer import BaseInferencer

#: File name endings taken as images when a folder is given (those of mmdet's inferencer).
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
#: Where the raw predictions go, under the output folder.
PRED_DIR = 'preds'


def _inferencer_class(library: str) -> type:
    if library == 'mmdet':
        from mmdet.apis import DetInferencer
        return DetInferencer
    from mmseg.apis import MMSegInferencer
    return MMSegInferencer


def _strict_inferencer_class(library: str) -> type:
    """The library's inferencer, given a checkpoint that was read (and checked) beforehand.

    The base class loads ``weights`` itself, non-strictly; this subclass hands it the converted
    checkpoint instead and refuses one that does not fit the model. Everything else (dataset meta
    from the checkpoint, palette, pipeline, visualizer) is the library's.
    """
    base = _inferencer_class(library)

    class StrictCheckpointInferencer(base):
        def __init__(self, *args, checkpoint: dict, source: str, **kwargs) -> None:
            self._checkpoint, self._source = checkpoint, source
            super().__init__(*args, weights=None, **kwargs)
            self._checkpoint = None  # the weights are in the model now

        def _load_weights_to_model(self, model: torch.nn.Module, checkpoint: Optional[dict],
                                   cfg: Optional[Config]) -> None:
            check_state_dict(model, self._checkpoint['state_dict'], source=self._source)
            super()._load_weights_to_model(model, self._checkpoint, cfg)

    StrictCheckpointInferencer.__name__ = f'Strict{base.__name__}'
    StrictCheckpointInferencer.__qualname__ = StrictCheckpointInferencer.__name__
    return StrictCheckpointInferencer


def check_device(device: Optional[str]) -> str:
    """``device`` if this machine has it (None: ``cuda`` when available, else ``cpu``)."""
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f'--device {device!r} is not a device name; use cpu, cuda or '
                         'cuda:N') from None
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {device!r}: no CUDA GPU is available here; use --device cpu')
    if kind not in ('cpu', 'cuda'):
        raise UsageError(f'--device {device!r}: only cpu and cuda[:N] are supported')
    return device


def _read_checkpoint(path: str) -> dict:
    check_checkpoint_path(path, 'checkpoint', 'Give the .pth file written by tools/train.py '
                          '(work_dirs/<config name>/iter_N.pth or epoch_N.pth).')
    try:
        return read_checkpoint(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f'cannot read checkpoint {path!r} ({first}); give a .pth file saved by '
                         'tools/train.py or tools/convert_checkpoint.py') from None


def build_inferencer(config: Union[str, Config], checkpoint: str, device: Optional[str] = None,
                     cfg_options: Optional[dict] = None,
                     show_progress: bool = False) -> BaseInferencer:
    """The library's inferencer (``DetInferencer`` or ``MMSegInferencer``) for ``config``.

    Args:
        config: a config path or a loaded :class:`~mmengine.config.Config` (not modified).
        checkpoint: weights saved by ``tools/train.py`` (or an authors' mmdet 2.x / mmseg 0.x
            file, converted on load); they must fit the model exactly.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'``; None picks ``cuda`` when available.
        cfg_options: ``--cfg-options`` pairs merged into the config.
        show_progress: let the inferencer draw its own progress bar (rich) while it runs.

    Raises:
        UsageError: missing config or checkpoint, an unreadable checkpoint, one that does not fit
            the model, an inconsistent config or an unavailable device.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
    else:
        cfg = load_config(config, cfg_options)
    library = library_of(cfg)
    device = check_device(device)
    check_model_config(cfg)
    weights = _read_checkpoint(checkpoint)
    visualizer = cfg.get('visualizer')
    if isinstance(visualizer, dict):
        if visualizer.get('name') == 'visualizer':
            visualizer.pop('name')  # named after the inferencer, not the global 'visualizer'
        # Drawings go to files given to the visualizer (out_file), not to logging backends,
        # which would only warn that they have no save_dir.
        visualizer['vis_backends'] = None
    cls = _strict_inferencer_class(library)
    inferencer = cls(model=cfg, checkpoint=weights, source=checkpoint, device=device,
                     scope=library)
    inferencer.show_progress = show_progress
    return inferencer


def expand_images(inputs: Sequence[str]) -> list[str]:
    """Image paths of ``inputs`` (files, or folders whose images are taken in name order).

    Raises:
        UsageError: a path does not exist, a folder holds no image, a file cannot be decoded, or
            two images have the same name (their outputs would overwrite each other).
    """
    images: list[str] = []
    for path in inputs:
        if osp.isdir(path):
            found = sorted(osp.join(path, name) for name in os.listdir(path)
                           if name.lower().endswith(IMAGE_SUFFIXES)
                           and osp.isfile(osp.join(path, name)))
            if not found:
                raise UsageError(f'folder {path!r} holds no image ({", ".join(IMAGE_SUFFIXES)})')
            images += found
        elif osp.isfile(path):
            images.append(path)
        else:
            raise UsageError(f'image {path!r} does not exist (resolved: {osp.abspath(path)!r})')
    if not images:
        raise UsageError('no image given')
    for path in images:  # by the file's header: cheap, and what the inferencer's loader needs
        if not cv2.haveImageReader(path):
            raise UsageError(f'cannot read image {path!r}: not an image file OpenCV can decode '
                             f'({", ".join(IMAGE_SUFFIXES)})')
    stems: dict[str, str] = {}
    for path in images:
        stem = osp.splitext(osp.basename(path))[0]
        if stem in stems:
            raise UsageError(f'images {stems[stem]!r} and {path!r} have the same name; their '
                             'outputs would overwrite each other: run them separately (--out-dir)')
        stems[stem] = path
    return images


def check_score_thr(library: str, score_thr: Optional[float]) -> None:
    """``score_thr`` must be None, or a score (0..1) for a detection (``'mmdet'``) model."""
    if score_thr is None:
        return
    if library != 'mmdet':
        raise UsageError('--score-thr applies to detection configs only (a segmentation model '
                         'labels every pixel)')
    if not 0.0 <= score_thr <= 1.0:
        raise UsageError(f'--score-thr must be between 0 and 1, got {score_thr}')


def _only(value: object) -> object:
    """The single element of a one-image result (mmseg unwraps it already, mmdet does not)."""
    return value[0] if isinstance(value, list) else value


def _save_prediction(library: str, prediction: object, stem: str, folder: str,
                     num_classes: int) -> str:
    os.makedirs(folder, exist_ok=True)
    if library == 'mmdet':  # mmdet's own json form: labels, scores, bboxes (x1y1x2y2), RLE masks
        path = osp.join(folder, f'{stem}.json')
        with open(path, 'w') as f:
            json.dump(prediction, f)
        return path
    path = osp.join(folder, f'{stem}.png')  # the class index of every pixel
    labels = np.asarray(prediction)
    cv2.imwrite(path, labels.astype(np.uint8 if num_classes <= 256 else np.uint16))
    return path


def infer_images(inferencer: BaseInferencer, images: Sequence[str], out_dir: str,
                 score_thr: Optional[float] = None, save_predictions: bool = False) -> list[dict]:
    """Run ``inferencer`` on each image and write its drawn prediction to ``out_dir``.

    Args:
        inferencer: from :func:`build_inferencer` (or any ``DetInferencer`` / ``MMSegInferencer``).
        images: image files or folders (see :func:`expand_images`).
        out_dir: ``<image name>.png`` is the drawn prediction of each image, at its size.
        score_thr: detection only: boxes and masks drawn from this score up (mmdet's default
            0.3 when None).
        save_predictions: also write the raw predictions, ``preds/<image name>.json`` (mmdet's
            form: labels, scores, boxes, RLE masks) or ``preds/<image name>.png`` (class indices).

    Returns:
        One ``dict(image=..., drawn=..., prediction=...)`` per image (``prediction`` is a file
        path, or None without ``save_predictions``).
    """
    library = inferencer.scope
    check_score_thr(library, score_thr)
    images = expand_images(images)
    os.makedirs(out_dir, exist_ok=True)
    draw = dict(pred_score_thr=0.3 if score_thr is None else score_thr) if library == 'mmdet' \
        else {}
    num_classes = len(inferencer.model.dataset_meta.get('classes') or ())
    results = []
    for path in images:
        stem = osp.splitext(osp.basename(path))[0]
        output = inferencer([path], return_vis=True, **draw)
        drawn = osp.join(out_dir, f'{stem}.png')
        cv2.imwrite(drawn, np.ascontiguousarray(_only(output['visualization'])[..., ::-1]))
        prediction = None
        if save_predictions:
            prediction = _save_prediction(library, _only(output['predictions']), stem,
                                          osp.join(out_dir, PRED_DIR), num_classes)
        results.append(dict(image=path, drawn=drawn, prediction=prediction))
    return results


__all__ = ['IMAGE_SUFFIXES', 'build_inferencer', 'check_device', 'check_score_thr', 'expand_images',
           'infer_images']
