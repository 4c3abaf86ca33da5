"""Registration of mmoverlock's modules into the OpenMMLab registries that are installed.

mmdet and mmseg each keep their own ``MODELS`` registry (children of mmengine's). A backbone is
registered into every one of them that can be imported, so ``custom_imports=dict(imports=
['mmoverlock'])`` is all a config of either library needs.

A library that is not installed is skipped quietly. One that is installed but fails to import
(mmdet and mmseg assert their mmcv version on import, for example) is skipped with one warning
naming the library and the error, so ``import mmoverlock`` keeps working for the other library.

Names are never taken over silently: if a registry already holds a *different* class under the
name (another package's ``OverLoCK``), registration raises :class:`RegistryConflictError`, since a
config's ``type='OverLoCK'`` would otherwise build whichever package was imported last. The same
class (same module and qualified name, e.g. after ``importlib.reload``) is replaced.
"""
from __future__ import annotations

import importlib
import warnings
from functools import cache
from typing import Iterable, Optional, TypeVar

T = TypeVar('T', bound=type)

#: Registries that receive our models, by module path. Missing libraries are skipped.
MODEL_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


class RegistryConflictError(RuntimeError):
    """A registry already holds another class under the name of one of ours."""


def _library_missing(err: ImportError, module_name: str) -> bool:
    """Whether ``err`` says the library of ``module_name`` itself is not installed (rather than
    something it imports being missing or broken)."""
    root = module_name.split('.')[0]
    return isinstance(err, ModuleNotFoundError) and err.name in (root, module_name)


@cache
def _load_registries(module_names: tuple[str, ...]) -> tuple:
    registries = []
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            if not _library_missing(err, module_name):
                _warn_broken(module_name, err)
            continue
        except Exception as err:  # noqa: BLE001  (installed but broken: any error at import)
            _warn_broken(module_name, err)
            continue
        registries.append(module.MODELS)
    return tuple(registries)


def _warn_broken(module_name: str, err: BaseException) -> None:
    library = module_name.split('.')[0]
    warnings.warn(f'mmoverlock: {library} is installed but cannot be imported '
                  f'({type(err).__name__}: {err}); OverLoCK and GLNet are not registered in '
                  f'{library}.registry.MODELS. Fix the {library} installation (e.g. its mmcv '
                  'version) to use them there.', RuntimeWarning, stacklevel=2)


def available_model_registries(module_names: Optional[Iterable[str]] = None) -> list:
    """The ``MODELS`` registries of the installed downstream libraries.

    Each library is imported once per process; a broken one is reported once (a warning).

    Args:
        module_names: Registry modules to try (default :data:`MODEL_REGISTRIES`).
    """
    return list(_load_registries(tuple(module_names or MODEL_REGISTRIES)))


def _qualified_name(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def register_into(cls: T, registries: Iterable) -> T:
    """Register ``cls`` under its class name in each of ``registries``.

    Args:
        cls: The class.
        registries: mmengine registries.

    Raises:
        RegistryConflictError: A registry holds another class under that name.
    """
    name = cls.__name__
    for registry in registries:
        existing = registry.module_dict.get(name)
        if existing is not None and _qualified_name(existing) != _qualified_name(cls):
            raise RegistryConflictError(
                f'{registry.scope}.registry.MODELS ({registry.name!r}) already holds '
                f'{name!r} = {_qualified_name(existing)}; mmoverlock will not replace it with '
                f'{_qualified_name(cls)}. Import only one of the two packages in this process '
                '(e.g. drop the other from custom_imports).')
        # force: only ever replaces the same class (a reloaded module).
        registry.register_module(module=cls, force=existing is not None)
    return cls


def register_model(cls: T) -> T:
    """Class decorator: register ``cls`` under its class name in every available ``MODELS``."""
    return register_into(cls, available_model_registries())
