"""mmoverlock: OverLoCK and GLNet backbones for mmdet 3.x and mmsegmentation 1.x.

``import mmoverlock`` (or ``custom_imports=dict(imports=['mmoverlock'])`` in a config) registers the
backbones into every installed OpenMMLab ``MODELS`` registry and makes checkpoint loading safe on
torch >= 2.6 (see :mod:`mmoverlock.utils.safe_checkpoint`).
"""
import warnings as _warnings

# mmengine and mmseg import pkg_resources (setuptools is pinned below 81 for the mmcv / natten
# builds, which need it); its deprecation notice would otherwise be printed by every process.
_warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

from .utils import safe_checkpoint as _safe_checkpoint  # noqa: E402
from .utils.safe_checkpoint import UnsafeCheckpointError, safe_load, trust_checkpoint  # noqa: E402
from .version import __version__  # noqa: E402

_safe_checkpoint.install()

from . import models  # noqa: E402  (registers the backbones)
from .models import GLNet, OverLoCK  # noqa: E402

__all__ = ['__version__', 'GLNet', 'OverLoCK', 'UnsafeCheckpointError', 'safe_load',
           'trust_checkpoint', 'models']
