"""Two-process DDP training on CPU (gloo) through tools/dist_train.sh (torchrun)."""
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


def test_two_process_ddp_on_cpu(tmp_path: Path, ade_root: str) -> None:
    # 4 iterations of 2 images per process: 16 images seen, the 8 training images twice.
    config = write_tiny_config(tmp_path, 'seg', ade_root, max_iters=4,
                               extra={'train_dataloader.batch_size': 2})
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), OMP_NUM_THREADS='1',
               CUDA_VISIBLE_DEVICES='')
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
