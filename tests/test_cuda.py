"""GPU checks (issue 14, point 5), marked ``cuda``: ``pytest -m cuda`` on a machine with an NVIDIA
GPU (``benchmarks/gpu_check.sh`` runs them); the CPU test command deselects them.

- the backbones on the GPU equal the CPU in float32, and stay within the bfloat16 / float16
  tolerance of float32 under autocast (the tolerances of tests/test_amp.py, same reasoning);
- one Mask R-CNN and one UperNet training iteration with AMP through ``tools/train.py``;
- a checkpoint saved on the GPU loads on the CPU and gives the GPU's outputs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from backbone_testing import assert_close_to_scale, random_loss
from helpers import load_tool, train_iterations, write_tiny_config
from test_amp import OUTPUT_REL
from test_glnet import TINY_G
from test_overlock import GRAD_REL, TINY

import mmoverlock  # noqa: F401  (registration)
from mmoverlock.models.backbones.glnet import GLNet
from mmoverlock.models.backbones.overlock import OverLoCK

pytestmark = pytest.mark.cuda

#: float32 on the GPU (cuDNN, TF32 off) against the CPU: two summation orders of float32, the
#: reasoning of backbone_testing.assert_close_to_scale; gradients with test_overlock's GRAD_REL
#: (batch-statistics BatchNorm on tiny maps makes them ill-conditioned).
FP32_REL = 1e-4


@pytest.fixture(autouse=True)
def gpu() -> None:
    assert torch.cuda.is_available(), ('this test needs a CUDA GPU: run it with `pytest -m cuda` '
                                       'on a GPU machine (CI deselects the cuda marker)')
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _models() -> list[tuple[str, torch.nn.Module]]:
    torch.manual_seed(0)
    return [('overlock', OverLoCK(TINY)), ('glnet', GLNet(TINY_G))]


@pytest.mark.parametrize('index', [0, 1], ids=['overlock', 'glnet'])
def test_backbone_on_gpu_equals_cpu_in_float32(index: int) -> None:
    name, model = _models()[index]
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    model.train()
    cpu_out = model(x)
    random_loss(cpu_out).backward()
    cpu_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gpu_model = _models()[index][1].cuda()
    gpu_model.load_state_dict(state)
    gpu_model.train()
    gpu_out = gpu_model(x.cuda())
    random_loss([o.cpu() for o in gpu_out]).backward()
    for a, b in zip(gpu_out, cpu_out):
        assert_close_to_scale(a.detach().cpu(), b.detach(), FP32_REL, msg=f'{name} output')
    grads = {n: p.grad.cpu() for n, p in gpu_model.named_parameters() if p.grad is not None}
    assert grads.keys() == cpu_grads.keys()
    floor = 1e-3 * max(g.abs().max().item() for g in cpu_grads.values())
    for n, g in cpu_grads.items():
        assert_close_to_scale(grads[n], g, GRAD_REL, msg=n, floor=floor)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('index', [0, 1], ids=['overlock', 'glnet'])
def test_backbone_under_autocast_on_gpu(index: int, dtype: torch.dtype) -> None:
    name, model = _models()[index]
    model = model.cuda().eval()
    x = torch.randn(2, 3, 96, 128, device='cuda')
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cuda', dtype=dtype):
            out = model(x)
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert_close_to_scale(a.float(), b, OUTPUT_REL, msg=f'{name} {dtype}')
    model.train()
    with torch.autocast('cuda', dtype=dtype):
        loss = random_loss([o.float().cpu() for o in model(x)])
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def mmcv_cuda_ops_error() -> str | None:
    """Why mmcv's compiled ops do not run on CUDA tensors (None when they do)."""
    from mmcv.ops import nms
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]], device='cuda')
    try:
        nms(boxes, torch.tensor([0.9, 0.8], device='cuda'), 0.5)
    except (RuntimeError, NotImplementedError) as error:
        return str(error).splitlines()[0]
    return None


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_one_training_iteration_with_amp(task: str, tmp_path: Path, coco_root: str,
                                         ade_root: str) -> None:
    if task == 'det':  # Mask R-CNN's RoIAlign and NMS are mmcv's compiled ops
        error = mmcv_cuda_ops_error()
        assert error is None, (
            f'mmcv has no CUDA ops here ({error}); mmdet detectors need them on a GPU: build mmcv '
            'with them (tools/setup_env.sh does on a GPU machine; benchmarks/gpu_check.sh '
            '--mmcv auto tries)')
    config = write_tiny_config(tmp_path, task, coco_root if task == 'det' else ade_root,
                               max_iters=1)
    work = tmp_path / 'work'
    load_tool('train').main([config, '--work-dir', str(work), '--amp'])
    assert train_iterations(str(work)) == [1]
    state = torch.load(work / 'iter_1.pth', map_location='cpu', weights_only=True)
    assert all(torch.isfinite(v).all() for v in state['state_dict'].values()
               if v.is_floating_point())


def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path: Path) -> None:
    _, model = _models()[0]
    model = model.cuda().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = [o.cpu() for o in model(x.cuda())]
    path = tmp_path / 'gpu.pth'
    torch.save(dict(state_dict=model.state_dict()), path)
    cpu_model = OverLoCK(TINY).eval()
    cpu_model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True)['state_dict'])
    assert all(t.device.type == 'cpu' for t in cpu_model.state_dict().values())
    with torch.no_grad():
        for a, b in zip(cpu_model(x), expected):
            assert_close_to_scale(a, b, FP32_REL, msg='output after the move')


@pytest.mark.parametrize('index', [0, 1], ids=['overlock', 'glnet'])
def test_training_step_does_not_block_the_host(index: int) -> None:
    """After a first step (which builds the cached index tensors on the device), a training step
    queues its kernels without waiting for the GPU: no blocking copy between host and device."""
    name, model = _models()[index]
    model = model.cuda().train()
    x = torch.randn(2, 3, 96, 128, device='cuda')
    sum(o.float().mean() for o in model(x)).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        outs = model(x)
        sum(o.float().mean() for o in outs).backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert all(o.is_cuda for o in outs), name
