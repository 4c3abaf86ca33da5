"""benchmarks/backbone.py's ``--isa`` and ``--routes`` options: the measuring processes run under
the instruction set asked for, and the result files say what they ran on (CPU model, PyTorch's
CPU capability, oneDNN's ISA limit, threads, route mode, the seconds the route measuring cost)."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from types import ModuleType

import pytest
from helpers import load_benchmark

from mmoverlock.ops import cpu_routes
from mmoverlock.utils.benchmark import ISA_ENV_VARS, cpu_record, isa_environment

ROOT = Path(__file__).resolve().parents[1]


def load_backbone_benchmark() -> ModuleType:
    return load_benchmark('backbone')


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64'),
                    reason='AVX2 is an x86 instruction set')
def test_isa_avx2_reaches_the_measuring_processes(tmp_path: Path) -> None:
    """The smallest arch, a 64x64 image, one run: ours and the baseline, each in its own process,
    report PyTorch's capability AVX2 and the limits set; the files carry the new fields."""
    out = tmp_path / 'backbone'
    load_backbone_benchmark().main(['--archs', 'xt', '--modes', 'eval', '--eval-shapes', '64x64',
                                    '--runs', '1', '--threads', '1', '--no-peers',
                                    '--isa', 'avx2', '--out', str(out)])
    data = json.loads(out.with_suffix('.json').read_text())
    meta = data['meta']
    assert meta['isa'] == 'avx2' and meta['routes'] == 'measure'
    assert meta['cpu_capability'] == 'AVX2' and meta['onednn_max_cpu_isa'] == 'AVX2'
    assert meta['mkl_enable_instructions'] == 'AVX2' and meta['cpu_model'] == cpu_routes.cpu_model()
    assert meta['process_threads'] == '1' and meta['process_routes'] == 'measure'
    (row,) = data['rows']
    for impl in ('ours', 'baseline'):
        cpu = row[impl]['cpu']
        assert cpu['cpu_capability'] == 'AVX2' and cpu['aten_cpu_capability'] == 'avx2', impl
        assert cpu['threads'] == 1 and cpu['routes'] == 'measure'
        assert row[impl]['route_fraction'] == pytest.approx(
            row[impl]['route_seconds'] / row[impl]['median_s'])
    # ours timed its routes (in the warm-up run); the baseline runs PyTorch's own operators only
    assert row['ours']['cpu']['routes_measured'] > 0 and row['ours']['route_seconds'] > 0
    assert row['baseline']['cpu']['routes_measured'] == 0
    assert row['ours']['warmup_s'] > 0
    md = out.with_suffix('.md').read_text()
    assert 'PyTorch CPU capability AVX2; oneDNN ISA limit AVX2' in md and '`--isa avx2`' in md
    assert 'CPU routes: measure' in md and '| ours route measuring |' in md
    seconds = row['ours']['route_seconds']
    assert md.rstrip().splitlines()[-1].endswith(
        f"{seconds:.2f} s ({row['ours']['route_fraction']:.0%} of a run) |")


def test_worker_environment_sets_the_isa_and_route_mode() -> None:
    base = {'PATH': '/usr/bin', 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'ATEN_CPU_CAPABILITY': 'avx2'}
    native = isa_environment('native', base)
    assert native == {'PATH': '/usr/bin'}  # native: the processor's own, whatever was set
    assert base['ONEDNN_MAX_CPU_ISA'] == 'AVX2'  # the caller's environment is left alone
    avx2 = isa_environment('avx2', base)
    assert [avx2[name] for name in ISA_ENV_VARS] == ['AVX2', 'avx2', 'AVX2']
    avx512 = isa_environment('avx512', base)
    assert [avx512[name] for name in ISA_ENV_VARS] == ['AVX512_CORE', 'avx512', 'AVX512']
    with pytest.raises(ValueError, match='avx2'):
        isa_environment('sse4')
    backbone = load_backbone_benchmark()
    env = backbone.worker_env(dict(isa='avx2', routes='fixed'))
    assert env[cpu_routes.MODE_ENV] == 'fixed' and env['ONEDNN_MAX_CPU_ISA'] == 'AVX2'
    with pytest.raises(SystemExit):
        backbone.main(['--isa', 'sse4'])
    with pytest.raises(SystemExit):
        backbone.main(['--routes', 'sometimes'])


def test_cpu_record_reports_the_route_mode_and_cost() -> None:
    cpu_routes.clear_routes()
    try:
        with cpu_routes.routes_mode('fixed'):
            record = cpu_record()
            assert record['routes'] == 'fixed' and record['route_seconds'] == 0
        with cpu_routes.routes_mode('measure'):
            cpu_routes.choose('op', (1,), {'a': lambda: sum(range(10 ** 5)), 'b': lambda: None},
                              'a')
            record = cpu_record()
        assert record['routes'] == 'measure' and record['routes_measured'] == 1
        assert record['route_seconds'] > 0
    finally:
        cpu_routes.clear_routes()


def test_selective_cp_option_reaches_ours_only() -> None:
    backbone = load_backbone_benchmark()
    assert backbone.selective_cp_arg(['all']) is True
    assert backbone.selective_cp_arg(['none']) is False
    assert backbone.selective_cp_arg(['blocks3', 'sub_blocks3']) == ['blocks3', 'sub_blocks3']
    from mmoverlock.utils.benchmark import route
    with route('ours'):  # build() sets the process-wide switches; restored afterwards
        ours = backbone.build('ours', 'xt', False, selective_cp=['blocks3', 'sub_blocks3'])
        assert ours.selective_cp == ('blocks3', 'sub_blocks3')
        baseline = backbone.build('baseline', 'xt', False, selective_cp=['blocks3'])
        assert baseline.selective_cp is False  # the baseline runs plain autograd
