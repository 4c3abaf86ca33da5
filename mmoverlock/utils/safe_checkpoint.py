"""Safe checkpoint loading for the OpenMMLab 2.0 stack on torch >= 2.6.

A checkpoint is a pickle: with ``weights_only=False`` a downloaded file can run arbitrary code.
Since torch 2.6, ``torch.load`` defaults to ``weights_only=True`` and mmengine 0.10.7's checkpoints
(resume, ``load_from``, ``tools/test.py``) no longer load because they hold a few non-tensor types.
Instead of
switching safe loading off, :func:`install` allow-lists exactly those types (mmengine's
``HistoryBuffer``, numpy arrays, scalars and dtypes) and routes mmengine's local-file loader through
:func:`safe_load`, which refuses anything else with an error that names the offending classes and
the
explicit, per-file opt-in for trusted files (:func:`trust_checkpoint` or the environment variable
``MMOVERLOCK_TRUSTED_CHECKPOINTS``, a ``os.pathsep``-separated list of paths).

Before unpickling, :func:`safe_load` checks the file's integrity (:func:`checkpoint_problem`: the
zip archive ``torch.save`` writes, with a CRC per member), so a truncated or damaged file is
refused with :class:`CorruptCheckpointError` naming it, instead of miniz's
``PytorchStreamReader failed reading zip archive`` or, for damaged tensor bytes, silently wrong
weights.
"""
from __future__ import annotations

import os
import os.path as osp
import pickle
import re
import zipfile
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

TRUSTED_ENV = 'MMOVERLOCK_TRUSTED_CHECKPOINTS'
_trusted_files: set[str] = set()
_installed = False


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs types outside the allow-list; loading it would execute its pickle."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated, damaged or not a checkpoint at all."""


#: First bytes of the files ``torch.save`` writes: a zip archive, or (legacy format) a pickle.
_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_MAGIC = b'\x80'


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a complete ``torch.save`` file, or None when it looks intact.

    Zip-format files (everything torch >= 1.6 and mmengine write) are checked completely: the
    archive's directory (missing when the write was cut off) and the CRC of every member, which
    costs about one read of the file. Legacy (pickle-format) files are only checked for their
    first byte; ``torch.load`` notices their truncation itself.

    Args:
        path: the checkpoint file.
    """
    path = osp.expanduser(path)
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
    except OSError as err:
        return f'it cannot be read ({err.strerror or err})'
    if not head:
        return 'the file is empty'
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            return f'its zip archive is damaged ({err})'
        return None if bad is None else f'the stored bytes of {bad!r} fail their CRC check'
    if head == _ZIP_MAGIC:
        return ('the zip archive has no end (central directory): the file was cut off while '
                'being written or copied')
    if head[:1] == _PICKLE_MAGIC:
        return None
    return 'it is neither a zip archive nor a pickle, the two formats of torch.save'


def _corrupt(path: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f'checkpoint {path!r} is unreadable: {problem.rstrip(".")}. Copy or download it again, '
        'or use another checkpoint (when resuming: an earlier iter_*.pth / epoch_*.pth of the '
        'work dir with --resume FILE).')


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`CorruptCheckpointError` (naming ``path`` and the fix) unless ``path`` is an
    intact checkpoint file (see :func:`checkpoint_problem`).

    Args:
        path: the checkpoint file.
    """
    problem = checkpoint_problem(path)
    if problem is not None:
        raise _corrupt(path, problem)


def _numpy_safe_globals() -> list:
    """numpy types an mmengine checkpoint holds (arrays inside HistoryBuffer, scalars, dtypes).

    Pickles written under numpy 1 name ``numpy.core.*``, under numpy 2 ``numpy._core.*``: both
    spellings are allowed, mapped to the same objects.
    """
    core = getattr(np, '_core', None) or np.core
    entries: list = [np.ndarray, np.dtype]
    for public in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries.append((core.multiarray._reconstruct, f'{public}._reconstruct'))
        entries.append((core.multiarray.scalar, f'{public}.scalar'))
    # Concrete dtype classes (numpy.dtypes.Float64DType, ...), pickled by numpy >= 1.25.
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        entries += [obj for obj in vars(dtypes).values()
                    if isinstance(obj, type) and issubclass(obj, np.dtype)]
    return entries


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stands in for ``getattr`` while unpickling: resolves only HistoryBuffer's statistics.

    A pickled HistoryBuffer keeps its statistics methods as ``getattr(HistoryBuffer, 'mean')``.
    Allowing the real ``getattr`` would let a crafted file reach methods with side effects (for
    example ``ndarray.tofile``), so only these lookups are served.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and name in {'min', 'max', 'current', 'mean',
                                         *HistoryBuffer._statistics_methods}:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}), '
        'which is not on the allow-list')


def _mmengine_safe_globals() -> list:
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
            (_history_buffer_getattr, '__builtin__.getattr')]


def safe_globals() -> list:
    """Everything :func:`install` adds to torch's ``weights_only`` allow-list."""
    return _numpy_safe_globals() + _mmengine_safe_globals()


def trust_checkpoint(path: str) -> None:
    """Opt in to unrestricted (code-executing) unpickling of one file you trust."""
    _trusted_files.add(osp.realpath(osp.expanduser(path)))


def _is_trusted(path: str) -> bool:
    real = osp.realpath(osp.expanduser(path))
    listed = os.environ.get(TRUSTED_ENV, '').split(os.pathsep)
    env = [osp.realpath(osp.expanduser(p)) for p in listed if p]
    return real in _trusted_files or real in env


def _unsafe_globals(path: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001  (best effort: only used to word the error)
        return []


def safe_load(path: str, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with mmoverlock's allow-list and a clear refusal.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load``.

    Raises:
        CorruptCheckpointError: the file is truncated or damaged (checked before unpickling).
        UnsafeCheckpointError: it needs types outside the allow-list (and is not trusted).
    """
    if isinstance(path, (str, os.PathLike)) and osp.isfile(path):
        check_checkpoint_file(path)
    if _is_trusted(path):
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except EOFError:  # a legacy-format file cut off inside its pickle
        raise _corrupt(path, 'its data ends early') from None
    except RuntimeError as err:
        first = (str(err).splitlines() or [''])[0]
        if 'unexpected EOF' in first or 'corrupted' in first:  # legacy format, cut off
            raise _corrupt(path, first) from None
        raise
    except pickle.UnpicklingError as err:
        first = (str(err).splitlines() or [''])[0]
        if 'truncated' in first:
            raise _corrupt(path, first) from None
        names = (_unsafe_globals(path) or sorted(set(re.findall(r'GLOBAL ([\w.]+)', str(err))))
                 or [first])
        raise UnsafeCheckpointError(
            f'Refusing to load checkpoint {path!r}: it needs {", ".join(names)}, outside the '
            'allow-list of types a checkpoint may contain (torch.load(weights_only=True)). '
            'Unpickling it could run code from the file. If the type is plain data, allow it with '
            'torch.serialization.add_safe_globals([...]); if you trust this file completely, '
            f"opt in for this file only with mmoverlock.trust_checkpoint({path!r}) or "
            f'{TRUSTED_ENV}={path}.') from None


def _load_from_local(filename: str, map_location: Any = None, logger: Any = None) -> Any:
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(
            f'Checkpoint file {filename!r} does not exist: check the path given as load_from, '
            '--resume, init_cfg.checkpoint or the test checkpoint.')
    return safe_load(filename, map_location)


def install(extra_globals: Iterable[Any] = ()) -> None:
    """Allow-list the checkpoint types and route mmengine's local loader through :func:`safe_load`.

    Idempotent; called by ``import mmoverlock``.
    """
    global _installed
    torch.serialization.add_safe_globals(list(extra_globals))
    if _installed:
        return
    torch.serialization.add_safe_globals(safe_globals())
    from mmengine.runner.checkpoint import CheckpointLoader
    register: Callable = CheckpointLoader.register_scheme
    register(prefixes='', loader=_load_from_local, force=True)
    _installed = True
