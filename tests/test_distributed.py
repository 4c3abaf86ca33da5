"""Two-process DDP training on CPU (gloo) through tools/dist_train.sh (torchrun), run as the README
words it: without an activated environment."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from helpers import REPO, find_log, train_iterations, write_tiny_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _environment_without_python() -> dict:
    """The tests' environment with no activated virtual environment and no PYTHON: the launcher
    must find the project's Python itself (``<repo>/.venv``; where the tests run without one,
    ``PYTHON`` names their interpreter, the launcher's second choice)."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'VIRTUAL_ENV')}
    venv_bins = {str(REPO / '.venv' / 'bin'), os.path.dirname(sys.executable)}
    env['PATH'] = os.pathsep.join(p for p in env.get('PATH', '').split(os.pathsep)
                                  if p and p not in venv_bins) or '/usr/bin:/bin'
    if not (REPO / '.venv' / 'bin' / 'python').exists():
        env['PYTHON'] = sys.executable
    return env


def test_two_process_ddp_on_cpu(tmp_path: Path, ade_root: str) -> None:
    # 4 iterations of 2 images per process: 16 images seen, the 8 training images twice.
    config = write_tiny_config(tmp_path, 'seg', ade_root, max_iters=4,
                               extra={'train_dataloader.batch_size': 2})
    work = tmp_path / 'work'
    env = dict(_environment_without_python(), PORT=str(_free_port()), OMP_NUM_THREADS='1',
               CUDA_VISIBLE_DEVICES='')
    # as the README words it: `bash tools/dist_train.sh CONFIG GPUS`, nothing activated
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'dist_train.sh'), config, '2',
                           '--work-dir', str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # gradients arrive in the parameters' own layout (DDP copies them into buckets shaped so)
    assert 'Grad strides do not match' not in proc.stdout + proc.stderr

    log = find_log(str(work))
    assert 'Distributed launcher: pytorch' in log
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    assert "'backend': 'gloo'" in log
    # SyncBatchNorm is CUDA-only: the heads' SyncBN became BN, sync_bn='torch' was dropped
    assert 'SyncBatchNorm needs CUDA' in proc.stdout
    assert "norm_cfg=dict(requires_grad=True, type='BN')" in log and 'sync_bn = None' in log
    assert train_iterations(str(work)) == [1, 2, 3, 4]

    checkpoint = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)
    assert checkpoint['meta']['iter'] == 4
    # saved from the DDP-wrapped model without the wrapper's 'module.' prefix
    assert all(not k.startswith('module.') for k in checkpoint['state_dict'])
    rank_lines = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if 'Exception' in line or 'Traceback' in line]
    assert not rank_lines, rank_lines
