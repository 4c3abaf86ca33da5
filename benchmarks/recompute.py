"""Training step time and peak memory of OverLoCK per recomputation setting (``selective_cp``).

Times are compared within one process: the settings take turns on the same model (round-robin,
``--rounds`` rounds after one warm-up step), so a drift of the machine's speed hits each alike;
the table gives each setting's median and its ratio to the default (``all``). Peak memory is the
peak RSS of a fresh process per setting running two steps (glibc malloc tuned as the tools do).

    python benchmarks/recompute.py --archs t xt --threads 1 \\
        --out benchmarks/results/recompute_native_1t

Writes ``OUT.json`` and ``OUT.md`` (command, CPU model, PyTorch's CPU capability, oneDNN's ISA).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Union

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
#: name -> OverLoCK's ``selective_cp``
SETTINGS: dict[str, Union[bool, tuple[str, ...]]] = {
    'all': True,
    'stages 1-3 (blocks1 blocks2 blocks3)': ('blocks1', 'blocks2', 'blocks3'),
    'none': False,
}


def _model(arch: str, threads: int):
    import torch

    from mmoverlock.models.backbones.overlock import OverLoCK
    from mmoverlock.utils.cpu_allocator import keep_freed_memory
    torch.set_num_threads(threads)
    keep_freed_memory()
    torch.manual_seed(0)
    model = OverLoCK(arch)
    model.init_weights()
    return model.train()


def _step(model, x) -> float:
    start = time.perf_counter()
    outs = model(x)
    sum(o.float().mean() for o in outs).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def interleaved_times(arch: str, size: int, batch: int, rounds: int,
                      threads: int) -> dict[str, list[float]]:
    """Seconds per training step of each setting, the settings taking turns on one model."""
    import torch
    model = _model(arch, threads)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    _step(model, x)  # warm-up: route measuring, allocator
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, setting in SETTINGS.items():
            model.selective_cp = model.check_selective_cp(setting)
            times[name].append(_step(model, x))
    return times


def peak_rss_worker(spec: dict) -> dict:
    import resource

    import torch
    model = _model(spec['arch'], spec['threads'])
    model.selective_cp = model.check_selective_cp(SETTINGS[spec['setting']])
    x = torch.randn(spec['batch'], 3, spec['size'], spec['size'])
    for _ in range(2):
        _step(model, x)
    return dict(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_rss(spec: dict) -> int:
    proc = subprocess.run([sys.executable, __file__, '--worker', json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f'worker failed for {spec}:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])['peak_rss']


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Measured {meta['date']}: `{meta['command']}`",
             f"CPU: {meta['cpu_model']}; PyTorch CPU capability {meta['cpu_capability']}; oneDNN "
             f"ISA limit {meta['onednn_max_cpu_isa']}; {meta['threads']} thread(s); "
             f"{meta['rounds']} interleaved rounds after a warm-up step.", '',
             '| arch | input | selective_cp | step (median) | time vs all | peak RSS | '
             'memory vs all |', '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['arch']} | {r['batch']}x3x{r['size']}x{r['size']} | {r['setting']} | "
                     f"{r['median_s']:.2f} s | {r['time_ratio']:.2f}x | "
                     f"{r['peak_rss'] / 2**30:.2f} GB | {r['memory_ratio']:.2f}x |")
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--archs', nargs='+', default=['t'])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default=str(RESULTS / 'recompute'))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(peak_rss_worker(json.loads(args.worker))))
        return
    from mmoverlock.ops.cpu_routes import describe_cpu
    from mmoverlock.utils.benchmark import invocation, save_results
    # the memory workers first: Linux keeps a process's peak RSS across fork and exec, so they
    # must start from this process before it has run a model
    peaks = {(arch, name): peak_rss(dict(arch=arch, setting=name, size=args.size,
                                         batch=args.batch, threads=args.threads))
             for arch in args.archs for name in SETTINGS}
    rows = []
    for arch in args.archs:
        times = interleaved_times(arch, args.size, args.batch, args.rounds, args.threads)
        base = statistics.median(times['all'])
        for name in SETTINGS:
            median = statistics.median(times[name])
            rows.append(dict(arch=arch, size=args.size, batch=args.batch, setting=name,
                             times=times[name], median_s=median, time_ratio=median / base,
                             peak_rss=peaks[arch, name],
                             memory_ratio=peaks[arch, name] / peaks[arch, 'all']))
    meta = dict(date=time.strftime('%Y-%m-%d'), threads=args.threads, rounds=args.rounds,
                command=invocation(__file__, argv, ROOT), **describe_cpu())
    save_results(args.out, meta, rows, markdown(rows, meta))


if __name__ == '__main__':
    main()
