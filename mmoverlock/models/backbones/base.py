"""What the dense-prediction backbones of mmoverlock share: output selection, freezing, BN eval
mode, checkpointing counts, ``init_cfg`` handling (mmengine's semantics) and the deprecated
``pretrained`` argument (as mmseg's own backbones treat it)."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Sequence, Union

from mmengine.logging import print_log
from mmengine.model import BaseModule, initialize
from mmengine.model.weight_init import PretrainedInit
from mmengine.registry import WEIGHT_INITIALIZERS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Schemes of mmengine's model-zoo names (OpenMMLab's, torchvision's and mmpretrain's zoos). None
#: of these zoos holds an OverLoCK or GLNet: such a name is another network's checkpoint, e.g. the
#: ``open-mmlab://resnet50_v1c`` that stock mmseg base configs set as ``model.pretrained``.
MODEL_ZOO_SCHEMES = ('open-mmlab://', 'openmmlab://', 'torchvision://', 'modelzoo://', 'mmcls://')
#: Keys a ``Pretrained`` init_cfg may have (``map_location`` changes nothing: the weights are
#: copied into the parameters wherever those live).
PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'map_location')

InitCfg = Union[dict, list, None]


def is_pretrained(cfg: dict) -> bool:
    """Whether an init_cfg entry is mmengine's ``Pretrained``."""
    return cfg.get('type') in ('Pretrained', PretrainedInit)


def _check_initializer(cfg: dict, what: str) -> None:
    """Raise a clear error if ``cfg`` (without ``override``) is no valid mmengine initialiser."""
    kind = cfg.get('type')
    if isinstance(kind, str):
        if WEIGHT_INITIALIZERS.get(kind) is None:
            raise ValueError(f'{what}: unknown initialiser type {kind!r}; mmengine registers '
                             f'{sorted(WEIGHT_INITIALIZERS.module_dict)}')
    elif not callable(kind):
        raise ValueError(f"{what}: 'type' must name an mmengine initialiser, got {kind!r}")
    try:
        WEIGHT_INITIALIZERS.build({k: v for k, v in cfg.items() if k != 'override'})
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f'{what}: invalid {kind!r} initialiser {dict(cfg)}: {err}') from err


def _check_layers(cfg: dict, module: nn.Module, what: str) -> None:
    """Raise if an initialiser would change nothing: no ``layer`` and no ``override``, or a
    ``layer`` name that no submodule has (mmengine matches a module's class name and the names of
    its direct base classes)."""
    layers = cfg.get('layer')
    if not layers:
        if cfg.get('override') is None:
            raise ValueError(f'{what}: {dict(cfg)} initialises nothing; give layer=... (class '
                             'names such as Conv2d) and/or override=dict(name=...)')
        return
    present = set()
    for m in module.modules():
        present.add(type(m).__name__)
        present.update(b.__name__ for b in type(m).__bases__)
    missing = [n for n in ([layers] if isinstance(layers, str) else layers) if n not in present]
    if missing:
        raise ValueError(f'{what}: layer {missing} matches no module of '
                         f'{type(module).__name__}; its module classes are '
                         f'{sorted({type(m).__name__ for m in module.modules()})}')


def split_init_cfg(init_cfg: InitCfg, module: nn.Module) -> tuple[list[dict], list[dict]]:
    """Validate ``init_cfg`` (None, a dict or a list of dicts, as mmengine accepts it) and split it
    into mmengine initialisers and ``Pretrained`` entries.

    Args:
        init_cfg: The module's ``init_cfg``.
        module: The module it initialises (``override`` names must be its attributes).

    Returns:
        The non-``Pretrained`` entries (for :func:`mmengine.model.initialize`) and the
        ``Pretrained`` ones, each in their given order.
    """
    if init_cfg is None:
        return [], []
    name = type(module).__name__
    entries = [init_cfg] if isinstance(init_cfg, dict) else init_cfg
    if not isinstance(entries, (list, tuple)) or not all(isinstance(c, dict) for c in entries):
        raise TypeError(f'{name}: init_cfg must be a dict or a list of dicts, got {init_cfg!r}')
    others, pretrained = [], []
    for i, cfg in enumerate(entries):
        what = f'{name} init_cfg' + (f'[{i}]' if len(entries) > 1 else '')
        if 'type' not in cfg:
            raise ValueError(f"{what}: every entry needs a 'type', got {dict(cfg)}")
        if is_pretrained(cfg):
            unknown = sorted(set(cfg) - set(PRETRAINED_KEYS))
            if unknown:
                raise ValueError(f'{what}: unknown keys {unknown} for Pretrained; it takes '
                                 f'{list(PRETRAINED_KEYS)}')
            if not isinstance(cfg.get('checkpoint'), str):
                raise ValueError(f"{what}: Pretrained needs 'checkpoint' (a path or URL), got "
                                 f'{dict(cfg)}')
            pretrained.append(cfg)
            continue
        _check_initializer(cfg, what)
        _check_layers(cfg, module, what)
        override = cfg.get('override')
        if override is not None:
            overrides = [override] if isinstance(override, dict) else override
            if not isinstance(overrides, (list, tuple)) or not all(
                    isinstance(o, dict) for o in overrides):
                raise TypeError(f'{what}: override must be a dict or a list of dicts, '
                                f'got {override!r}')
            for entry in overrides:
                target = entry.get('name')
                if target is None or not isinstance(getattr(module, target, None), nn.Module):
                    raise ValueError(f"{what}: override {dict(entry)} must have a 'name' that "
                                     f'is a submodule of {name}')
                rest = {k: v for k, v in entry.items() if k != 'name'}
                if rest:
                    if 'type' not in rest:
                        raise ValueError(f"{what}: override {dict(entry)} needs a 'type' (or "
                                         "only 'name', to reuse the entry's initialiser)")
                    _check_initializer(rest, f'{what} override {target!r}')
        others.append(cfg)
    return others, pretrained


class DenseBackbone(BaseModule):
    """Base of :class:`OverLoCK` and :class:`GLNet`.

    Subclasses set ``out_indices``, ``frozen_stages`` and ``norm_eval`` and implement
    ``_stage_modules(stage)`` (the modules that compute output ``stage``), ``_init_fresh()`` (the
    authors' initialisation) and ``load_pretrained(checkpoint, prefix)``.
    """

    num_outputs = 4

    @classmethod
    def check_out_indices(cls, out_indices: Union[int, Sequence[int]]) -> tuple[int, ...]:
        """Normalise ``out_indices`` (negative indices allowed) and reject invalid ones."""
        n = cls.num_outputs
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        out = tuple(i % n if -n <= i < 0 else i for i in out_indices)
        if not out or any(i not in range(n) for i in out):
            raise ValueError(f'out_indices must be a non-empty subset of 0..{n - 1}, '
                             f'got {out_indices}')
        return out

    @staticmethod
    def checkpoint_counts(with_cp: Union[bool, Sequence[int]], depths: Sequence[int],
                          names: Sequence[str]) -> list[int]:
        """Per block list, how many leading blocks use gradient checkpointing."""
        if isinstance(with_cp, bool):
            return list(depths) if with_cp else [0] * len(depths)
        counts = list(with_cp)
        if len(counts) != len(depths) or any(not 0 <= n <= d for n, d in zip(counts, depths)):
            raise ValueError(f'with_cp must be a bool or {len(depths)} block counts (for '
                             f'{", ".join(names)}) each within {list(depths)}, got {with_cp}')
        return counts

    def _stage_modules(self, stage: int) -> list[nn.Module]:
        raise NotImplementedError

    def _init_fresh(self) -> None:
        raise NotImplementedError

    def load_pretrained(self, checkpoint: str, prefix: Any = None) -> Any:
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        for stage in range(max(self.frozen_stages, 0)):
            for module in self._stage_modules(stage):
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> DenseBackbone:
        """Set the training mode, keeping frozen stages (and BNs under ``norm_eval``) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    @staticmethod
    def merge_pretrained_arg(pretrained: Optional[str], init_cfg: InitCfg,
                             name: str) -> InitCfg:
        """The ``init_cfg`` to use given the deprecated ``pretrained`` argument.

        mmseg's ``EncoderDecoder`` passes ``model.pretrained`` to the backbone (stock mmseg bases
        set ``'open-mmlab://resnet50_v1c'``). As mmseg's own backbones do, a checkpoint path
        becomes ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` with a deprecation
        warning, and giving both is an error. A model-zoo name (``open-mmlab://``,
        ``torchvision://``, ...: another network's checkpoint, none of these zoos holds this
        backbone) is ignored with a warning.

        Args:
            pretrained: The ``pretrained`` argument (None: not given).
            init_cfg: The ``init_cfg`` argument.
            name: The backbone's class name, for the messages.
        """
        if pretrained is None:
            return init_cfg
        if not isinstance(pretrained, str):
            raise TypeError(f'{name}: pretrained must be a checkpoint path or None, got '
                            f'{pretrained!r}; prefer init_cfg=dict(type="Pretrained", '
                            'checkpoint=...)')
        if pretrained.startswith(MODEL_ZOO_SCHEMES):
            warnings.warn(
                f'{name}: ignoring pretrained={pretrained!r} (probably model.pretrained of a '
                f'stock mmseg base config): it names a model-zoo checkpoint of another network. '
                f'Load {name} weights with the backbone\'s init_cfg=dict(type="Pretrained", '
                'checkpoint=...) and set model.pretrained=None to silence this warning.',
                UserWarning, stacklevel=3)
            return init_cfg
        if init_cfg is not None:
            raise ValueError(f'{name}: both pretrained={pretrained!r} and init_cfg={init_cfg!r} '
                             'are set; keep only init_cfg (and set model.pretrained=None in an '
                             'mmseg config)')
        warnings.warn(f'{name}: pretrained is deprecated; loading {pretrained!r} as '
                      'init_cfg=dict(type="Pretrained", checkpoint=...). Set the backbone\'s '
                      'init_cfg instead (and model.pretrained=None in an mmseg config).',
                      FutureWarning, stacklevel=3)
        return dict(type='Pretrained', checkpoint=pretrained)

    def init_weights(self) -> None:
        """Initialise the weights: the authors' initialisation, then ``init_cfg``.

        ``init_cfg`` has mmengine's semantics: None, a dict or a list of dicts, each any
        initialiser mmengine registers (``Kaiming``, ``Xavier``, ``Normal``, ``TruncNormal``,
        ``Constant``, ``Uniform``, ..., with ``layer`` and ``override``) or ``Pretrained``
        (``checkpoint``, ``prefix``). Order: the authors' fresh initialisation of every
        parameter; then the initialisers, in the given order, through
        :func:`mmengine.model.initialize`; last the ``Pretrained`` checkpoints, through
        :meth:`load_pretrained` (which checks arch and form and reports the keys). Parameters a
        checkpoint lacks therefore keep the initialisation before it. Invalid entries (unknown
        type or key) raise before any weight changes. As in mmengine, a second call only warns.
        """
        if self._is_init:
            print_log(f'init_weights of {type(self).__name__} has been called more than once; '
                      'the weights are left unchanged.', logger='current', level=logging.WARNING)
            return
        others, pretrained = split_init_cfg(self.init_cfg, self)
        self._init_fresh()
        if others:
            initialize(self, others)
        for cfg in pretrained:
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
        self._is_init = True
