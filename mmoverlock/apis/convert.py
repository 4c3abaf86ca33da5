"""The authors' COCO (mmdet 2.x) and ADE20K (mmseg 0.x) checkpoints in our mmdet 3.x / mmseg 1.x
models.

What differs between the two generations, for the models of this project (Mask R-CNN and Cascade
Mask R-CNN with FPN, UperNet with an FCN auxiliary head):

* **Parameter names: nothing.** mmdet 3.x kept every module name of these detectors
  (``neck.lateral_convs.i.conv``, ``rpn_head.rpn_conv/rpn_cls/rpn_reg``,
  ``roi_head.bbox_head[.i].shared_fcs/fc_cls/fc_reg``, ``roi_head.mask_head[.i].convs/upsample/
  conv_logits``) and mmseg 1.x those of UperNet (``decode_head.psp_modules/bottleneck/
  lateral_convs/fpn_convs/fpn_bottleneck/conv_seg``, ``auxiliary_head.convs/conv_seg``); their
  model zoos still serve the 2.x / 0.x files for these models. The backbone keys are OverLoCK's
  own (``backbone.*``, detection or segmentation form) and need no change either.
  :func:`check_state_dict` verifies this key by key against the model a config builds.
* **The container.** mmcv 1.x checkpoints hold ``meta`` with ``CLASSES`` / ``PALETTE`` and
  mmcv-1 bookkeeping (``mmcv_version``, ``config``, ``hook_msgs``, ...) and an ``optimizer``
  state mmengine cannot resume from; mmengine's hold ``meta['dataset_meta']``. Some research code
  also saves the weights of a DDP-wrapped model (``module.`` prefixes) or the bare state dict.

:func:`convert_checkpoint` turns any of these into ``{'meta': {'dataset_meta': ...},
'state_dict': ...}``; :func:`load_checkpoint_strict` converts on load and refuses a checkpoint that
does not fit the model (missing, unexpected or mis-shaped tensors) with an explanation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

from ..models.utils.pretrained import summarize_keys
from .errors import CheckpointMismatchError

#: Where mmcv 1.x checkpoints keep the weights, tried in order.
STATE_KEYS = ('state_dict', 'model')


def extract_state_dict(checkpoint: dict) -> OrderedDict[str, torch.Tensor]:
    """The weights of ``checkpoint`` (``state_dict`` / ``model`` entry or the bare dict), with the
    ``module.`` prefix of DDP-wrapped models removed."""
    state = checkpoint
    for key in STATE_KEYS:
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointMismatchError(
            f'no state dict found in the checkpoint (top-level keys: {sorted(checkpoint)[:8]})')
    return OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                       for k, v in state.items())


def convert_meta(meta: Optional[dict]) -> dict:
    """mmcv 1.x ``meta`` to mmengine's: ``CLASSES`` / ``PALETTE`` become ``dataset_meta``."""
    meta = dict(meta or {})
    if 'dataset_meta' in meta:
        return meta
    out: dict = {}
    dataset_meta = {}
    if meta.get('CLASSES') is not None:
        dataset_meta['classes'] = tuple(meta['CLASSES'])
    if meta.get('PALETTE') is not None:
        dataset_meta['palette'] = [tuple(c) for c in meta['PALETTE']]
    if dataset_meta:
        out['dataset_meta'] = dataset_meta
    source = [f'{k.split("_")[0]} {meta[k]}' for k in ('mmdet_version', 'mmseg_version',
                                                        'mmcv_version') if meta.get(k)]
    if source:
        out['converted_from'] = ', '.join(source)
    for key in ('epoch', 'iter'):
        if key in meta:
            out[f'source_{key}'] = meta[key]
    return out


def convert_checkpoint(checkpoint: dict) -> dict:
    """Any supported checkpoint layout to ``{'meta': ..., 'state_dict': ...}`` (mmengine's).

    The optimizer state of an mmcv 1.x checkpoint is dropped (mmengine cannot resume from it);
    use the result for testing, ``load_from`` or fine-tuning.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(
            f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    return {'meta': convert_meta(meta), 'state_dict': extract_state_dict(checkpoint)}


def _hints(missing: list[str], unexpected: list[str], shapes: list[str]) -> list[str]:
    hints = []
    if any(k.startswith(('backbone.h_proj', 'backbone.extra_norm.4')) for k in unexpected):
        hints.append('the checkpoint has the detection form of OverLoCK (h_proj, extra_norm.4): '
                     'use a detection config, or overview_fusion=True')
    if any(k.startswith(('backbone.h_proj', 'backbone.extra_norm.4')) for k in missing):
        hints.append('the checkpoint has the segmentation form of OverLoCK: use a segmentation '
                     'config, or overview_fusion=False')
    if any(k.startswith('backbone.') for k in shapes) or any(
            k.startswith('backbone.') and '.blocks' not in k for k in missing):
        hints.append('the backbone arch differs: pick the config of the checkpoint\'s arch '
                     '(xt / t / s / b)')
    if any(k.startswith(('roi_head', 'decode_head', 'auxiliary_head')) for k in shapes):
        hints.append('head shapes differ: check num_classes (COCO 80, ADE20K 150)')
    def has(keys: list[str], prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if (has(unexpected, 'decode_head') and has(missing, 'roi_head')) or (
            has(unexpected, 'roi_head') and has(missing, 'decode_head')):
        hints.append('detection and segmentation checkpoints are not interchangeable')
    return hints


def check_state_dict(model: nn.Module, state: dict, source: str = 'checkpoint') -> None:
    """Require ``state`` to hold exactly ``model``'s tensors with the same shapes.

    Raises:
        CheckpointMismatchError: listing missing, unexpected and mis-shaped keys, with hints.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(
        expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = [f'{source} does not fit {type(model).__name__}:']
    if missing:
        parts.append(f'{len(missing)} missing ({summarize_keys(missing, 3)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected ({summarize_keys(unexpected, 3)})')
    if shapes:
        parts.append('shape mismatch ' + ', '.join(
            f'{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}' for k in shapes[:4])
            + (' ...' if len(shapes) > 4 else ''))
    hints = _hints(missing, unexpected, shapes)
    raise CheckpointMismatchError('; '.join(parts) + ('. Hint: ' + '; '.join(hints) if hints
                                                      else '') + '.')


def read_checkpoint(path: str) -> dict:
    """Read ``path`` (local files through :func:`mmoverlock.safe_load`) and convert it."""
    return convert_checkpoint(CheckpointLoader.load_checkpoint(path, map_location='cpu'))


def load_checkpoint_strict(model: nn.Module, path: str) -> dict:
    """Load an mmengine or mmcv 1.x checkpoint into ``model``, all keys and shapes equal.

    Sets ``model.dataset_meta`` from the checkpoint when the model has none. Returns the
    converted ``meta``.
    """
    checkpoint = read_checkpoint(path)
    check_state_dict(model, checkpoint['state_dict'], source=path)
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    meta = checkpoint['meta']
    if meta.get('dataset_meta') and not getattr(model, 'dataset_meta', None):
        model.dataset_meta = meta['dataset_meta']
    return meta


def convert_file(src: str, dst: str, model: Optional[nn.Module] = None) -> dict:
    """Convert the checkpoint ``src`` and save it to ``dst``; check it against ``model`` if given.

    Returns the saved checkpoint.
    """
    checkpoint = read_checkpoint(src)
    if model is not None:
        check_state_dict(model, checkpoint['state_dict'], source=src)
    torch.save(checkpoint, dst)
    return checkpoint


__all__ = ['check_state_dict', 'convert_checkpoint', 'convert_file', 'convert_meta',
           'extract_state_dict', 'load_checkpoint_strict', 'read_checkpoint']
