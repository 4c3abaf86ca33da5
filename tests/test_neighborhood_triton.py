"""The Triton backend of the neighbourhood aggregation (``backend='triton'``).

On the CPU the kernels run through Triton's interpreter, which has to be switched on
(``TRITON_INTERPRET=1``) before the kernels are imported: those checks run in one subprocess
(``tests/triton_interpreter_checks.py``, all cases in one go). The test marked ``cuda`` compares the
compiled kernels with the reference on the model's shapes; it needs a GPU (``pytest -m cuda``) and
is deselected in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmoverlock.ops import available_backends, na2d_av_reference, neighborhood_aggregate
from mmoverlock.ops.neighborhood import BACKEND_ENV, _resolve_backend

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / 'tests' / 'triton_interpreter_checks.py'


def environment(**updates: str) -> dict[str, str]:
    """This process's environment without Triton's interpreter switch, plus ``updates``."""
    env = {k: v for k, v in os.environ.items() if k not in ('TRITON_INTERPRET', BACKEND_ENV)}
    env.update(updates)
    return env


def test_triton_kernels_match_the_reference_under_the_interpreter() -> None:
    # values and both gradients against the float64 brute-force loop: borders, odd sizes, every
    # odd K from 3 to 17 (the model's 5, 7, 13 with maps exactly as large as the kernel), batch
    # and groups > 1, channel tiling, the model's channels-last value views, the model's
    # dynamic_aggregate, float32 / bfloat16 / float16 / float64 and mixed operands
    result = subprocess.run([sys.executable, str(CHECKS)], env=environment(TRITON_INTERPRET='1'),
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    report = result.stdout + result.stderr
    summary_lines = [line for line in result.stdout.splitlines() if line.startswith('SUMMARY ')]
    assert result.returncode == 0 and summary_lines, report
    summary = json.loads(summary_lines[-1][len('SUMMARY '):])
    assert summary['failures'] == [] and summary['cases'] >= 20, report


def test_triton_backend_on_cpu_tensors_needs_the_interpreter() -> None:
    code = ('import torch\n'
            'from mmoverlock.ops import neighborhood_aggregate\n'
            'a = torch.rand(1, 1, 6, 6, 9).softmax(-1)\n'
            'v = torch.rand(1, 1, 6, 6, 2)\n'
            'try:\n'
            '    neighborhood_aggregate(a, v, backend="triton")\n'
            'except RuntimeError as error:\n'
            '    print(error)\n'
            'else:\n'
            '    print("no error")\n')
    result = subprocess.run([sys.executable, '-c', code], env=environment(), capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert 'needs CUDA tensors' in message and 'TRITON_INTERPRET=1' in message, message
    assert "backend='torch'" in message, message


def test_triton_backend_checks_shapes_first() -> None:
    attn = torch.rand(1, 2, 6, 7, 9)
    value = torch.rand(1, 2, 6, 7, 3)
    with pytest.raises(ValueError, match='must agree'):
        neighborhood_aggregate(attn, value[:, :, :5], backend='triton')
    with pytest.raises(ValueError, match='K\\*K'):
        neighborhood_aggregate(attn[..., :8], value, backend='triton')
    with pytest.raises(ValueError, match='at least as large as the kernel'):
        neighborhood_aggregate(torch.rand(1, 1, 4, 9, 25), torch.rand(1, 1, 4, 9, 2),
                               backend='triton')


def test_default_backend_is_triton_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert 'triton' in available_backends()  # triton comes with torch's CUDA wheels
    assert _resolve_backend(None, torch.device('cuda', 0)) == 'triton'
    assert _resolve_backend(None, torch.device('cpu')) == 'torch'  # the CPU routes are unchanged
    assert _resolve_backend('triton', torch.device('cpu')) == 'triton'
    monkeypatch.setenv(BACKEND_ENV, 'torch')
    assert _resolve_backend(None, torch.device('cuda', 0)) == 'torch'
    monkeypatch.setenv(BACKEND_ENV, 'triton')
    assert _resolve_backend(None, torch.device('cpu')) == 'triton'


# OverLoCK-T on an 800 x 1216 detection image, batch 2: (B, G, H, W, C per group, K) of ContMix's
# stage-3 (50 x 76) and stage-4 (25 x 38) maps, the large kernel and the small one
MODEL_SHAPES = [(2, 8, 50, 76, 16, 13), (2, 8, 50, 76, 16, 5), (2, 16, 25, 38, 16, 7),
                (2, 16, 25, 38, 16, 5)]
# round-to-nearest into the dtype's significand (8 / 11 / 24 bits), after float32 accumulation
CUDA_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.mark.cuda
@pytest.mark.parametrize('shape', MODEL_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_triton_matches_the_reference_on_cuda(shape: tuple[int, ...]) -> None:
    assert torch.cuda.is_available(), ('this test needs a CUDA GPU: run it with `pytest -m cuda` '
                                       'on a GPU machine (CI deselects the cuda marker)')
    b, g, h, w, c, k = shape
    gen = torch.Generator(device='cuda').manual_seed(0)
    for dtype, rtol in CUDA_RTOL.items():
        attn = torch.randn(b, g, h, w, k * k, device='cuda', generator=gen).softmax(-1).to(dtype)
        # the values as the model passes them: one channel half of a channels-last map
        full = torch.randn(b, 2 * g * c, h, w, device='cuda', generator=gen).to(dtype)
        full = full.contiguous(memory_format=torch.channels_last)
        value = full[:, g * c:].reshape(b, g, c, h, w).permute(0, 1, 3, 4, 2)
        grad = torch.randn(b, g, h, w, c, device='cuda', generator=gen).to(dtype)
        a, v = attn.clone().requires_grad_(True), value.detach().requires_grad_(True)
        out = neighborhood_aggregate(a, v, backend='triton')
        ours = (out,) + torch.autograd.grad(out, (a, v), grad)
        ref_a, ref_v = attn.double().requires_grad_(True), value.double().requires_grad_(True)
        ref = na2d_av_reference(ref_a, ref_v)
        expected = (ref,) + torch.autograd.grad(ref, (ref_a, ref_v), grad.double())
        for name, x, y in zip(('output', 'attn grad', 'value grad'), ours, expected):
            assert x.dtype == dtype, name
            error = (x.double() - y).abs()
            bound = 1e-5 + rtol * y.abs()
            assert bool((error <= bound).all()), (
                f'{dtype} {name}: max error {error.max().item():.3g}, '
                f'worst excess {(error - bound).max().item():.3g}')
        # the auto backend takes the kernels on CUDA
        assert 'TritonAggregate' in type(neighborhood_aggregate(a, v).grad_fn).__name__
