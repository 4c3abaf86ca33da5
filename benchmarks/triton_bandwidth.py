"""Achieved memory bandwidth of the Triton neighbourhood-aggregation kernels on a CUDA GPU.

The aggregation is memory-bound: per pixel it reads ``K*K`` weights and writes ``C`` channels
(10x more weight bytes than value bytes for OverLoCK's K = 13 with 16 channels per group). The
bandwidth reported is the compulsory traffic over the kernel time:

- forward: read ``attn`` and ``value``, write ``out``;
- backward (weight-gradient kernel + value-gradient kernel): read ``grad_out`` and ``value``,
  write ``grad_attn``; read ``attn`` and ``grad_out``, write ``grad_value``.

Values are re-read by up to ``K*K`` windows; those re-reads come from the caches and are not
counted.
Shapes: ContMix of OverLoCK-T on an 800 x 1216 detection image (stage-3 map 50 x 76 with 8 groups,
stage-4 map 25 x 38 with 16 groups; 16 channels per group; the large kernel and the 5 x 5 one),
batch 2, the values as the strided channels-last views the model passes. Kernel times come from
``triton.testing.do_bench`` (median, L2 flushed between runs); the PyTorch route CUDA would
otherwise take (``backend='torch'``) is timed alongside for comparison.

    python benchmarks/triton_bandwidth.py [--dtypes float32 bfloat16] \
        [--out benchmarks/results/triton_bandwidth]

``--tiny`` runs two small shapes on whatever device there is (on the CPU only under
``TRITON_INTERPRET=1``), to check that the script works; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmoverlock.ops import neighborhood_aggregate  # noqa: E402
from mmoverlock.ops import neighborhood_triton as kernels  # noqa: E402

# (B, G, H, W, C per group, K): OverLoCK-T, 800 x 1216 image, batch 2
SHAPES = [(2, 8, 50, 76, 16, 13), (2, 8, 50, 76, 16, 5), (2, 16, 25, 38, 16, 7),
          (2, 16, 25, 38, 16, 5)]
TINY_SHAPES = [(1, 2, 9, 11, 4, 5), (1, 1, 13, 14, 3, 13)]
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def traffic_bytes(shape: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """Compulsory bytes of the forward and of the backward (both gradients)."""
    b, g, h, w, c, k = shape
    attn = b * g * h * w * k * k * itemsize
    value = b * g * h * w * c * itemsize
    forward = attn + 2 * value  # attn, value in; out
    backward = (value + value + attn) + (attn + value + value)  # see the module docstring
    return forward, backward


def model_operands(shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax weights, values as the model's channels-last views, an output gradient."""
    b, g, h, w, c, k = shape
    attn = torch.randn(b, g, h, w, k * k, device=device).softmax(-1).to(dtype)
    full = torch.randn(b, 2 * g * c, h, w, device=device, dtype=dtype)
    full = full.contiguous(memory_format=torch.channels_last)
    value = full[:, g * c:].reshape(b, g, c, h, w).permute(0, 1, 3, 4, 2)
    grad = torch.randn(b, g, h, w, c, device=device, dtype=dtype)
    return attn, value, grad


def triton_backward(grad: torch.Tensor, attn: torch.Tensor, value: torch.Tensor,
                    k: int) -> None:
    """Both gradient kernels, as the autograd function's backward runs them."""
    kernels._attn_grad(grad, attn, value, k)
    kernels._value_grad(grad, attn, value, k)


def torch_forward_backward(grad: torch.Tensor, attn: torch.Tensor, value: torch.Tensor) -> None:
    """Forward and both gradients by the PyTorch route CUDA takes without Triton."""
    a, v = attn.detach().requires_grad_(True), value.detach().requires_grad_(True)
    torch.autograd.grad(neighborhood_aggregate(a, v, backend='torch'), (a, v), grad)


def kernel_ms(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, wall clock elsewhere."""
    if device.type == 'cuda':
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=max(runs, 1) * 10,
                                             return_mode='median'))
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], device: torch.device,
            runs: int = 20, baseline: bool = True) -> list[dict]:
    """Time the Triton forward and backward kernels (and the PyTorch route) per shape and dtype.

    Args:
        shapes: ``(B, G, H, W, C, K)`` tuples.
        dtypes: Operand dtypes.
        device: A CUDA device (or the CPU under ``TRITON_INTERPRET=1``, for a dry run).
        runs: Repetitions (scales ``do_bench``'s measuring time on CUDA).
        baseline: Also time ``backend='torch'`` forward and forward + backward.

    Returns:
        One dict per (shape, dtype): milliseconds, compulsory bytes and achieved GB/s.
    """
    rows = []
    for shape in shapes:
        k = shape[-1]
        for dtype in dtypes:
            attn, value, grad = model_operands(shape, dtype, device)
            fwd_bytes, bwd_bytes = traffic_bytes(shape, attn.element_size())
            fwd = kernel_ms(partial(kernels._forward, attn, value, k), device, runs)
            bwd = kernel_ms(partial(triton_backward, grad, attn, value, k), device, runs)
            row = dict(shape='x'.join(map(str, shape)), dtype=str(dtype).replace('torch.', ''),
                       forward_ms=fwd, backward_ms=bwd, forward_mb=fwd_bytes / 1e6,
                       backward_mb=bwd_bytes / 1e6, forward_gbs=fwd_bytes / fwd / 1e6,
                       backward_gbs=bwd_bytes / bwd / 1e6)
            if baseline:
                row['torch_forward_ms'] = kernel_ms(
                    partial(neighborhood_aggregate, attn, value, backend='torch'), device, runs)
                row['torch_forward_backward_ms'] = kernel_ms(
                    partial(torch_forward_backward, grad, attn, value), device, runs)
            rows.append(row)
    return rows


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [f'Triton neighbourhood aggregation on {device_name}: kernel time (ms) and achieved '
             'bandwidth of the compulsory traffic (GB/s).', '',
             '| B x G x H x W x C x K | dtype | fwd ms | fwd GB/s | bwd ms | bwd GB/s '
             '| torch fwd ms | torch fwd+bwd ms |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        torch_cols = (f"{r['torch_forward_ms']:.3f} | {r['torch_forward_backward_ms']:.3f}"
                      if 'torch_forward_ms' in r else '- | -')
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['forward_ms']:.3f} | "
                     f"{r['forward_gbs']:.0f} | {r['backward_ms']:.3f} | {r['backward_gbs']:.0f} | "
                     f'{torch_cols} |')
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dtypes', nargs='+', default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--no-baseline', action='store_true',
                        help="skip timing backend='torch'")
    parser.add_argument('--tiny', action='store_true',
                        help='two small shapes, any device: checks that the script runs')
    parser.add_argument('--out', default=None,
                        help='write OUT.json and OUT.md (e.g. benchmarks/results/triton_bandwidth)')
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not (args.tiny and kernels.triton_interpreted()):
        sys.exit('this benchmark needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1 for a dry run '
                 'on the CPU)')
    device = torch.device('cuda' if cuda else 'cpu')
    device_name = torch.cuda.get_device_name(device) if cuda else 'CPU (Triton interpreter)'
    rows = measure(TINY_SHAPES if args.tiny else SHAPES, [DTYPES[d] for d in args.dtypes],
                   device, runs=2 if args.tiny else args.runs, baseline=not args.no_baseline)
    table = markdown(rows, device_name)
    print(table, end='')
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix('.json').write_text(json.dumps(
            dict(device=device_name, torch=torch.__version__, rows=rows), indent=1) + '\n')
        out.with_suffix('.md').write_text(table)


if __name__ == '__main__':
    main()
