"""Loading configs and checking them before a run starts.

mmdet and mmseg fail late and deep on a wrong path or a width mismatch (an ``AssertionError`` in a
dataset's ``__init__``, a shape error in the first forward). The checks here run on the config
alone, before anything is built, and raise one of the :mod:`mmoverlock.apis.errors` with a message
that names the config key, the value and the fix.
"""
from __future__ import annotations

import difflib
import glob
import inspect
import os.path as osp
from typing import Iterator, Optional, Sequence

from mmengine.config import Config
from mmengine.logging import print_log

from .errors import (
    CheckpointNotFoundError,
    ConfigMismatchError,
    ConfigNotFoundError,
    DataNotFoundError,
)

#: Dataloaders checked for each kind of run.
SPLITS = {'train': ('train', 'val'), 'test': ('test',)}
#: Where to get the real data sets, by dataset type.
DATASET_HINTS = {
    'CocoDataset': 'COCO 2017 from https://cocodataset.org (annotations/instances_train2017.json, '
                   'annotations/instances_val2017.json, train2017/, val2017/)',
    'ADE20KDataset': 'ADEChallengeData2016 from http://sceneparsing.csail.mit.edu '
                     '(images/{training,validation}/, annotations/{training,validation}/)',
}
DEMO_HINT = ('for the built-in demo data run `python tools/demo.py --data-only` (tools/train.py '
             'and tools/test.py also generate it when a config points at data/demo/)')


def _is_remote(path: str) -> bool:
    return '://' in str(path)


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Read ``path`` and merge ``cfg_options`` (``--cfg-options`` pairs) into it.

    Raises:
        ConfigNotFoundError: ``path`` is not a file; the message lists the closest configs.
    """
    if not osp.isfile(path):
        folder = osp.dirname(path) or '.'
        known = glob.glob(osp.join(folder, '*.py')) or glob.glob('configs/*/*.py')
        close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
        hint = f' Did you mean {", ".join(close)}?' if close else (
            ' The configs of this project are under configs/detection/ and configs/segmentation/.')
        raise ConfigNotFoundError(f'config file {path!r} does not exist.{hint}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def library_of(cfg: Config) -> str:
    """``'mmdet'`` or ``'mmseg'``: the library whose registries the config uses."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise ConfigMismatchError(
            f"default_scope is {scope!r}; mmoverlock's tools run mmdet or mmseg configs, which "
            "set default_scope = 'mmdet' / 'mmseg' (inherit an mmdet:: or mmseg:: base).")
    return scope


# ------------------------------------------------------------------------------------------------
# Model consistency
# ------------------------------------------------------------------------------------------------
def overlock_out_channels(backbone: dict) -> Optional[list[int]]:
    """Widths of the maps an ``OverLoCK`` backbone config returns (None for other backbones)."""
    if str(backbone.get('type', '')).split('.')[-1] != 'OverLoCK':
        return None
    from ..models.backbones.overlock import OverLoCK
    params = inspect.signature(OverLoCK.__init__).parameters
    arch = backbone.get('arch', params['arch'].default)
    try:
        dims = OverLoCK.resolve_arch(arch)['embed_dim']
    except (TypeError, ValueError) as err:
        raise ConfigMismatchError(f'model.backbone.arch: {err}') from None
    ctx = dims[3] // 4
    widths = [dims[0], dims[1], dims[2] + ctx, dims[3] + ctx]
    out_indices = backbone.get('out_indices', params['out_indices'].default)
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    try:
        return [widths[i] for i in out_indices]
    except (IndexError, TypeError):
        raise ConfigMismatchError(f'model.backbone.out_indices must index the four OverLoCK '
                                  f'outputs (0..3), got {out_indices}') from None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _expected_head_widths(outs: list[int], head: dict, key: str) -> object:
    in_index = head.get('in_index', -1)
    try:
        if isinstance(in_index, (list, tuple)):
            return [outs[i] for i in in_index]
        return outs[in_index]
    except IndexError:
        raise ConfigMismatchError(f'{key}.in_index={in_index} but the backbone returns only '
                                  f'{len(outs)} maps') from None


def _mismatch(key: str, value: object, expected: object, backbone: dict) -> ConfigMismatchError:
    return ConfigMismatchError(
        f'{key} = {value} does not match the OverLoCK backbone (arch='
        f'{backbone.get("arch", "t")!r}, out_indices={backbone.get("out_indices", (0, 1, 2, 3))}),'
        f' whose maps have {expected} channels. Set {key}={expected} (e.g. --cfg-options '
        f'"{key}={expected}"), or use the config of that arch.')


def _dataset_cfgs(loader: Optional[dict], key: str) -> Iterator[tuple[str, dict]]:
    """The leaf dataset configs of a dataloader (through Repeat/Concat/ClassBalanced wrappers)."""
    if not loader or not loader.get('dataset'):
        return
    stack = [(f'{key}.dataset', loader['dataset'])]
    while stack:
        where, ds = stack.pop()
        if isinstance(ds, (list, tuple)):
            stack.extend((f'{where}.{i}', d) for i, d in reversed(list(enumerate(ds))))
        elif 'dataset' in ds:
            stack.append((f'{where}.dataset', ds['dataset']))
        elif 'datasets' in ds:
            stack.append((f'{where}.datasets', ds['datasets']))
        else:
            yield where, ds


def _dataset_classes(cfg: Config, ds: dict) -> Optional[tuple]:
    meta = ds.get('metainfo') or {}
    if meta.get('classes'):
        return tuple(meta['classes'])
    if library_of(cfg) == 'mmdet':
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    try:
        cls = DATASETS.get(ds.get('type'))
    except KeyError:  # unknown scope prefix: leave it to the build
        return None
    classes = getattr(cls, 'METAINFO', {}).get('classes') if cls is not None else None
    return tuple(classes) if classes else None


def _head_class_counts(cfg: Config) -> list[tuple[str, int]]:
    model = cfg.model
    found = []
    heads: list[tuple[str, object]] = []
    roi = model.get('roi_head') or {}
    heads += [('model.roi_head.bbox_head', roi.get('bbox_head')),
              ('model.roi_head.mask_head', roi.get('mask_head')),
              ('model.bbox_head', model.get('bbox_head')),
              ('model.decode_head', model.get('decode_head')),
              ('model.auxiliary_head', model.get('auxiliary_head'))]
    for key, head in heads:
        if not head:
            continue
        for i, part in enumerate(_as_list(head)):
            if isinstance(part, dict) and 'num_classes' in part:
                where = f'{key}.{i}' if isinstance(head, (list, tuple)) else key
                found.append((where, part['num_classes']))
    return found


def check_model_config(cfg: Config) -> None:
    """Check that the neck / decode heads fit the OverLoCK backbone and the data set's classes.

    Raises:
        ConfigMismatchError: with the key to change and the value it needs.
    """
    model = cfg.get('model')
    if not model or 'backbone' not in model:
        return
    backbone = model.backbone
    outs = overlock_out_channels(backbone)
    if outs is not None:
        necks = _as_list(model.get('neck')) if model.get('neck') else []
        if necks and isinstance(necks[0], dict) and 'in_channels' in necks[0]:
            key = 'model.neck' + ('.0' if isinstance(model.neck, (list, tuple)) else '')
            if list(_as_list(necks[0].in_channels)) != outs:
                raise _mismatch(f'{key}.in_channels', list(necks[0].in_channels), outs, backbone)
        for name in ('decode_head', 'auxiliary_head'):
            head = model.get(name)
            if not head:
                continue
            for i, part in enumerate(_as_list(head)):
                key = f'model.{name}' + (f'.{i}' if isinstance(head, (list, tuple)) else '')
                if 'in_channels' not in part:
                    continue
                expected = _expected_head_widths(outs, part, key)
                value = part.in_channels
                value = list(value) if isinstance(value, (list, tuple)) else value
                if value != expected:
                    raise _mismatch(f'{key}.in_channels', value, expected, backbone)
    counts = _head_class_counts(cfg)
    if not counts:
        return
    for split in ('train', 'val', 'test'):
        for where, ds in _dataset_cfgs(cfg.get(f'{split}_dataloader'), f'{split}_dataloader'):
            classes = _dataset_classes(cfg, ds)
            if not classes:
                continue
            for key, num in counts:
                if num != len(classes):
                    names = ', '.join(map(str, classes[:8])) + (', ...' if len(classes) > 8
                                                                 else '')
                    raise ConfigMismatchError(
                        f'{key}.num_classes = {num} but {where} has {len(classes)} classes '
                        f'({names}). Set num_classes={len(classes)} in every head, or give the '
                        f'dataset the intended classes through {where}.metainfo.')


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------
def _join(root: Optional[str], path: str) -> str:
    if root and not osp.isabs(path):
        return osp.join(root, path)
    return path


def _dataset_paths(ds: dict) -> Iterator[tuple[str, str, str]]:
    """``(config key suffix, path, kind)`` of every local path a dataset config reads."""
    root = ds.get('data_root')
    if root:
        yield 'data_root', root, 'dir'
    if ds.get('ann_file'):
        yield 'ann_file', _join(root, ds['ann_file']), 'file'
    for name, prefix in (ds.get('data_prefix') or {}).items():
        if prefix:
            yield f'data_prefix.{name}', _join(root, prefix), 'dir'


def _evaluator_paths(cfg: Config, split: str) -> Iterator[tuple[str, str]]:
    key = f'{split}_evaluator'
    evaluator = cfg.get(key)
    for i, metric in enumerate(_as_list(evaluator) if evaluator else []):
        if isinstance(metric, dict) and metric.get('ann_file'):
            where = key + (f'.{i}' if isinstance(evaluator, (list, tuple)) else '')
            yield f'{where}.ann_file', metric['ann_file']


def ensure_demo_data_for(cfg: Config, splits: Sequence[str] = ('train', 'val', 'test')) -> None:
    """Generate the built-in demo set when a dataloader points at its default, missing root."""
    from ..datasets.demo_data import demo_root_of, ensure_demo_data
    done = set()
    for split in splits:
        for _, ds in _dataset_cfgs(cfg.get(f'{split}_dataloader'), f'{split}_dataloader'):
            root = ds.get('data_root')
            task = demo_root_of(root) if root else None
            if task and task not in done:
                ensure_demo_data(task, root)
                done.add(task)


def check_data_paths(cfg: Config, splits: Sequence[str] = ('train', 'val')) -> None:
    """Check that every data root, annotation file and image folder the run reads exists.

    Raises:
        DataNotFoundError: naming the first missing path, the config keys that hold it and how
        to provide it.
    """
    missing: list[tuple[str, str, str, str]] = []  # key, path, kind, dataset type
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        for where, ds in _dataset_cfgs(loader, f'{split}_dataloader'):
            if ds.get('backend_args'):
                continue
            for suffix, path, kind in _dataset_paths(ds):
                exists = osp.isdir(path) if kind == 'dir' else osp.isfile(path)
                if not _is_remote(path) and not exists:
                    missing.append((f'{where}.{suffix}', path, kind, str(ds.get('type', ''))))
                    break  # one message per dataset: its root first
        if split != 'train':
            for key, path in _evaluator_paths(cfg, split):
                if not _is_remote(path) and not osp.isfile(path):
                    missing.append((key, path, 'file', ''))
    if not missing:
        return
    key, path, kind, ds_type = missing[0]
    same = [k for k, p, _, _ in missing if p == path]
    thing = 'folder' if kind == 'dir' else 'file'
    hint = DATASET_HINTS.get(ds_type.split('.')[-1], '')
    lines = [f'{thing} {path!r} (set by {", ".join(same)}) does not exist '
             f'(resolved from {osp.abspath(".")!r}: {osp.abspath(path)!r}).']
    if hint:
        lines.append(f'Download {hint} and place it there,')
    lines.append('or point the config at your copy: --cfg-options '
                 + ' '.join(f'{k}=...' for k in _root_keys(cfg)) + ';')
    lines.append(DEMO_HINT + '.')
    others = sorted({p for _, p, _, _ in missing if p != path})
    if others:
        lines.append(f'Also missing: {", ".join(others)}.')
    raise DataNotFoundError(' '.join(lines))


def _root_keys(cfg: Config) -> list[str]:
    """Config keys that locate the data: dataset roots and evaluator annotation files."""
    keys = []
    for split in ('train', 'val', 'test'):
        for where, ds in _dataset_cfgs(cfg.get(f'{split}_dataloader'), f'{split}_dataloader'):
            if 'data_root' in ds:
                keys.append(f'{where}.data_root')
        if split != 'train':
            keys += [key for key, _ in _evaluator_paths(cfg, split)]
    return keys


def check_checkpoint_path(path: str, what: str, fix: str = '') -> None:
    """Raise :class:`CheckpointNotFoundError` if the local file ``path`` does not exist."""
    if path and not _is_remote(path) and not osp.isfile(osp.expanduser(path)):
        raise CheckpointNotFoundError(f'{what} {path!r} does not exist'
                                      f' (resolved: {osp.abspath(osp.expanduser(path))!r}).'
                                      + (f' {fix}' if fix else ''))


def pretrained_checkpoint(cfg: Config) -> Optional[str]:
    """The checkpoint of ``model.backbone.init_cfg`` when it is of type ``Pretrained``."""
    init_cfg = (cfg.get('model') or {}).get('backbone', {}).get('init_cfg')
    if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
        return init_cfg.get('checkpoint')
    return None


def check_pretrained(cfg: Config, resuming: bool = False) -> None:
    """Check the backbone's ``init_cfg`` checkpoint (and ``load_from``) exist.

    When ``resuming`` a missing ImageNet file is not needed (the resumed weights replace it), so
    ``init_cfg`` is dropped with a note instead of failing.
    """
    path = pretrained_checkpoint(cfg)
    if path and not _is_remote(path) and not osp.isfile(osp.expanduser(path)):
        if resuming:
            print_log(f'backbone weights {path!r} not found; not needed when resuming, '
                      'init_cfg dropped', logger='current')
            cfg.model.backbone.init_cfg = None
        else:
            check_checkpoint_path(
                path, 'backbone pretrained weights (model.backbone.init_cfg.checkpoint)',
                f"Download the authors' ImageNet-1K checkpoint {osp.basename(path)!r} to that "
                'path, or pass --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file '
                '(or model.backbone.init_cfg=None to train from scratch).')
    if cfg.get('load_from') and not resuming:
        check_checkpoint_path(cfg.load_from, 'load_from checkpoint',
                              'Fix the path or pass --cfg-options load_from=None.')


def prepare_config(cfg: Config, mode: str) -> Config:
    """Run every check for a ``'train'`` or ``'test'`` run (generating demo data if needed)."""
    if mode not in SPLITS:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    library_of(cfg)
    check_model_config(cfg)
    ensure_demo_data_for(cfg, SPLITS[mode])
    check_data_paths(cfg, SPLITS[mode])
    if mode == 'train':
        check_pretrained(cfg, resuming=bool(cfg.get('resume')))
    return cfg


__all__ = ['check_checkpoint_path', 'check_data_paths',
           'check_model_config', 'check_pretrained', 'ensure_demo_data_for', 'library_of',
           'load_config', 'overlock_out_channels', 'prepare_config', 'pretrained_checkpoint']
