"""Speed of mmoverlock's convolution operators against PyTorch's, on the shapes OverLoCK-T runs.

- 1x1 convolution: ``F.conv2d`` against :func:`mmoverlock.ops.pointwise_conv2d` (oneDNN), forward
  alone and forward + backward;
- depthwise convolution, forward alone and forward + backward: ``F.conv2d`` (PyTorch's backward)
  against :func:`mmoverlock.ops.depthwise_conv2d` for the large kernels and the dilated branches
  of the re-parameterisable blocks;
- ContMix's neighbourhood aggregation, forward alone and forward + backward, by route of
  :func:`mmoverlock.ops.neighborhood_aggregate`: the CPU default (``sparse``), the two other
  pure-PyTorch routes and the unfold baseline;
- GELU on a channels-last map: ``F.gelu`` against :func:`mmoverlock.ops.gelu` (the contiguous
  ``(N, H, W, C)`` view), forward and backward, on values of order 1 and on large values (where
  PyTorch's non-contiguous kernel meets denormal intermediates).

Channels-last float32 maps of a 2x3x512x512 training batch, median of ``--runs`` after a warm-up,
in this process (``--threads`` intra-op threads, glibc malloc reusing freed memory as the tools
do).

    python benchmarks/ops.py --threads 1 --out benchmarks/results/ops
    python benchmarks/ops.py --sections gelu --out benchmarks/results/gelu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmoverlock.ops import (  # noqa: E402
    depthwise_conv2d,
    gelu,
    neighborhood_aggregate,
    pointwise_conv2d,
)
from mmoverlock.utils.benchmark import cpu_record  # noqa: E402
from mmoverlock.utils.cpu_allocator import keep_freed_memory  # noqa: E402

# (batch, in, out, size): the MLP and projection 1x1 convs of OverLoCK-T at 512x512 input
POINTWISE = [(2, 64, 256, 128), (2, 256, 64, 128), (2, 128, 512, 64), (2, 512, 128, 64),
             (2, 384, 768, 32), (2, 768, 384, 32), (2, 256, 256, 32)]
# (batch, channels, size, kernel, dilation): large kernels and dilated branches of OverLoCK-T
DEPTHWISE = [(2, 64, 128, 17, 1), (2, 64, 128, 9, 1), (2, 64, 128, 3, 3), (2, 128, 64, 15, 1),
             (2, 128, 64, 7, 2), (2, 256, 32, 13, 1), (2, 256, 32, 7, 1), (2, 256, 32, 3, 4),
             (2, 256, 128, 3, 1), (2, 64, 128, 9, 2), (2, 64, 128, 3, 7)]

# (batch, groups, size, channels per group, kernel): ContMix of OverLoCK-T, 2x3x512x512 training
# batch (stage 3 large and small kernel, stage 4) and a 1x3x800x1216 detection image (stage 3)
AGGREGATION = [(2, 8, (32, 32), 16, 13), (2, 8, (32, 32), 16, 5), (2, 16, (16, 16), 16, 7),
               (1, 8, (50, 76), 16, 13)]
AGGREGATION_ROUTES = ('sparse', 'banded', 'taps', 'unfold')
# (batch, channels, size): the GELU inputs of OverLoCK-T's MLPs (stage 1 and 3), 2x3x512x512 batch
GELU_SHAPES = [(2, 256, 128), (2, 768, 32)]
#: standard deviations of the GELU inputs: order 1, and large (many |x| > 13)
GELU_SCALES = (1.0, 10.0)


def median_ms(runs: int, step: Callable[..., object], *args: object, **kwargs: object) -> float:
    step(*args, **kwargs)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def forward(op: Callable[..., torch.Tensor], *args: object, **kwargs: object) -> None:
    with torch.no_grad():
        op(*args, **kwargs)


def forward_backward(op: Callable[..., torch.Tensor], grad: torch.Tensor, *args: object,
                     **kwargs: object) -> None:
    op(*args, **kwargs).backward(grad)


def channels_last(*shape: int, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def bench_pointwise(runs: int) -> list[dict]:
    rows = []
    for b, cin, cout, s in POINTWISE:
        x = channels_last(b, cin, s, s, grad=True)
        w = torch.randn(cout, cin, 1, 1, requires_grad=True)
        bias = torch.randn(cout, requires_grad=True)
        grad = channels_last(b, cout, s, s)
        row = {'op': '1x1 conv', 'shape': f'{b}x{cin}x{s}x{s} -> {cout}'}
        for name, op in (('pytorch', F.conv2d), ('ours', pointwise_conv2d)):
            row[f'{name}_fwd_ms'] = median_ms(runs, forward, op, x, w, bias)
            row[f'{name}_fwd_bwd_ms'] = median_ms(runs, forward_backward, op, grad, x, w, bias)
            row[f'gflops_fwd_{name}'] = 2 * b * cin * cout * s * s / row[f'{name}_fwd_ms'] / 1e6
        rows.append(row)
    return rows


def pytorch_depthwise(x: torch.Tensor, w: torch.Tensor, dilation: int) -> torch.Tensor:
    pad = dilation * (w.shape[-1] - 1) // 2
    return F.conv2d(x, w, padding=pad, dilation=dilation, groups=x.shape[1])


def bench_depthwise(runs: int) -> list[dict]:
    rows = []
    for b, c, s, k, d in DEPTHWISE:
        x = channels_last(b, c, s, s, grad=True)
        w = torch.randn(c, 1, k, k, requires_grad=True)
        grad = channels_last(b, c, s, s)
        rows.append({
            'op': 'depthwise conv', 'shape': f'{b}x{c}x{s}x{s}, {k}x{k} dilation {d}',
            'fwd_ms': median_ms(runs, forward, pytorch_depthwise, x, w, d),
            'ours_fwd_ms': median_ms(runs, forward, depthwise_conv2d, x, w, dilation=d),
            'pytorch_fwd_bwd_ms': median_ms(runs, forward_backward, pytorch_depthwise, grad,
                                            x, w, d),
            'ours_fwd_bwd_ms': median_ms(runs, forward_backward, depthwise_conv2d, grad, x, w,
                                         dilation=d)})
    return rows


def aggregate(attn: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    """ContMix's call: ``value`` is a channels-last ``(B, G*C, H, W)`` map."""
    b, g, h, w, _ = attn.shape
    planar = value.reshape(b, g, -1, h, w).permute(0, 1, 3, 4, 2)  # (B, G, H, W, C) view
    return neighborhood_aggregate(attn, planar, backend=backend)


def bench_aggregation(runs: int) -> list[dict]:
    rows = []
    for b, g, (h, w), c, k in AGGREGATION:
        attn = torch.randn(b, g, h, w, k * k).softmax(-1).requires_grad_()
        value = channels_last(b, g * c, h, w, grad=True)
        grad = torch.randn(b, g, h, w, c)

        row = {'op': 'aggregation', 'shape': f'{b}x{g}x{h}x{w}x{c}, K={k}'}
        for route in AGGREGATION_ROUTES:
            row[f'{route}_fwd_ms'] = median_ms(runs, forward, aggregate, attn, value, route)
            row[f'{route}_fwd_bwd_ms'] = median_ms(runs, forward_backward, aggregate, grad,
                                                   attn, value, route)
        rows.append(row)
    return rows


def bench_gelu(runs: int) -> list[dict]:
    rows = []
    for b, c, size in GELU_SHAPES:
        for scale in GELU_SCALES:
            x = channels_last(b, c, size, size, grad=True)
            with torch.no_grad():
                x.mul_(scale)
            grad = channels_last(b, c, size, size)
            rows.append({
                'op': 'gelu', 'shape': f'{b}x{c}x{size}x{size}, std {scale:g}',
                'pytorch_fwd_ms': median_ms(runs, forward, F.gelu, x),
                'ours_fwd_ms': median_ms(runs, forward, gelu, x),
                'pytorch_fwd_bwd_ms': median_ms(runs, forward_backward, F.gelu, grad, x),
                'ours_fwd_bwd_ms': median_ms(runs, forward_backward, gelu, grad, x)})
    return rows


SECTIONS = {'pointwise': bench_pointwise, 'depthwise': bench_depthwise,
            'aggregation': bench_aggregation, 'gelu': bench_gelu}


def versus(theirs_fwd: float, ours_fwd: float, theirs_fwd_bwd: float, ours_fwd_bwd: float) -> str:
    """The ``fwd | fwd+bwd`` cells of PyTorch and ours and the two speed-ups, as table cells."""
    return (f"{theirs_fwd:.1f} ms | {ours_fwd:.1f} ms | {theirs_fwd_bwd:.1f} ms | "
            f"{ours_fwd_bwd:.1f} ms | {theirs_fwd / ours_fwd:.1f}x / "
            f"{theirs_fwd_bwd / ours_fwd_bwd:.1f}x")


def versus_table(rows: list[dict], op: str, title: str, theirs: str,
                 theirs_fwd_key: str) -> list[str]:
    """A table of ``op``'s rows: shape, then :func:`versus` cells (PyTorch's forward time under
    ``theirs_fwd_key``)."""
    header = (f'| {title} | {theirs} fwd | ours fwd | {theirs} fwd+bwd | ours fwd+bwd '
              '| speed-up fwd / fwd+bwd |')
    return ['', header, '|---|---|---|---|---|---|'] + [
        f"| {r['shape']} | " + versus(r[theirs_fwd_key], r['ours_fwd_ms'],
                                      r['pytorch_fwd_bwd_ms'], r['ours_fwd_bwd_ms']) + ' |'
        for r in rows if r['op'] == op]


def markdown(rows: list[dict], header: str) -> str:
    ops = {r['op'] for r in rows}
    lines = [header]
    if '1x1 conv' in ops:
        lines += ['', '| 1x1 conv | fwd GFLOP/s PyTorch / ours | PyTorch fwd | ours fwd '
                  '| PyTorch fwd+bwd | ours fwd+bwd | speed-up fwd / fwd+bwd |',
                  '|---|---|---|---|---|---|---|']
        lines += [f"| {r['shape']} | {r['gflops_fwd_pytorch']:.0f} / {r['gflops_fwd_ours']:.0f} | "
                  + versus(r['pytorch_fwd_ms'], r['ours_fwd_ms'], r['pytorch_fwd_bwd_ms'],
                           r['ours_fwd_bwd_ms']) + ' |'
                  for r in rows if r['op'] == '1x1 conv']
    if 'depthwise conv' in ops:
        lines += versus_table(rows, 'depthwise conv', 'depthwise conv', 'PyTorch', 'fwd_ms')
    if 'aggregation' in ops:
        routes = ' | '.join(AGGREGATION_ROUTES)
        lines += ['', f'| aggregation, fwd / fwd+bwd (ms) | {routes} |',
                  '|---|' + '---|' * len(AGGREGATION_ROUTES)]
        for r in rows:
            if r['op'] == 'aggregation':
                cells = ' | '.join(f"{r[f'{route}_fwd_ms']:.1f} / {r[f'{route}_fwd_bwd_ms']:.1f}"
                                   for route in AGGREGATION_ROUTES)
                lines.append(f"| {r['shape']} | {cells} |")
    if 'gelu' in ops:
        lines += versus_table(rows, 'gelu', 'GELU, channels-last', 'F.gelu', 'pytorch_fwd_ms')
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--sections', nargs='+', choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'ops'))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    rows = [row for name in args.sections for row in SECTIONS[name](args.runs)]
    command = 'python ' + ' '.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    cpu = cpu_record()
    header = (f'Measured {time.strftime("%Y-%m-%d")} on {platform.machine()} '
              f'{os.cpu_count()} cores ({args.threads} threads), median of {args.runs} runs, '
              f'torch {torch.__version__}.\nCPU: {cpu["cpu_model"]}; PyTorch CPU capability '
              f'{cpu["cpu_capability"]}; oneDNN ISA limit {cpu["onednn_max_cpu_isa"]}.\n'
              f'Command: `{command}`')
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps({'command': command, 'cpu': cpu, 'rows': rows},
                                                   indent=1))
    out.with_suffix('.md').write_text(markdown(rows, header))
    sys.stdout.write(markdown(rows, header))


if __name__ == '__main__':
    main()
