"""What ``tools/train.py`` and ``tools/test.py`` do to a config before handing it to mmengine.

Runs go through :meth:`mmengine.runner.Runner.from_cfg` (or the config's ``runner_type``), which
picks mmdet's or mmseg's registries through ``default_scope``. Distributed runs are initialised by
mmengine as usual on GPUs (NCCL, ``sync_bn='torch'`` from the configs). mmengine 0.10 cannot run
them on CPU (it calls ``torch.cuda.set_device`` and hands DDP a device id), so without CUDA
:func:`setup_distributed` initialises the gloo process group itself, wraps the model in DDP without
device ids and keeps plain BatchNorm (SyncBatchNorm is CUDA-only).

:func:`configure_training` resumes from the newest *intact* checkpoint (a truncated or damaged
one is skipped with a warning) and adds the check that stops training at the first NaN / inf input
image or loss (:class:`mmoverlock.engine.FiniteTrainingHook`).
"""
from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import re
import subprocess
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from ..engine import FiniteTrainingHook
from ..utils.safe_checkpoint import check_checkpoint_file, checkpoint_problem
from .compile_amp import enable_amp, enable_compile
from .config import check_checkpoint_path, library_of
from .errors import UsageError

if TYPE_CHECKING:
    from mmengine.runner import Runner

LAUNCHERS = ('none', 'pytorch', 'slurm')


def default_work_dir(config_path: str) -> str:
    """``work_dirs/<config name>``, mmdet's and mmseg's convention."""
    return osp.join('work_dirs', osp.splitext(osp.basename(config_path))[0])


def configure_run(cfg: Config, config_path: str, work_dir: Optional[str] = None,
                  launcher: str = 'none') -> Config:
    """Set ``work_dir`` (argument, else the config's, else ``work_dirs/<name>``) and launcher."""
    if launcher not in LAUNCHERS:
        raise UsageError(f'--launcher must be one of {LAUNCHERS}, got {launcher!r}')
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = default_work_dir(config_path)
    cfg.launcher = launcher
    visualizer = cfg.get('visualizer')
    if isinstance(visualizer, dict) and visualizer.get('name') == 'visualizer':
        # mmdet's / mmseg's runtimes name it 'visualizer', a global instance that a second run in
        # the same process (the demo's two tasks, tests) would reuse with the first run's type and
        # folders. Without a name, mmengine names it after the run.
        visualizer.pop('name')
    return cfg


def default_amp_dtype(device: Optional[str] = None) -> str:
    """``'bfloat16'`` where the training device computes in it (the CPU, recent GPUs), else
    ``'float16'`` (trained with dynamic loss scaling)."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_bf16_supported():
        return 'float16'
    return 'bfloat16'


def configure_training(cfg: Config, resume: Optional[str] = None, amp: Optional[str] = None,
                       auto_scale_lr: bool = False, compile: Optional[str] = None) -> Config:
    """Apply ``--resume [PATH]``, ``--amp [DTYPE]``, ``--auto-scale-lr`` and
    ``--compile [BACKEND]`` to ``cfg``.

    Also adds :class:`~mmoverlock.engine.FiniteTrainingHook` (:func:`add_finite_check`).

    Args:
        cfg: the run's config (``work_dir`` set, see :func:`configure_run`).
        resume: None (no resume), ``'auto'`` (the latest intact checkpoint of the work dir, see
            :func:`find_resume_checkpoint`) or a path.
        amp: None (float32), ``'auto'`` (bfloat16 where the device has it, else float16 with
            loss scaling), or a dtype name for :func:`~mmoverlock.apis.compile_amp.enable_amp`
            (``'bf16'``, ``'fp16'``; on the CPU only bf16).
        auto_scale_lr: scale the learning rate with the total batch size.
        compile: None, or a ``torch.compile`` backend (``'inductor'``, ``'aot_eager'``, ...) for
            :func:`~mmoverlock.apis.compile_amp.enable_compile`.

    Raises:
        UsageError: an option that cannot work (no checkpoint to resume, fp16 on the CPU, ...).
        CorruptCheckpointError: the ``--resume`` file is truncated or damaged.
    """
    if resume == 'auto':
        # mmengine would take the work dir's last_checkpoint as it is; a damaged one is skipped
        cfg.resume, cfg.load_from = True, find_resume_checkpoint(cfg.work_dir)
    elif resume is not None:
        check_checkpoint_path(resume, '--resume checkpoint',
                              'Give an existing file, or --resume alone to continue from the '
                              "work dir's latest checkpoint.")
        if '://' not in resume:
            check_checkpoint_file(osp.expanduser(resume))
        cfg.resume, cfg.load_from = True, resume
    add_finite_check(cfg)
    if amp is not None:
        enable_amp(cfg, default_amp_dtype() if amp == 'auto' else amp)
    if compile is not None:
        enable_compile(cfg, backend=compile)
    if auto_scale_lr:
        if 'base_batch_size' not in (cfg.get('auto_scale_lr') or {}):
            raise UsageError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    return cfg


#: Checkpoints mmengine's CheckpointHook writes: ``iter_<n>.pth`` / ``epoch_<n>.pth``.
_CHECKPOINT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')


def _checkpoint_order(path: str) -> Optional[tuple[str, int]]:
    match = _CHECKPOINT_NAME.match(osp.basename(path))
    return (match.group(1), int(match.group(2))) if match else None


def find_resume_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` (without a file) continues from: the one the work dir's
    ``last_checkpoint`` names, or, when that one is missing, truncated or damaged (see
    :func:`~mmoverlock.utils.safe_checkpoint.checkpoint_problem`), the newest intact earlier
    ``iter_*.pth`` / ``epoch_*.pth``, with a warning for each one skipped.

    Args:
        work_dir: the run's work dir.

    Returns:
        The path, or None without ``last_checkpoint`` (nothing saved yet: mmengine then logs
        that it found nothing to resume and trains from the start).

    Raises:
        UsageError: ``last_checkpoint`` exists but no checkpoint of the work dir is intact.
    """
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None
    with open(pointer) as f:
        newest = f.read().strip()
    if newest and not osp.isfile(newest) and osp.isfile(osp.join(work_dir, osp.basename(newest))):
        newest = osp.join(work_dir, osp.basename(newest))  # the work dir was moved
    order = _checkpoint_order(newest)
    earlier = []
    for path in glob.glob(osp.join(work_dir, '*.pth')):
        key = _checkpoint_order(path)
        if key is not None and (order is None or (key[0] == order[0] and key[1] < order[1])):
            earlier.append((key[1], path))
    skipped = []
    for path in [newest] + [p for _, p in sorted(earlier, reverse=True)]:
        problem = (checkpoint_problem(path) if osp.isfile(path) else
                   'it does not exist')
        if problem is None:
            return path
        skipped.append(f'{path} ({problem})')
        print_log(f'--resume: skipping checkpoint {path!r}: {problem}', logger='current',
                  level=logging.WARNING)
    raise UsageError(
        f'--resume found no intact checkpoint in {work_dir!r}: {"; ".join(skipped)}. Pass a '
        'good checkpoint with --resume FILE, or train from the start without --resume (in a new '
        'work dir, or after removing the last_checkpoint file).')


def add_finite_check(cfg: Config) -> Config:
    """Add :class:`~mmoverlock.engine.FiniteTrainingHook` to ``cfg.custom_hooks`` (once), and
    ``mmoverlock.engine`` to ``custom_imports`` so the config the run saves builds it too.

    Args:
        cfg: a training config (changed in place and returned).
    """
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and h.get('type') in ('FiniteTrainingHook', FiniteTrainingHook)
               for h in hooks):
        hooks.append(dict(type='FiniteTrainingHook'))
        cfg.custom_hooks = hooks
    imports = cfg.get('custom_imports')
    if isinstance(imports, dict):
        names = imports.get('imports') or []
        names = [names] if isinstance(names, str) else list(names)
        if 'mmoverlock.engine' not in names:
            imports['imports'] = names + ['mmoverlock.engine']
    else:
        cfg.custom_imports = dict(imports=['mmoverlock.engine'], allow_failed_imports=False)
    return cfg


def _replace_sync_bn(node: Any) -> int:
    """Turn every ``dict(type='SyncBN')`` inside ``node`` into ``'BN'``; return how many."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def _slurm_environment() -> None:
    """Fill torch.distributed's environment variables from SLURM's (for ``srun`` launches)."""
    env = os.environ
    env.setdefault('RANK', env['SLURM_PROCID'])
    env.setdefault('WORLD_SIZE', env['SLURM_NTASKS'])
    env.setdefault('LOCAL_RANK', env.get('SLURM_LOCALID', '0'))
    if 'MASTER_ADDR' not in env:
        first = subprocess.run(['scontrol', 'show', 'hostnames', env['SLURM_NODELIST']],
                               capture_output=True, text=True, check=True).stdout.split()[0]
        env['MASTER_ADDR'] = first
    env.setdefault('MASTER_PORT', '29500')


def setup_distributed(cfg: Config) -> None:
    """Prepare ``cfg`` (and, on CPU, the process group) for its ``launcher``.

    With CUDA nothing changes: mmengine initialises NCCL and converts BatchNorm to SyncBatchNorm
    as the config's ``sync_bn`` says. Without CUDA the run uses gloo, DDP without device ids and
    BatchNorm (SyncBN entries of the config are replaced, ``sync_bn`` is ignored).
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher == 'slurm':
        _slurm_environment()
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    replaced = _replace_sync_bn(cfg.model)
    if cfg.get('sync_bn') or replaced:
        print_log('distributed on CPU: SyncBatchNorm needs CUDA, using BatchNorm '
                  f'(sync_bn={cfg.get("sync_bn")!r} ignored, {replaced} SyncBN layer configs '
                  'replaced)', logger='current')
        cfg.sync_bn = None
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                     broadcast_buffers=False,
                                     find_unused_parameters=cfg.get('find_unused_parameters',
                                                                    False))
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP (or other mmengine) wrapper."""
    return model.module if is_model_wrapper(model) else model


def build_model(cfg: Config) -> torch.nn.Module:
    """Build ``cfg.model`` with the registry of the config's library (no weights loaded)."""
    from mmengine.registry import init_default_scope
    init_default_scope(library_of(cfg))
    if library_of(cfg) == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS.build(cfg.model)


def build_runner(cfg: Config) -> Runner:
    """``Runner.from_cfg(cfg)``, or the registered ``cfg.runner_type``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


__all__ = ['LAUNCHERS', 'add_finite_check', 'build_model', 'build_runner', 'configure_run',
           'configure_training', 'default_work_dir', 'find_resume_checkpoint', 'setup_distributed',
           'unwrap']
