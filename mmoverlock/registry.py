"""Registration of mmoverlock's modules into the OpenMMLab registries that are installed.

mmdet and mmseg each keep their own ``MODELS`` registry (children of mmengine's). A backbone is
registered into every one of them that can be imported, so ``custom_imports=dict(imports=
['mmoverlock'])`` is all a config of either library needs.
"""
from __future__ import annotations

import importlib
from typing import TypeVar

T = TypeVar('T', bound=type)

#: Registries that receive our models, by module path. Missing libraries are skipped.
MODEL_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


def available_model_registries() -> list:
    """The ``MODELS`` registries of the installed downstream libraries."""
    registries = []
    for module_name in MODEL_REGISTRIES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        registries.append(module.MODELS)
    return registries


def register_model(cls: T) -> T:
    """Class decorator: register ``cls`` under its class name in every available ``MODELS``."""
    for registry in available_model_registries():
        registry.register_module(module=cls, force=True)
    return cls
