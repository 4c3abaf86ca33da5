"""mmoverlock: OverLoCK and GLNet backbones for mmdet 3.x and mmsegmentation 1.x.

``import mmoverlock`` (or ``custom_imports=dict(imports=['mmoverlock'])`` in a config) registers the
backbones into every installed OpenMMLab ``MODELS`` registry and makes checkpoint loading safe on
torch >= 2.6 (see :mod:`mmoverlock.utils.safe_checkpoint`).
"""
from .utils import safe_checkpoint as _safe_checkpoint
from .utils.safe_checkpoint import UnsafeCheckpointError, safe_load, trust_checkpoint
from .version import __version__

_safe_checkpoint.install()

from . import models  # noqa: E402  (registers the backbones)
from .models import GLNet, OverLoCK  # noqa: E402

__all__ = ['__version__', 'GLNet', 'OverLoCK', 'UnsafeCheckpointError', 'safe_load',
           'trust_checkpoint', 'models']
