"""``torch.compile`` and automatic mixed precision (AMP) switches for an mmengine training config.

- :func:`enable_compile` adds :class:`~mmoverlock.engine.CompileBackboneHook`, which compiles
  the backbone's forward in place when the run starts. Both backbones compile into one graph,
  with the results of eager execution (``tests/test_compile.py``).
- :func:`enable_amp` switches the optimizer wrapper to mixed precision. On GPUs (CUDA, NPU, MLU)
  that is mmengine's ``AmpOptimWrapper``: ``float16`` with dynamic loss scaling, or ``bfloat16``
  without (bfloat16 has float32's exponent range, so small gradients do not underflow). mmengine's
  ``AmpOptimWrapper`` refuses to be built without a GPU; on the CPU, where autocast runs in
  ``bfloat16`` only, :class:`CPUAmpOptimWrapper` is the same wrapper without the GPU check and
  without loss scaling. Under autocast the backbones' own operators follow autocast's policy
  (see :mod:`mmoverlock.ops`): convolutions in the lower precision, norms and reductions in
  float32.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
from mmengine.config import Config
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

from ..registry import register_into
from .errors import UsageError

__all__ = ['AMP_DTYPES', 'CPUAmpOptimWrapper', 'amp_dtype_name', 'enable_amp', 'enable_compile']

#: Accepted spellings of the AMP dtypes (``--amp bf16`` / ``--amp fp16``).
AMP_DTYPES = {'bf16': 'bfloat16', 'bfloat16': 'bfloat16',
              'fp16': 'float16', 'float16': 'float16', 'half': 'float16'}
#: Devices that mmengine's ``AmpOptimWrapper`` runs on.
_GPU_DEVICES = ('cuda', 'npu', 'mlu', 'musa')
#: Optimizer wrappers that the AMP switch may replace (the plain one, or an AMP one already).
_REPLACEABLE = ('OptimWrapper', 'AmpOptimWrapper', 'CPUAmpOptimWrapper')
_THIS_MODULE = __name__
#: ``torch.compile`` modes of the inductor backend.
_INDUCTOR_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


class CPUAmpOptimWrapper(AmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper`` for training on the CPU: bfloat16 autocast, no loss scaling.

    mmengine 0.10.7's ``AmpOptimWrapper`` asserts a GPU when built, and its CPU autocast accepts
    bfloat16 only. bfloat16 shares float32's exponent range, so no loss scaling is needed: the
    scaler is PyTorch's, disabled (``scale``, ``unscale_`` and ``update`` do nothing, ``step``
    calls the optimizer), and the wrapper's ``backward`` / ``step`` / ``state_dict`` are the
    parent's.

    Args:
        dtype: ``'bfloat16'`` (or ``torch.bfloat16``), the only CPU autocast dtype.
        **kwargs: ``OptimWrapper``'s arguments (``optimizer``, ``accumulative_counts``,
            ``clip_grad``).
    """

    def __init__(self, dtype: Union[str, torch.dtype] = 'bfloat16', **kwargs: Any) -> None:
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ValueError(f'CPUAmpOptimWrapper trains in bfloat16 only (mmengine\'s CPU '
                             f'autocast), got dtype={dtype!r}')
        if 'loss_scale' in kwargs:
            raise ValueError('CPUAmpOptimWrapper takes no loss_scale: bfloat16 needs no loss '
                             'scaling; remove optim_wrapper.loss_scale')
        OptimWrapper.__init__(self, **kwargs)  # not AmpOptimWrapper's: it asserts a GPU
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler('cpu', enabled=False)
        self.cast_dtype = torch.bfloat16

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """``OptimWrapper``'s context (gradient accumulation) with CPU bfloat16 autocast."""
        from mmengine.runner.amp import autocast
        with OptimWrapper.optim_context(self, model), autocast(
                device_type='cpu', dtype=torch.bfloat16, cache_enabled=False):
            yield


register_into(CPUAmpOptimWrapper, [OPTIM_WRAPPERS])


def amp_dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """``'bfloat16'`` or ``'float16'`` for any accepted spelling (:data:`AMP_DTYPES`).

    Args:
        dtype: ``'bf16'``, ``'bfloat16'``, ``'fp16'``, ``'float16'``, ``'half'`` or the torch dtype.

    Raises:
        UsageError: any other value.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace('torch.', '')
    name = AMP_DTYPES.get(str(dtype).lower())
    if name is None:
        raise UsageError(f'unknown AMP dtype {dtype!r}: use bf16 (bfloat16) or fp16 (float16)')
    return name


def _default_device() -> str:
    from mmengine.device import get_device
    return get_device()


def _type_name(wrapper_type: Any) -> str:
    return wrapper_type if isinstance(wrapper_type, str) else getattr(
        wrapper_type, '__name__', repr(wrapper_type))


def _add_custom_import(cfg: Config, module: str) -> None:
    """Append ``module`` to ``cfg.custom_imports.imports`` (created if absent), so that a runner
    built from this config, or from the copy mmengine writes to the work dir, can build the
    classes that ``module`` registers."""
    custom = cfg.get('custom_imports') or dict(imports=[], allow_failed_imports=False)
    imports = custom.get('imports', [])
    imports = [imports] if isinstance(imports, str) else list(imports)
    if module not in imports:
        imports.append(module)
    custom['imports'] = imports
    cfg.custom_imports = custom


def enable_amp(cfg: Config, dtype: Union[str, torch.dtype] = 'bfloat16',
               device: Optional[str] = None) -> Config:
    """Train ``cfg`` with automatic mixed precision in ``dtype`` (in place; also returned).

    GPUs: ``optim_wrapper.type = 'AmpOptimWrapper'`` with ``dtype``; float16 gets dynamic loss
    scaling (an explicit ``loss_scale`` in the config is kept), bfloat16 none
    (``loss_scale=dict(enabled=False)``). CPU: :class:`CPUAmpOptimWrapper` (bfloat16 only), and
    this module is added to ``custom_imports`` so that the runner can build it. The rest of
    ``optim_wrapper`` (optimizer, ``paramwise_cfg``, ``clip_grad``, ``accumulative_counts``,
    ``constructor``) is kept.

    Args:
        cfg: A training config with a single ``optim_wrapper``.
        dtype: ``'bf16'`` / ``'bfloat16'`` or ``'fp16'`` / ``'float16'`` (:data:`AMP_DTYPES`).
        device: ``'cpu'``, ``'cuda'``, ``'npu'``, ``'mlu'`` or ``'musa'``; default: the device
            mmengine will train on (``mmengine.device.get_device()``).

    Returns:
        ``cfg``.

    Raises:
        UsageError: an unknown dtype or device, float16 on the CPU, bfloat16 on a CUDA GPU that
            lacks it, a config without ``optim_wrapper`` or with another wrapper type.
    """
    name = amp_dtype_name(dtype)
    device = device or _default_device()
    if device != 'cpu' and device not in _GPU_DEVICES:
        raise UsageError(f'AMP training on {device!r} is not supported by mmengine; train on '
                         f'the CPU (bf16) or on one of {_GPU_DEVICES}')
    if device == 'cpu' and name != 'bfloat16':
        raise UsageError('float16 AMP needs a GPU: on the CPU, mmengine\'s autocast runs in '
                         'bfloat16 only. Use bf16 (bfloat16) on the CPU, or train on a GPU.')
    if (device == 'cuda' and name == 'bfloat16' and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise UsageError(f'this GPU ({torch.cuda.get_device_name()}) does not support bfloat16; '
                         'use fp16 (float16, with loss scaling).')
    wrapper = cfg.get('optim_wrapper')
    if not isinstance(wrapper, dict):
        raise UsageError('AMP applies to training: the config has no optim_wrapper')
    if 'optimizer' not in wrapper and 'type' not in wrapper:
        raise UsageError('AMP can be switched on for a single optim_wrapper (with an '
                         f'optimizer); the config has several: {sorted(wrapper)}. Set each '
                         "one's type to AmpOptimWrapper in the config instead.")
    current = _type_name(wrapper.get('type', 'OptimWrapper'))
    if current not in _REPLACEABLE:
        raise UsageError(f'AMP replaces optim_wrapper.type OptimWrapper; the config has '
                         f'{current}, which AMP would drop. Use OptimWrapper in the config, or '
                         'a mixed-precision version of that wrapper.')
    if device == 'cpu':
        wrapper['type'] = 'CPUAmpOptimWrapper'
        wrapper.pop('loss_scale', None)
        _add_custom_import(cfg, _THIS_MODULE)
    else:
        wrapper['type'] = 'AmpOptimWrapper'
        if name == 'bfloat16':
            wrapper['loss_scale'] = dict(enabled=False)
        elif wrapper.get('loss_scale') in (None, dict(enabled=False)):
            wrapper['loss_scale'] = 'dynamic'
    wrapper['dtype'] = name
    return cfg


def _cpp_compiler() -> Optional[str]:
    """A C++ compiler on the PATH (``$CXX`` first), as inductor's CPU code generation needs."""
    for candidate in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def enable_compile(cfg: Config, backend: str = 'inductor', mode: Optional[str] = None,
                   dynamic: Optional[bool] = None, device: Optional[str] = None) -> Config:
    """Train ``cfg`` with ``torch.compile`` (in place; also returned).

    Adds :class:`~mmoverlock.engine.CompileBackboneHook` with ``backend`` (and ``mode``,
    ``dynamic``) to ``cfg.custom_hooks``: the backbone's forward is compiled in place when the
    run starts (mmengine's own ``cfg.compile``, which compiles the whole ``train_step`` with the
    optimizer step, fails to trace in torch 2.14). ``torch._dynamo.config`` is left as it is.

    Args:
        cfg: A training config.
        backend: A ``torch.compile`` backend (``torch._dynamo.list_backends()``, e.g.
            ``'inductor'``, the default, or ``'aot_eager'``, which compiles nothing and is fast
            to start).
        mode: inductor's mode (``'default'``, ``'reduce-overhead'``, ``'max-autotune'``,
            ``'max-autotune-no-cudagraphs'``); None leaves torch's default.
        dynamic: ``torch.compile``'s ``dynamic`` (None: torch's default, dynamic shapes after
            a recompilation). Detection batches vary in size, where True avoids recompiling.
        device: The device training will run on (default: mmengine's ``get_device()``); on the
            CPU, inductor needs a C++ compiler.

    Returns:
        ``cfg``.

    Raises:
        UsageError: an unknown backend or mode, or inductor on the CPU without a C++ compiler.
    """
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise UsageError(f'unknown torch.compile backend {backend!r}; available: {backends}')
    options: dict[str, Any] = dict(backend=backend)
    if mode is not None:
        if backend != 'inductor' or mode not in _INDUCTOR_MODES:
            raise UsageError(f'torch.compile mode {mode!r} is not one of the inductor modes '
                             f'{_INDUCTOR_MODES} (modes apply to backend="inductor" only)')
        options['mode'] = mode
    if dynamic is not None:
        options['dynamic'] = bool(dynamic)
    if backend == 'inductor' and (device or _default_device()) == 'cpu' and not _cpp_compiler():
        raise UsageError('torch.compile\'s inductor backend compiles C++ for the CPU, but no C++ '
                         'compiler was found (set CXX or install g++); or use '
                         'backend="aot_eager", which needs none.')
    hooks = [h for h in (cfg.get('custom_hooks') or [])
             if not (isinstance(h, dict) and h.get('type') == 'CompileBackboneHook')]
    cfg.custom_hooks = hooks + [dict(type='CompileBackboneHook', **options)]
    _add_custom_import(cfg, 'mmoverlock.engine')
    return cfg
