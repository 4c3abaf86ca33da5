"""How long OverLoCK's dense convolutions alone take on this machine: a floor under its step time.

OverLoCK spends most of its multiply-adds in dense (ungrouped) convolutions, 1x1 for the most
part. Their time does not depend on how the rest of the network is computed, so at the fastest
rate this processor reaches on them it bounds from below the time any implementation of the
network needs. This script records every dense convolution of one forward pass of ours (eval:
batch 1; train: batch 2, training mode) with a ``TorchDispatchMode``, then times each distinct
shape alone by every route mmoverlock has for it and keeps the fastest:

- eval: the forward, ``F.conv2d`` or ``aten::mkldnn_convolution`` (oneDNN);
- train: forward and backward (input and weight gradient) by ``F.conv2d`` under autograd or, for
  1x1 kernels, :func:`mmoverlock.ops.pointwise_conv.pointwise_conv2d` (its routes measured).

The floor is the sum over convolutions of the fastest time (median of ``--runs``). With
``--goals FILE`` (a ``benchmarks/backbone.py`` result) each row also gives the time the issue's
goals ask for (baseline / 4 for inference, baseline / 2.5 for a training step, and Swin-T's time),
beside the floor.

    python benchmarks/dense_floor.py --archs t xt --threads 1 \\
        --goals benchmarks/results/matrix_gelu_native_1t.json \\
        --out benchmarks/results/dense_floor_native_1t
    python benchmarks/dense_floor.py --isa avx2 ...  # oneDNN / PyTorch / MKL limited to AVX2

Writes ``OUT.json`` and ``OUT.md`` (command, CPU model, PyTorch's CPU capability, oneDNN's ISA).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
#: (mode, batch) of the measured steps, as in benchmarks/backbone.py
MODES = {'eval': 1, 'train': 2}


def record_dense_convs(model, x, train: bool) -> Counter:
    """``Counter`` of (input shape, channels-last, weight shape, bias, stride, padding, dilation)
    of every dense convolution in one forward of ``model``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    convs: Counter = Counter()
    aten = torch.ops.aten

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (aten.convolution.default, aten.mkldnn_convolution.default):
                x_, w_, b_ = args[:3]
                if func is aten.convolution.default:
                    stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
                else:
                    padding, stride, dilation, groups = args[3], args[4], args[5], args[6]
                if groups == 1:
                    convs[(tuple(x_.shape), bool(x_.is_contiguous(memory_format=torch.channels_last)
                                                 and not x_.is_contiguous()),
                           tuple(w_.shape), b_ is not None, tuple(stride), tuple(padding),
                           tuple(dilation))] += 1
            return func(*args, **kwargs)

    model.train(train)
    with Recorder(), torch.set_grad_enabled(train):
        model(x)
    return convs


def conv_routes(key: tuple, train: bool) -> dict[str, Callable[[], Any]]:
    """Each way mmoverlock can compute one recorded convolution (forward, or forward and
    backward in training), on fresh random operands."""
    import torch
    import torch.nn.functional as F

    from mmoverlock.ops.pointwise_conv import pointwise_conv2d
    shape, channels_last, wshape, has_bias, stride, padding, dilation = key
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(train)
    w = torch.randn(wshape).requires_grad_(train)
    b = torch.randn(wshape[0]).requires_grad_(train) if has_bias else None

    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        if not train:
            return fn

        def step() -> None:
            out = fn()
            out.backward(torch.ones_like(out))
        return step

    routes = {'aten': run(lambda: F.conv2d(x, w, b, stride, padding, dilation))}
    if not train:
        routes['onednn'] = lambda: torch.ops.aten.mkldnn_convolution(
            x, w, b, list(padding), list(stride), list(dilation), 1)
    elif wshape[-2:] == (1, 1) and stride == (1, 1) and padding == (0, 0):
        routes['mmoverlock'] = run(lambda: pointwise_conv2d(x, w, b))
    return routes


def time_route(fn: Callable[[], Any], runs: int) -> float:
    import torch
    with torch.set_grad_enabled(True):
        fn()  # warm-up (primitive creation, route measuring)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(arch: str, mode: str, size: int, runs: int) -> dict[str, Any]:
    """Floor of one (arch, mode): dense-conv MACs and the summed fastest times."""
    import torch

    from mmoverlock.models.backbones.overlock import OverLoCK
    from mmoverlock.utils.cpu_allocator import keep_freed_memory
    keep_freed_memory()
    torch.manual_seed(0)
    model = OverLoCK(arch)
    model.init_weights()
    train = mode == 'train'
    convs = record_dense_convs(model, torch.randn(MODES[mode], 3, size, size), train)
    seconds = macs = 0.0
    per_route: Counter = Counter()
    for key, count in convs.items():
        shape, _, wshape, *_ = key
        routes = conv_routes(key, train)
        timings = {name: time_route(fn, runs) for name, fn in routes.items()}
        best = min(timings, key=timings.get)
        seconds += count * timings[best]
        per_route[best] += count
        out_pixels = shape[0] * (shape[2] // key[4][0]) * (shape[3] // key[4][1])
        macs += count * out_pixels * wshape[0] * wshape[1] * wshape[2] * wshape[3]
    factor = 3 if train else 1  # forward, input gradient, weight gradient
    return dict(arch=arch, mode=mode, batch=MODES[mode], size=size, convs=sum(convs.values()),
                shapes=len(convs), gmac=factor * macs / 1e9, floor_s=seconds,
                gmac_per_s=factor * macs / 1e9 / seconds, fastest_route_counts=dict(per_route))


def goals_of(path: str) -> dict[tuple[str, str], dict[str, float]]:
    """(arch, mode) -> the goal times of a benchmarks/backbone.py result."""
    data = json.loads(Path(path).read_text())
    out = {}
    for row in data['rows']:
        swin = row.get('swin', {}).get('median_s')
        factor = 4.0 if row['mode'] == 'eval' else 2.5
        out[(row['arch'], row['mode'])] = dict(
            ours_s=row['ours']['median_s'], baseline_goal_s=row['baseline']['median_s'] / factor,
            swin_goal_s=swin if row['mode'] == 'eval' else (swin or 0) * 1.5)
    for row in data['rows']:  # the XT rows of the matrix compare with the T row's Swin-T
        if row['arch'] != 't':
            t_row = out.get(('t', row['mode']))
            if t_row and t_row['swin_goal_s']:
                out[(row['arch'], row['mode'])]['swin_goal_s'] = t_row['swin_goal_s']
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']}: `{meta['command']}`",
             f"CPU: {meta['cpu_model']}; PyTorch CPU capability {meta['cpu_capability']}; oneDNN "
             f"ISA limit {meta['onednn_max_cpu_isa']}; {meta['threads']} thread(s); median of "
             f"{meta['runs']} runs per convolution.", '',
             '| arch | mode | input | dense convs | GMAC (train: x3) | floor | GMAC/s | ours | '
             'goal: baseline / 4 (eval), / 2.5 (train) | goal: Swin-T x1 (eval), x1.5 (train) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        g = r.get('goals', {})

        def s(v: Any) -> str:
            return f'{v:.2f} s' if v else '-'
        lines.append(f"| {r['arch']} | {r['mode']} | {r['batch']}x3x{r['size']}x{r['size']} | "
                     f"{r['convs']} ({r['shapes']} shapes) | {r['gmac']:.1f} | "
                     f"{r['floor_s']:.2f} s | {r['gmac_per_s']:.0f} | {s(g.get('ours_s'))} | "
                     f"{s(g.get('baseline_goal_s'))} | {s(g.get('swin_goal_s'))} |")
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archs', nargs='+', default=['t'])
    parser.add_argument('--modes', nargs='+', default=['eval', 'train'], choices=list(MODES))
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--isa', default='native', choices=['native', 'avx2', 'avx512'])
    parser.add_argument('--goals', help='a benchmarks/backbone.py result (.json) to compare with')
    parser.add_argument('--out', default=str(RESULTS / 'dense_floor'))
    args = parser.parse_args(argv)
    from mmoverlock.utils.benchmark import ISA_ENV_VARS, invocation, isa_environment, save_results
    env = isa_environment(args.isa)
    if any(os.environ.get(k) != env.get(k) for k in ISA_ENV_VARS):
        # the ISA variables act when torch loads: run again in a process that has them
        proc = subprocess.run([sys.executable, __file__, *(sys.argv[1:] if argv is None
                                                           else argv)], env=env, cwd=ROOT)
        raise SystemExit(proc.returncode)

    import torch

    from mmoverlock.ops.cpu_routes import describe_cpu
    torch.set_num_threads(args.threads)
    goals = goals_of(args.goals) if args.goals else {}
    rows = []
    for arch in args.archs:
        for mode in args.modes:
            row = measure(arch, mode, args.size, args.runs)
            if (arch, mode) in goals:
                row['goals'] = goals[(arch, mode)]
            rows.append(row)
    meta = dict(date=time.strftime('%Y-%m-%d'), command=invocation(__file__, argv, ROOT),
                threads=args.threads, runs=args.runs, isa=args.isa, goals_file=args.goals,
                **describe_cpu())
    save_results(args.out, meta, rows, markdown(rows, meta))


if __name__ == '__main__':
    main()
