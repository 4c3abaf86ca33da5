"""What ``tools/train.py`` and ``tools/test.py`` do to a config before handing it to mmengine.

Runs go through :meth:`mmengine.runner.Runner.from_cfg` (or the config's ``runner_type``), which
picks mmdet's or mmseg's registries through ``default_scope``. Distributed runs are initialised by
mmengine as usual on GPUs (NCCL, ``sync_bn='torch'`` from the configs). mmengine 0.10 cannot run
them on CPU (it calls ``torch.cuda.set_device`` and hands DDP a device id), so without CUDA
:func:`setup_distributed` initialises the gloo process group itself, wraps the model in DDP without
device ids and keeps plain BatchNorm (SyncBatchNorm is CUDA-only).
"""
from __future__ import annotations

import os
import os.path as osp
import subprocess
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

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


def configure_training(cfg: Config, resume: Optional[str] = None, amp: bool = False,
                       auto_scale_lr: bool = False) -> Config:
    """Apply ``--resume [PATH]``, ``--amp`` and ``--auto-scale-lr`` to ``cfg``.

    Args:
        resume: None (no resume), ``'auto'`` (the latest checkpoint of the work dir) or a path.
    """
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        check_checkpoint_path(resume, '--resume checkpoint',
                              'Give an existing file, or --resume alone to continue from the '
                              "work dir's latest checkpoint.")
        cfg.resume, cfg.load_from = True, resume
    if amp:
        if not torch.cuda.is_available():
            raise UsageError('--amp needs a CUDA GPU (mmengine\'s AmpOptimWrapper); none is '
                             'available, so train without --amp.')
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            print_log('AMP is already enabled in the config', logger='current')
        elif wrapper != 'OptimWrapper':
            raise UsageError(f'--amp works with optim_wrapper.type OptimWrapper, the config has '
                             f'{wrapper}')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if auto_scale_lr:
        if 'base_batch_size' not in (cfg.get('auto_scale_lr') or {}):
            raise UsageError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
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


__all__ = ['LAUNCHERS', 'build_model', 'build_runner', 'configure_run', 'configure_training',
           'default_work_dir', 'setup_distributed', 'unwrap']
