"""Speed and memory of the OverLoCK backbone against the unfold baseline and mmdet's Swin-T.

Every measurement runs in a fresh subprocess (so that its peak RSS is its own) and reports the
median wall time of ``--runs`` timed repetitions after one warm-up. Implementations:

- ``ours``: mmoverlock as shipped (channels-last layout, the aggregation as a sparse matrix
  product, 1x1 convolutions on oneDNN, the faster depthwise backward, selective recomputation in
  training);
- ``baseline``: the same network run as the authors' code runs it: the aggregation route
  re-implemented from the spec (values unfolded into every window, window grid replicate-padded:
  ``backend='unfold'``), the ordinary contiguous (NCHW) layout, PyTorch's own convolutions
  (``F.conv2d``, forward and backward) and plain autograd (``selective_cp=False``);
- ``swin``: mmdet's Swin-T backbone, the peer users would otherwise pick.

glibc malloc is switched to reuse freed memory (``mmoverlock.utils.cpu_allocator``, what the
tools do) in every worker by default (``--malloc-tuning both``), so that the ratios compare the
implementations; ``--malloc-tuning ours`` leaves the baseline and Swin-T on default malloc.

Modes: ``eval`` (training form), ``deploy`` (re-parameterised), ``train`` (forward + backward of a
batch), ``train-cp`` (the same with ``with_cp=True`` for ours: every block recomputed; the baseline
as in ``train``). Ours and the baseline start from the same weights; their eval outputs are compared
(max abs difference) in the same run.

    python benchmarks/backbone.py                       # T: 1x3x512x512 eval, 2x3x512x512 train
    python benchmarks/backbone.py --archs xt t s b --eval-shapes 512x512 800x1216
    python benchmarks/backbone.py --plot-sizes 256 384 512 640 768
    python benchmarks/backbone.py --isa avx2 --out benchmarks/results/backbone_t_avx2

``--isa avx2`` runs every measuring process as on an AVX2-only CPU (e.g. AMD EPYC Zen 3) by
limiting oneDNN, PyTorch's kernels and MKL (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2``, set before torch is imported); ``--isa avx512`` likewise to
AVX-512 without AMX; ``--isa native`` (default) removes those variables. ``--routes measure``
(default) lets mmoverlock time its equivalent CPU routes the first time it sees a shape,
``--routes fixed`` takes their fixed defaults (``mmoverlock.ops.cpu_routes``).
``--selective-cp`` sets ours' selective recomputation in training: ``all`` (default), ``none``
or the block lists where it applies (OverLoCK's ``selective_cp``).

Writes ``benchmarks/results/backbone.json``, ``.md`` and (with --plot-sizes) ``.png``. Both record
the CPU model, PyTorch's CPU capability and oneDNN's ISA limit as the measuring processes saw
them, the thread count, the route mode, and per process the seconds its route measuring cost
(spent in the warm-up run, outside the timed runs), next to the time of a run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_MODES = ('train', 'train-cp')
RESULTS = ROOT / 'benchmarks' / 'results'


# ------------------------------------------------------------------------------------------------
# Worker: one implementation, one mode, one shape, in its own process
# ------------------------------------------------------------------------------------------------
def build(impl: str, arch: str, deploy: bool, with_cp: bool = False,
          selective_cp: bool | list[str] | None = None):
    import torch
    torch.manual_seed(0)
    if impl == 'swin':
        from mmdet.models.backbones import SwinTransformer
        return SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                               window_size=7, out_indices=(0, 1, 2, 3))
    from mmoverlock.models.backbones.overlock import OverLoCK
    from mmoverlock.utils.benchmark import apply_route, route_kwargs
    # the baseline: the authors' aggregation route, PyTorch's own convolutions (forward and
    # backward), NCHW, plain autograd; the switches stay set for the rest of the process
    apply_route(impl)
    kwargs = route_kwargs(impl)
    if impl == 'ours' and selective_cp is not None:
        kwargs['selective_cp'] = selective_cp
    model = OverLoCK(arch, with_cp=impl == 'ours' and with_cp, **kwargs)
    model.init_weights()
    if deploy:
        model.eval().reparameterize()
    return model


def worker(spec: dict) -> dict:
    import resource

    import torch
    if spec['impl'] == 'baseline':
        os.environ['MMOVERLOCK_NA_BACKEND'] = 'unfold'
    torch.set_num_threads(spec['threads'])
    if spec['malloc_tuning'] == 'both' or (spec['malloc_tuning'] == 'ours'
                                           and spec['impl'] == 'ours'):
        from mmoverlock.utils.cpu_allocator import keep_freed_memory
        keep_freed_memory()
    model = build(spec['impl'], spec['arch'], spec['mode'] == 'deploy',
                  with_cp=spec['mode'] == 'train-cp', selective_cp=spec.get('selective_cp'))
    batch, (h, w) = spec['batch'], spec['shape']
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    times = []
    if spec['mode'] in TRAIN_MODES:
        model.train()
        for _ in range(spec['runs'] + 1):
            start = time.perf_counter()
            outs = model(x)
            sum(o.float().mean() for o in outs).backward()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            del outs
    else:
        model.eval()
        with torch.no_grad():
            for _ in range(spec['runs'] + 1):
                start = time.perf_counter()
                outs = model(x)
                times.append(time.perf_counter() - start)
        if spec.get('save'):
            torch.save([o.contiguous() for o in outs], spec['save'])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    from mmoverlock.utils.benchmark import cpu_record
    return dict(spec, times=times[1:], median_s=statistics.median(times[1:]), peak_rss=peak,
                warmup_s=times[0], cpu=cpu_record())


def worker_env(spec: dict) -> dict[str, str]:
    """The environment of a worker process: its instruction set (``spec['isa']``) and CPU route
    mode (``spec['routes']``)."""
    from mmoverlock.ops.cpu_routes import MODE_ENV
    from mmoverlock.utils.benchmark import isa_environment
    env = isa_environment(spec.get('isa', 'native'))
    env[MODE_ENV] = spec.get('routes', 'measure')
    return env


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, '--worker', json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, env=worker_env(spec))
    if proc.returncode != 0:
        raise RuntimeError(f'benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, int]:
    h, _, w = text.partition('x')
    return int(h), int(w or h)


def selective_cp_arg(values: list[str]) -> bool | list[str]:
    """``--selective-cp`` as OverLoCK's ``selective_cp``: ``all`` -> True, ``none`` -> False,
    else the block-list names."""
    if values == ['all']:
        return True
    if values == ['none']:
        return False
    return list(values)


def gb(n: float) -> str:
    return f'{n / 2**30:.2f} GB'


def max_abs_diff(a: str, b: str) -> float:
    import torch
    outs_a = torch.load(a, weights_only=True)
    outs_b = torch.load(b, weights_only=True)
    return max((x - y).abs().max().item() for x, y in zip(outs_a, outs_b))


def measure_pair(arch: str, mode: str, batch: int, shape: tuple[int, int], args,
                 peers: bool) -> dict:
    """Ours vs baseline (and Swin-T) for one setting; returns one table row."""
    row: dict[str, Any] = dict(arch=arch, mode=mode, batch=batch, shape=list(shape))
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for impl in ('ours', 'baseline'):
            spec = dict(impl=impl, arch=arch, mode=mode, batch=batch, shape=shape,
                        runs=args.runs, threads=args.threads, malloc_tuning=args.malloc_tuning,
                        isa=args.isa, routes=args.routes,
                        selective_cp=selective_cp_arg(args.selective_cp))
            if mode not in TRAIN_MODES:
                spec['save'] = os.path.join(tmp, f'{impl}.pt')
            results[impl] = run_worker(spec)
        if mode not in TRAIN_MODES:
            row['max_abs_diff'] = max_abs_diff(results['ours']['save'],
                                               results['baseline']['save'])
    if peers and mode in ('eval', 'train'):
        results['swin'] = run_worker(dict(impl='swin', arch='t', mode=mode, batch=batch,
                                          shape=shape, runs=args.runs, threads=args.threads,
                                          malloc_tuning=args.malloc_tuning, isa=args.isa,
                                          routes=args.routes))
    for impl, res in results.items():
        row[impl] = dict(median_s=res['median_s'], times=res['times'], peak_rss=res['peak_rss'],
                         warmup_s=res['warmup_s'], cpu=res['cpu'],
                         route_seconds=res['cpu']['route_seconds'],
                         route_fraction=res['cpu']['route_seconds'] / res['median_s'])
    row['speedup'] = row['baseline']['median_s'] / row['ours']['median_s']
    row['memory_ratio'] = row['ours']['peak_rss'] / row['baseline']['peak_rss']
    if 'swin' in row:
        row['vs_swin'] = row['ours']['median_s'] / row['swin']['median_s']
    return row


def cpu_meta(rows: list[dict], args) -> dict:
    """What the result files say about the measuring processes: the CPU model, PyTorch's CPU
    capability, oneDNN's ISA limit, MKL's setting, the thread count and the route mode as the
    processes reported them (each distinct value, joined), and the options asked for."""
    records = [r[impl]['cpu'] for r in rows for impl in ('ours', 'baseline', 'swin') if impl in r]
    meta: dict[str, Any] = dict(isa=args.isa, routes=args.routes,
                                selective_cp=' '.join(args.selective_cp))
    for name in ('cpu_model', 'cpu_capability', 'onednn_max_cpu_isa', 'mkl_enable_instructions',
                 'threads', 'routes'):
        values = sorted({str(rec[name]) for rec in records})
        key = f'process_{name}' if name in ('threads', 'routes') else name
        meta[key] = ', '.join(values) or '-'
    return meta


def markdown(rows: list[dict], meta: dict) -> str:
    cpu = (f"CPU: {meta.get('cpu_model', '?')}; PyTorch CPU capability "
           f"{meta.get('cpu_capability', '?')}; oneDNN ISA limit "
           f"{meta.get('onednn_max_cpu_isa', '?')}; MKL instructions "
           f"{meta.get('mkl_enable_instructions', '?')} (`--isa {meta.get('isa', 'native')}`); "
           f"CPU routes: {meta.get('routes', 'measure')}; ours' selective recomputation: "
           f"{meta.get('selective_cp', 'all')}. Route measuring: seconds each process "
           'spent timing its CPU routes (in the warm-up run), and as a fraction of one timed run.')
    lines = [f"Measured {meta['date']} on {meta['machine']} ({meta['threads']} threads), "
             f"median of {meta['runs']} runs after one warm-up, peak RSS of a fresh process, "
             f"malloc tuning: {meta['malloc_tuning']}.", cpu,
             f"Command: `{meta['command']}`", '',
             '| arch | mode | input | ours | baseline (unfold) | speed-up | ours peak RSS | '
             'baseline peak RSS | memory ratio | Swin-T | ours / Swin-T | max abs diff | '
             'ours route measuring |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        swin = r.get('swin')
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r['batch']}x3x{r['shape'][0]}x{r['shape'][1]} | "
            f"{r['ours']['median_s']:.2f} s | {r['baseline']['median_s']:.2f} s | "
            f"{r['speedup']:.1f}x | {gb(r['ours']['peak_rss'])} | "
            f"{gb(r['baseline']['peak_rss'])} | {r['memory_ratio']:.2f} | "
            + (f"{swin['median_s']:.2f} s | {r['vs_swin']:.2f}x | " if swin else '- | - | ')
            + (f"{r['max_abs_diff']:.1e} |" if 'max_abs_diff' in r else '- |')
            + f" {r['ours']['route_seconds']:.2f} s ({r['ours']['route_fraction']:.0%} of a run) |")
    return '\n'.join(lines) + '\n'


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [p['shape'][0] for p in points]
    for impl, label in (('ours', 'mmoverlock'), ('baseline', 'unfold baseline'),
                        ('swin', 'Swin-T (mmdet)')):
        if all(impl in p for p in points):
            ax.plot(sizes, [p[impl]['median_s'] for p in points], 'o-', label=label)
    ax.set_xlabel('input size (square)')
    ax.set_ylabel('eval forward time (s)')
    ax.set_title(f"OverLoCK-{points[0]['arch'].upper()} backbone, batch 1, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    from mmoverlock.utils.benchmark import ISAS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--archs', nargs='+', default=['t'])
    parser.add_argument('--eval-shapes', nargs='+', default=[(512, 512)], type=parse_shape)
    parser.add_argument('--train-shape', default='512x512', type=parse_shape)
    parser.add_argument('--train-batch', type=int, default=2)
    parser.add_argument('--modes', nargs='+', default=['eval', 'deploy', 'train'],
                        choices=['eval', 'deploy', 'train', 'train-cp'])
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--no-peers', action='store_true', help='skip Swin-T')
    parser.add_argument('--malloc-tuning', choices=['both', 'ours', 'none'], default='both',
                        help='processes in which glibc malloc reuses freed memory')
    parser.add_argument('--isa', choices=list(ISAS), default='native',
                        help='instruction set of the measuring processes: native, or avx2 / '
                        'avx512 emulated by limiting oneDNN, PyTorch and MKL (module docstring)')
    parser.add_argument('--routes', choices=['measure', 'fixed'], default='measure',
                        help="mmoverlock's equivalent CPU routes: timed per shape (measure) or "
                        'their fixed defaults (mmoverlock.ops.cpu_routes)')
    parser.add_argument('--selective-cp', nargs='+', default=['all'],
                        help="ours' selective recomputation in training: all (the default), "
                        'none, or the block lists where it applies (e.g. blocks1 blocks2 '
                        'blocks3)')
    parser.add_argument('--plot-sizes', nargs='*', type=int, default=[])
    parser.add_argument('--out', default=str(RESULTS / 'backbone'))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    rows = []
    for arch in args.archs:
        peers = arch == 't' and not args.no_peers
        for mode in args.modes:
            train = mode in TRAIN_MODES
            shapes = [args.train_shape] if train else args.eval_shapes
            for shape in shapes:
                batch = args.train_batch if train else 1
                row = measure_pair(arch, mode, batch, shape, args, peers)
                rows.append(row)
                print(markdown([row], dict(date='', machine='', threads=args.threads,
                                           runs=args.runs, command='',
                                           malloc_tuning=args.malloc_tuning)).splitlines()[-1],
                      flush=True)
    meta = dict(date=time.strftime('%Y-%m-%d'), machine=f'{platform.machine()} '
                f'{os.cpu_count()} cores', threads=args.threads, runs=args.runs,
                malloc_tuning=args.malloc_tuning,
                command='python ' + ' '.join([os.path.relpath(__file__, ROOT)]
                                             + (sys.argv[1:] if argv is None else argv)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = []
    for size in args.plot_sizes:
        points.append(measure_pair(args.archs[0], 'eval', 1, (size, size), args,
                                   peers=not args.no_peers))
    meta.update(cpu_meta(rows + points, args))
    out.with_suffix('.json').write_text(json.dumps(dict(meta=meta, rows=rows, plot=points),
                                                   indent=1))
    out.with_suffix('.md').write_text(markdown(rows, meta))
    if points:
        plot(points, out.with_suffix('.png'))
    print(markdown(rows, meta))


if __name__ == '__main__':
    main()
