"""Fixtures of the detection / segmentation tests: small generated data sets, tiny configs."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_SIZE, write_tiny_config

from mmoverlock.datasets import generate_ade_shapes, generate_coco_shapes

pytest_plugins = ['report_at_once']  # --report-at-once


@pytest.fixture(scope='module')
def single_thread() -> Iterator[None]:
    """One intra-op thread for a test module (restored after it): the machine has two cores,
    shared with other work, and two spinning OpenMP threads then slow a training step down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='session')
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny COCO-format shapes set (8 train / 4 val images of 64 x 64)."""
    root = tmp_path_factory.mktemp('data') / 'coco_shapes'
    return str(generate_coco_shapes(root, num_train=8, num_val=4, size=TINY_SIZE, seed=1))


@pytest.fixture(scope='session')
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny ADE20K-layout shapes set (8 train / 4 val images of 64 x 64)."""
    root = tmp_path_factory.mktemp('data') / 'ade_shapes'
    return str(generate_ade_shapes(root, num_train=8, num_val=4, size=TINY_SIZE, seed=1))


@pytest.fixture
def tiny_det_config(tmp_path: Path, coco_root: str) -> str:
    """Path of the tiny Mask R-CNN config (2 iterations) on :func:`coco_root`."""
    return write_tiny_config(tmp_path, 'det', coco_root)


@pytest.fixture
def tiny_seg_config(tmp_path: Path, ade_root: str) -> str:
    """Path of the tiny UperNet config (2 iterations) on :func:`ade_root`."""
    return write_tiny_config(tmp_path, 'seg', ade_root)
