"""Reading released checkpoints into backbones: state-dict extraction, prefixes, key reports."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import torch
from mmengine.logging import MMLogger
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

#: Keys under which released checkpoints keep their weights, tried in order.
STATE_DICT_KEYS = ('state_dict', 'model', 'model_ema', 'module')


def unwrap_state_dict(ckpt: object, state_keys: Sequence[str] = STATE_DICT_KEYS,
                      source: str = 'checkpoint') -> dict:
    """The weights of a loaded checkpoint: the entry under the first of ``state_keys`` that holds
    a dict, else ``ckpt`` itself. Which entry was taken is logged (MMLogger, INFO).

    Args:
        ckpt: The loaded checkpoint object.
        state_keys: Entries that may hold the weights, in order of preference.
        source: Name of the checkpoint, for the log and errors.

    Returns:
        The state dict (not copied).
    """
    state, entry = ckpt, None
    if isinstance(ckpt, dict):
        entry = next((k for k in state_keys if isinstance(ckpt.get(k), dict)), None)
        if entry is not None:
            state = ckpt[entry]
    if not isinstance(state, dict):
        raise ValueError(f'{source} does not hold a state dict (found {type(state).__name__})')
    where = f'entry {entry!r}' if entry is not None else 'the top level'
    MMLogger.get_current_instance().info(f'{source}: weights taken from {where} of the checkpoint')
    return state


def read_state_dict(checkpoint: str, prefix: Optional[str] = None,
                    state_keys: Sequence[str] = STATE_DICT_KEYS) -> OrderedDict[str, torch.Tensor]:
    """Load ``checkpoint`` (safely, see :mod:`mmoverlock.utils.safe_checkpoint`) and return the
    weights, unwrapped from the first of ``state_keys`` it has and restricted to ``prefix``.

    Args:
        checkpoint: Path or URL of the checkpoint.
        prefix: Keep only the keys under this prefix (e.g. ``'backbone.'``), stripped.
        state_keys: Checkpoint entries that may hold the weights, in order of preference (see
            :func:`unwrap_state_dict`).
    """
    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state = unwrap_state_dict(ckpt, state_keys, source=str(checkpoint))
    state = OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in state.items())
    if prefix:
        if not prefix.endswith('.'):
            prefix += '.'
        selected = OrderedDict(
            (k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
        if not selected:
            roots = sorted({k.split('.')[0] + '.' for k in state})[:10]
            raise ValueError(f'no key of {checkpoint!r} starts with prefix {prefix!r}; its keys '
                             f'start with {roots}. Set init_cfg.prefix accordingly (or None).')
        state = selected
    return state


def drop_keys(state: dict, prefixes: Iterable[str]) -> tuple[dict, list[str]]:
    """Remove keys starting with any of ``prefixes``; return the rest and the removed keys."""
    prefixes = tuple(prefixes)
    kept = OrderedDict((k, v) for k, v in state.items() if not k.startswith(prefixes))
    return kept, [k for k in state if k.startswith(prefixes)]


def summarize_keys(keys: Sequence[str], depth: int = 2) -> str:
    """Group keys by their first ``depth`` name parts, e.g. ``extra_norm.0.* (2)``."""
    groups: OrderedDict[str, int] = OrderedDict()
    for key in keys:
        parts = key.split('.')
        head = '.'.join(parts[:depth]) + ('.*' if len(parts) > depth else '')
        groups[head] = groups.get(head, 0) + 1
    return ', '.join(f'{k} ({n})' if n > 1 else k for k, n in groups.items())


def load_and_report(model: nn.Module, state: dict, source: str,
                    ignored: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``load_state_dict(strict=False)`` and log what was new, unexpected and ignored."""
    result = model.load_state_dict(state, strict=False)
    logger = MMLogger.get_current_instance()
    name = type(model).__name__
    logger.info(f'{name}: loaded {len(state) - len(result.unexpected_keys)} tensors from {source}')
    if ignored:
        logger.info(f'{name}: ignored classifier keys: {summarize_keys(ignored)}')
    if result.missing_keys:
        logger.info(f'{name}: not in the checkpoint (newly initialised): '
                    f'{summarize_keys(result.missing_keys)}')
    if result.unexpected_keys:
        logger.warning(f'{name}: unexpected keys in the checkpoint: '
                       f'{summarize_keys(result.unexpected_keys)}')
    return list(result.missing_keys), list(result.unexpected_keys)
