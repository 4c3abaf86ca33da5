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
import logging
import os.path as osp
from typing import Iterator, Optional, Sequence

from mmengine.config import Config
from mmengine.logging import print_log

from .errors import (
    CheckpointNotFoundError,
    ConfigMismatchError,
    ConfigNotFoundError,
    DataNotFoundError,
    MissingFilesError,
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
#: Where to get the authors' ImageNet-1K checkpoints, by backbone type.
CHECKPOINT_HINTS = {
    'OverLoCK': "the authors' release page https://github.com/LMMMEng/OverLoCK/releases",
    'GLNet': "the authors' release page https://github.com/LMMMEng/GLNet/releases",
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
#: Necks whose ``in_channels`` lists the width of every input map, in input order (mmdet / mmseg).
LIST_INPUT_NECKS = frozenset({'FPN', 'PAFPN', 'NASFPN', 'RFP', 'ChannelMapper', 'HRFPN',
                              'MultiLevelNeck'})
#: Necks that return ``num_outs`` maps of ``out_channels`` each, with the default of ``num_outs``
#: (``'inputs'``: one map per input; None: the config must give it).
UNIFORM_OUTPUT_NECKS = {'FPN': None, 'PAFPN': None, 'NASFPN': None, 'RFP': None,
                        'ChannelMapper': 'inputs', 'HRFPN': 5}
#: Model keys of the heads that read the backbone's (or the last neck's) maps, by library.
FEATURE_HEADS = {'mmdet': ('rpn_head', 'bbox_head', 'panoptic_head'),
                 'mmseg': ('decode_head', 'auxiliary_head')}
#: ``in_index`` of a head that reads every map it is given (no ``in_index`` argument at all).
ALL_MAPS = 'all'


def _type_name(type_: object) -> str:
    """``'FPN'`` for ``'FPN'``, ``'mmdet.FPN'`` or the class ``FPN``."""
    return type_.__name__ if isinstance(type_, type) else str(type_).split('.')[-1]


def overlock_out_channels(backbone: dict) -> Optional[list[int]]:
    """Widths of the maps an ``OverLoCK`` backbone config returns (None for other backbones)."""
    if _type_name(backbone.get('type', '')) != 'OverLoCK':
        return None
    from ..models.backbones.overlock import OverLoCK
    params = inspect.signature(OverLoCK.__init__).parameters
    arch = backbone.get('arch', params['arch'].default)
    try:
        dims = OverLoCK.resolve_arch(arch)['embed_dim']
    except (TypeError, ValueError) as err:
        raise ConfigMismatchError(f'model.backbone.arch: {err}') from None
    ctx = dims[3] // 4
    return _select_outputs([dims[0], dims[1], dims[2] + ctx, dims[3] + ctx],
                           backbone.get('out_indices', params['out_indices'].default), 'OverLoCK')


def backbone_out_channels(backbone: dict) -> Optional[list[int]]:
    """Widths of the maps an ``OverLoCK`` or ``GLNet`` backbone config returns, in order.

    Args:
        backbone: the ``model.backbone`` config.

    Returns:
        One width per returned map, or None for a backbone of another type.

    Raises:
        ConfigMismatchError: an unknown arch or ``out_indices`` outside 0..3.
    """
    kind = _type_name(backbone.get('type', ''))
    if kind == 'OverLoCK':
        return overlock_out_channels(backbone)
    if kind != 'GLNet':
        return None
    from ..models.backbones.glnet import GLNet
    params = inspect.signature(GLNet.__init__).parameters
    try:
        dims = GLNet.resolve_arch(backbone.get('arch', params['arch'].default))['embed_dim']
    except (TypeError, ValueError) as err:
        raise ConfigMismatchError(f'model.backbone.arch: {err}') from None
    return _select_outputs(list(dims), backbone.get('out_indices', params['out_indices'].default),
                           'GLNet')


def _select_outputs(widths: list[int], out_indices: object, kind: str) -> list[int]:
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    try:
        return [widths[i] for i in out_indices]
    except (IndexError, TypeError):
        raise ConfigMismatchError(f'model.backbone.out_indices must index the four {kind} '
                                  f'outputs (0..3), got {out_indices}') from None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain(value: object) -> object:
    """Tuples (and nested ones) as lists, for comparing and printing config values."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class _Source:
    """The maps a neck or head is given: their widths and how to name their producer."""

    def __init__(self, widths: list[int], name: str, fix_tail: str = '') -> None:
        self.widths, self.name, self.fix_tail = widths, name, fix_tail


class _Report:
    """What :func:`check_model_config` found: errors (certain) and notes (unsure)."""

    def __init__(self) -> None:
        self.unsure: list[str] = []

    def mismatch(self, key: str, value: object, expected: object, source: _Source,
                 reads: str, certain: bool) -> None:
        text = (f'{key} = {value} does not match {source.name}: {reads} {expected} channels. '
                f'Set {key}={expected} (e.g. --cfg-options "{key}={expected}"){source.fix_tail}.')
        if certain:
            raise ConfigMismatchError(text)
        self.unsure.append(f'{key} = {value} may not match {source.name} ({reads} {expected} '
                           'channels if the type reads them as its kind usually does)')


def _model_class(library: str, type_: object) -> Optional[type]:
    """The class a model config's ``type`` names in ``library``'s registry (None if unknown)."""
    if isinstance(type_, type):
        return type_
    if library == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    try:
        return MODELS.get(type_)
    except Exception:  # noqa: BLE001 - an unknown scope or a failing import: not checkable
        return None


def _default_in_index(cls: type) -> object:
    """``in_index``'s default in the first ``__init__`` of ``cls``'s MRO that has one, else
    :data:`ALL_MAPS` (the head reads every map, e.g. mmdet's anchor heads, Mask2Former)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        try:
            param = inspect.signature(init).parameters.get('in_index')
        except (TypeError, ValueError):
            continue
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return ALL_MAPS


def _neck_outputs(neck: dict) -> Optional[list[int]]:
    """Widths of the maps a neck returns, where the config says them for certain."""
    kind = _type_name(neck.get('type', ''))
    out = neck.get('out_channels')
    if kind not in UNIFORM_OUTPUT_NECKS or not isinstance(out, int):
        return None
    num = neck.get('num_outs', UNIFORM_OUTPUT_NECKS[kind])
    if num == 'inputs':
        num = len(_as_list(neck.get('in_channels')))
    return [out] * num if isinstance(num, int) else None


def _check_neck(key: str, neck: dict, source: _Source, report: _Report) -> None:
    if 'in_channels' not in neck:
        return
    value = _plain(neck['in_channels'])
    if isinstance(value, list):
        expected: object = source.widths
    elif len(set(source.widths)) == 1:
        expected = source.widths[0]
    else:
        report.unsure.append(f'{key}.in_channels = {value}: which of the maps {source.widths} '
                             f'of {source.name} it reads is not known to the check')
        return
    if value != expected:
        certain = _type_name(neck.get('type', '')) in LIST_INPUT_NECKS
        report.mismatch(f'{key}.in_channels', value, expected, source, 'its maps have', certain)


def _check_head(library: str, key: str, head: dict, source: Optional[_Source],
                unknown_source: str, report: _Report) -> None:
    """Check ``head.in_channels`` against the maps it selects from ``source``."""
    if not isinstance(head, dict) or 'in_channels' not in head:
        return
    value = _plain(head['in_channels'])
    if source is None:
        report.unsure.append(f'{key}.in_channels = {value}: the widths {unknown_source} returns '
                             'are not known to the check')
        return
    cls = _model_class(library, head.get('type'))
    certain = cls is not None
    in_index = _plain(head['in_index']) if 'in_index' in head else (
        _default_in_index(cls) if cls is not None else ALL_MAPS)
    widths = source.widths
    if in_index == ALL_MAPS:
        reads = 'its maps have'
        if isinstance(value, list):
            expected: object = widths
        elif len(set(widths)) == 1:
            expected = widths[0]
        else:  # one width for maps of several widths: not one of the conventions checked here
            report.unsure.append(f'{key}.in_channels = {value} for the maps {widths} of '
                                 f'{source.name}')
            return
    else:
        reads = f'the maps selected by {key}.in_index={in_index} have'
        indices = in_index if isinstance(in_index, list) else [in_index]
        bad = [i for i in indices if not isinstance(i, int) or not -len(widths) <= i < len(widths)]
        if bad:
            text = (f'{key}.in_index={in_index} but {source.name} returns only {len(widths)} '
                    f'maps (widths {widths}); use indices below {len(widths)}')
            if certain:
                raise ConfigMismatchError(text)
            report.unsure.append(text)
            return
        expected = [widths[i] for i in indices] if isinstance(in_index, list) else widths[in_index]
        if isinstance(expected, list) != isinstance(value, list):
            report.unsure.append(f'{key}.in_channels = {value} with in_index={in_index} (one is '
                                 'a list, the other is not)')
            return
    if value != expected:
        report.mismatch(f'{key}.in_channels', value, expected, source, reads, certain)


def _backbone_source(backbone: dict, widths: list[int]) -> _Source:
    kind = _type_name(backbone.get('type'))
    arch = backbone.get('arch', '4g' if kind == 'GLNet' else 't')
    arch = f'{arch!r}' if isinstance(arch, str) else 'custom'
    indices = backbone.get('out_indices', (0, 1, 2, 3))
    return _Source(widths, f'the {kind} backbone (arch={arch}, out_indices={indices})',
                   ', or use the config of that arch')


def check_model_config(cfg: Config) -> None:
    """Check that necks and heads fit an OverLoCK / GLNet backbone and the data set's classes.

    The widths are followed from the backbone through the necks to the heads: the first neck's
    ``in_channels`` must list the backbone's widths; a head after a neck is checked against the
    neck's outputs where the neck's type says them for certain (FPN, ChannelMapper, ...); a head
    reads the maps its ``in_index`` selects (``input_transform`` 'resize_concat' /
    'multiple_select' take a list), or all of them when the head has no ``in_index`` (mmdet's
    dense heads, Mask2Former). What the check cannot know for sure (an unknown neck or head type)
    is logged as a warning and the run goes on.

    Args:
        cfg: a loaded mmdet / mmseg config.

    Raises:
        ConfigMismatchError: with the key to change and the value it needs.
    """
    model = cfg.get('model')
    if not model or 'backbone' not in model:
        return
    widths = backbone_out_channels(model.backbone)
    if widths is not None:
        library = library_of(cfg)
        report = _Report()
        source: Optional[_Source] = _backbone_source(model.backbone, widths)
        unknown = 'the backbone'
        neck = model.get('neck')
        necks = _as_list(neck) if neck else []
        for i, part in enumerate(necks):
            key = 'model.neck' + (f'.{i}' if isinstance(neck, (list, tuple)) else '')
            if not isinstance(part, dict):
                source, unknown = None, key
                continue
            if source is not None:
                _check_neck(key, part, source, report)
            outs = _neck_outputs(part)
            kind = _type_name(part.get('type', ''))
            source = None if outs is None else _Source(
                outs, f'{key} ({kind}, out_channels={part.get("out_channels")}, '
                      f'{len(outs)} maps)')
            unknown = f'{key} ({kind})'
        for name in FEATURE_HEADS[library]:
            head = model.get(name)
            for i, part in enumerate(_as_list(head) if head else []):
                key = f'model.{name}' + (f'.{i}' if isinstance(head, (list, tuple)) else '')
                _check_head(library, key, part, source, unknown, report)
        if report.unsure:
            print_log('model check: not verified, the run goes on (--skip-checks skips the '
                      'checks): ' + '; '.join(report.unsure), logger='current',
                      level=logging.WARNING)
    _check_class_counts(cfg)


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
    """The classes the detection / segmentation heads predict for dataset config ``ds``: its
    classes, or for a panoptic set (``thing_classes`` and ``stuff_classes``) its thing classes."""
    meta = ds.get('metainfo') or {}
    for key in ('thing_classes', 'classes'):
        if meta.get(key):
            return tuple(meta[key])
    if library_of(cfg) == 'mmdet':
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    try:
        cls = DATASETS.get(ds.get('type'))
    except KeyError:  # unknown scope prefix: leave it to the build
        return None
    meta = getattr(cls, 'METAINFO', {}) if cls is not None else {}
    classes = meta.get('thing_classes') or meta.get('classes')
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


def _check_class_counts(cfg: Config) -> None:
    """Every head's ``num_classes`` equals the number of classes of every dataset."""
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


def _missing_data(cfg: Config, splits: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """``(config key, path, kind, dataset type)`` of every local data path that does not exist.

    Under a missing ``data_root`` only the root is listed (the rest of that dataset is then
    missing too); under an existing one every missing annotation file and folder.
    """
    missing = []
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        split_type = ''
        for where, ds in _dataset_cfgs(loader, f'{split}_dataloader'):
            ds_type = _type_name(ds.get('type', ''))
            split_type = split_type or ds_type
            if ds.get('backend_args'):
                continue
            for suffix, path, kind in _dataset_paths(ds):
                exists = osp.isdir(path) if kind == 'dir' else osp.isfile(path)
                if not _is_remote(path) and not exists:
                    missing.append((f'{where}.{suffix}', path, kind, ds_type))
                    if suffix == 'data_root':
                        break
        if split != 'train':
            for key, path in _evaluator_paths(cfg, split):
                if not _is_remote(path) and not osp.isfile(path):
                    missing.append((key, path, 'file', split_type))
    return missing


def _describe_missing_data(cfg: Config, missing: list[tuple[str, str, str, str]]) -> str:
    """One sentence per missing path (with the keys that set it), then where to get the data."""
    paths = list(dict.fromkeys(path for _, path, _, _ in missing))
    items = []
    for path in paths:
        keys = [k for k, p, _, _ in missing if p == path]
        kind = next(kind for _, p, kind, _ in missing if p == path)
        items.append(f'{"folder" if kind == "dir" else "file"} {path!r} (set by '
                     f'{", ".join(keys)})')
    hints = [DATASET_HINTS[t] for t in dict.fromkeys(t for *_, t in missing)
             if t in DATASET_HINTS]
    text = f'data {"; ".join(items)} {"does" if len(items) == 1 else "do"} not exist. '
    if hints:
        text += f'Download {" and ".join(hints)} and place it there, or '
    else:
        text += 'Put the data there, or '
    return (text + 'point the config at your copy: --cfg-options '
            + ' '.join(f'{k}=...' for k in _root_keys(cfg)) + f'; {DEMO_HINT}.')


def _missing_file(path: Optional[str]) -> bool:
    return bool(path) and not _is_remote(path) and not osp.isfile(osp.expanduser(path))


def _pretrained_problem(cfg: Config) -> Optional[str]:
    """The sentence reporting a missing ``model.backbone.init_cfg`` checkpoint (None if fine)."""
    path = pretrained_checkpoint(cfg)
    if not _missing_file(path):
        return None
    kind = _type_name(cfg.model.backbone.get('type', ''))
    name = osp.basename(path)
    where = (f"download {name!r} from {CHECKPOINT_HINTS[kind]}" if kind in CHECKPOINT_HINTS
             else f'put {name!r}')
    return (f'backbone pretrained weights {path!r} (model.backbone.init_cfg.checkpoint) do not '
            f'exist: {where} to that path, or pass --cfg-options '
            'model.backbone.init_cfg.checkpoint=/path/to/file (or model.backbone.init_cfg=None '
            'to train from scratch).')


def _argument_problems(checkpoint: Optional[str]) -> list[str]:
    if not _missing_file(checkpoint):
        return []
    return [f'checkpoint {checkpoint!r} (the CHECKPOINT argument) does not exist: give a file '
            'written by tools/train.py or a released checkpoint.']


def _missing_checkpoints(cfg: Config, mode: str, checkpoint: Optional[str]) -> list[str]:
    """Sentences reporting the missing checkpoints of a ``mode`` run."""
    problems = _argument_problems(checkpoint)
    resuming = bool(cfg.get('resume'))
    if mode == 'train' and not resuming:
        problem = _pretrained_problem(cfg)
        problems += [problem] if problem else []
        if _missing_file(cfg.get('load_from')):
            problems.append(f'load_from checkpoint {cfg.load_from!r} does not exist: fix the '
                            'path or pass --cfg-options load_from=None.')
    return problems


def _raise_missing(data: str, checkpoints: list[str]) -> None:
    problems = ([data] if data else []) + checkpoints
    if not problems:
        return
    where = f'(relative paths are resolved from {osp.abspath(".")!r})'
    if len(problems) == 1:
        text = f'{problems[0]} {where}'
    else:
        text = (f'{len(problems)} things this run needs are missing {where}: '
                + ' '.join(f'({i}) {p}' for i, p in enumerate(problems, 1)))
    if data and checkpoints:
        raise MissingFilesError(text)
    raise (DataNotFoundError if data else CheckpointNotFoundError)(text)


def check_data_paths(cfg: Config, splits: Sequence[str] = ('train', 'val')) -> None:
    """Check that every data root, annotation file and image folder the run reads exists.

    Args:
        cfg: the run's config.
        splits: the dataloaders to check (``'train'``, ``'val'``, ``'test'``).

    Raises:
        DataNotFoundError: naming every missing path, the config keys that hold it and where to
        get the data.
    """
    missing = _missing_data(cfg, splits)
    _raise_missing(_describe_missing_data(cfg, missing) if missing else '', [])


def check_files(cfg: Config, mode: str, checkpoint: Optional[str] = None) -> None:
    """Check every data path and checkpoint a ``'train'`` / ``'test'`` run reads, all at once.

    Args:
        cfg: the run's config.
        mode: ``'train'`` (train and val data, the backbone's ``init_cfg`` checkpoint and
            ``load_from`` unless resuming) or ``'test'`` (test data).
        checkpoint: a checkpoint given on the command line (tools/test.py), checked as well.

    Raises:
        MissingFilesError: data and checkpoints missing, all named in one message, each with
            where to get it (a :class:`DataNotFoundError` and a
            :class:`CheckpointNotFoundError`).
        DataNotFoundError: only data missing.
        CheckpointNotFoundError: only checkpoints missing.
    """
    missing = _missing_data(cfg, SPLITS[mode])
    _raise_missing(_describe_missing_data(cfg, missing) if missing else '',
                   _missing_checkpoints(cfg, mode, checkpoint))


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
    if _missing_file(path):
        raise CheckpointNotFoundError(f'{what} {path!r} does not exist'
                                      f' (resolved: {osp.abspath(osp.expanduser(path))!r}).'
                                      + (f' {fix}' if fix else ''))


def pretrained_checkpoint(cfg: Config) -> Optional[str]:
    """The checkpoint of ``model.backbone.init_cfg`` when it is of type ``Pretrained``."""
    init_cfg = (cfg.get('model') or {}).get('backbone', {}).get('init_cfg')
    if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
        return init_cfg.get('checkpoint')
    return None


def _drop_missing_pretrained(cfg: Config) -> None:
    """When resuming, a missing ImageNet file is not needed (the resumed weights replace it)."""
    path = pretrained_checkpoint(cfg)
    if _missing_file(path):
        print_log(f'backbone weights {path!r} not found; not needed when resuming, '
                  'init_cfg dropped', logger='current')
        cfg.model.backbone.init_cfg = None


def check_pretrained(cfg: Config, resuming: bool = False) -> None:
    """Check the backbone's ``init_cfg`` checkpoint (and ``load_from``) exist.

    Args:
        cfg: the run's config.
        resuming: a missing ``init_cfg`` file is then not needed (the resumed weights replace
            it): ``init_cfg`` is dropped with a note instead of failing.

    Raises:
        CheckpointNotFoundError: naming every missing file and where to get it.
    """
    if resuming:
        _drop_missing_pretrained(cfg)
        return
    problems = [p for p in [_pretrained_problem(cfg)] if p]
    if _missing_file(cfg.get('load_from')):
        problems.append(f'load_from checkpoint {cfg.load_from!r} does not exist: fix the path '
                        'or pass --cfg-options load_from=None.')
    _raise_missing('', problems)


def prepare_config(cfg: Config, mode: str, checkpoint: Optional[str] = None,
                   skip_checks: bool = False) -> Config:
    """Check (and complete) the config of a ``'train'`` or ``'test'`` run.

    Generates the built-in demo data where the config points at it, drops a missing ``init_cfg``
    checkpoint when resuming, then checks the model (:func:`check_model_config`) and every file
    the run reads (:func:`check_files`, all missing files in one error).

    Args:
        cfg: the run's config.
        mode: ``'train'`` or ``'test'``.
        checkpoint: a checkpoint named on the command line, checked with the other files.
        skip_checks: skip the checks of the config itself (model widths and classes, the data
            and checkpoint paths it names; ``--skip-checks``); ``checkpoint`` is still checked.

    Raises:
        UsageError: what is wrong and how to fix it.
    """
    if mode not in SPLITS:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    library_of(cfg)
    if not skip_checks:
        check_model_config(cfg)
    ensure_demo_data_for(cfg, SPLITS[mode])
    if mode == 'train' and cfg.get('resume'):
        _drop_missing_pretrained(cfg)
    if skip_checks:
        _raise_missing('', _argument_problems(checkpoint))
    else:
        check_files(cfg, mode, checkpoint)
    return cfg


__all__ = ['backbone_out_channels', 'check_checkpoint_path', 'check_data_paths', 'check_files',
           'check_model_config', 'check_pretrained', 'ensure_demo_data_for', 'library_of',
           'load_config', 'overlock_out_channels', 'prepare_config', 'pretrained_checkpoint']
