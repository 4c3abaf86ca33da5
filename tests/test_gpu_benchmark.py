"""benchmarks/gpu.py on the CPU: every code path of the GPU benchmark (``--device cpu --quick``,
tiny images) and the structure of its result files."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu.py'
SECTIONS = ['copy_bandwidth', 'kernel_bandwidth', 'profile', 'depthwise', 'classification',
            'peers', 'dense_training']


def load_gpu_benchmark():
    spec = importlib.util.spec_from_file_location('mmoverlock_benchmarks_gpu', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> dict:
    """One ``--device cpu --quick --archs xt`` run (in-process): the JSON, the Markdown, the
    returned data."""
    saved = os.environ.pop('TRITON_INTERPRET', None)  # the kernel section: skipped on the CPU
    try:
        out = tmp_path_factory.mktemp('gpu_bench') / 'gpu'
        data = load_gpu_benchmark().run(['--device', 'cpu', '--quick', '--archs', 'xt',
                                         '--out', str(out)])
    finally:
        if saved is not None:
            os.environ['TRITON_INTERPRET'] = saved
    return dict(data=data, json=json.loads(out.with_suffix('.json').read_text()),
                md=out.with_suffix('.md').read_text())


def test_meta_describes_the_run(quick_run: dict) -> None:
    meta = quick_run['json']['meta']
    assert quick_run['json'] == json.loads(json.dumps(quick_run['data']))  # the file is the run
    assert meta['command'] == ('python benchmarks/gpu.py --device cpu --quick --archs xt --out '
                               + meta['command'].split('--out ')[1])
    assert meta['status'] == 'complete'
    assert meta['dtype'] == 'bf16' and meta['settings']['dtype'] == 'bf16'
    machine = meta['machine']
    assert machine['device_type'] == 'cpu' and machine['name'].startswith('CPU: ')
    assert machine['versions']['torch'] == torch.__version__
    assert set(machine['versions']) >= {'cuda', 'triton', 'timm', 'mmdet', 'python'}
    assert meta['aggregation_backend'] == {'ours': 'torch', 'baseline': 'unfold'}
    settings = meta['settings']
    assert settings['archs'] == ['xt'] and settings['image_size'] == 64
    assert settings['batch'] == 2 and settings['dense_shapes'] == [[1, 64, 64], [1, 64, 96]]
    md = quick_run['md']
    assert 'Command: `python benchmarks/gpu.py --device cpu --quick --archs xt' in md
    assert '**CPU: ' in md and f"torch {torch.__version__}" in md and 'dtype: **bf16**' in md


def test_sections_and_rows(quick_run: dict) -> None:
    sections = quick_run['json']['sections']
    assert list(sections) == SECTIONS
    for section in sections.values():
        assert section['title'] in quick_run['md']
    cls = sections['classification']['rows']
    assert [(r['impl'], r['mode']) for r in cls] == [
        ('ours', 'infer'), ('ours', 'train'), ('baseline', 'infer'), ('baseline', 'train')]
    for row in cls + sections['peers']['rows'] + sections['dense_training']['rows']:
        assert row['status'] == 'ok', row
        assert row['fps'] == pytest.approx(row['batch'] / row['median_s'])
        assert len(row['times_s']) == row['iters'] == 1
        assert row['peak_cuda_mib'] is None  # no CUDA memory on the CPU
    assert all(r['batch'] == r['batch_requested'] == 2 and r['input'] == '64x64' for r in cls)
    # same weights: the baseline's logits equal ours up to the route's rounding
    probe = next(r for r in cls if r['impl'] == 'baseline' and r['mode'] == 'infer')
    assert probe['ours_max_abs'] > 0
    assert probe['max_abs_diff_vs_ours'] <= 0.05 * probe['ours_max_abs']
    peers = [(r['model'], r['layout'], r['mode']) for r in sections['peers']['rows']]
    assert peers == [(m, lay, mode) for m, lay in (('convnext_tiny', 'NCHW'),
                                                   ('convnext_tiny', 'channels_last'),
                                                   ('swin_t', 'tokens'))
                     for mode in ('infer', 'train')]
    dense = [(r['input'], r['impl'], r['batch']) for r in sections['dense_training']['rows']]
    assert dense == [('1x3x64x64', 'ours', 1), ('1x3x64x64', 'baseline', 1),
                     ('1x3x64x96', 'ours', 1), ('1x3x64x96', 'baseline', 1)]
    copy = sections['copy_bandwidth']['rows']
    assert len(copy) == 1 and copy[0]['gbs'] == pytest.approx(
        2 * copy[0]['tensor_mib'] * 2**20 / (copy[0]['median_ms'] / 1e3) / 1e9)
    assert sections['kernel_bandwidth']['rows'] == []
    assert 'need a CUDA device' in sections['kernel_bandwidth']['note']
    assert '| overlock_xt | baseline | infer | 64x64 | 2 |' in quick_run['md']


def test_profile_splits_each_step_into_categories_and_kernels(quick_run: dict) -> None:
    rows = quick_run['json']['sections']['profile']['rows']
    for mode in ('infer', 'train', 'train, no recompute'):
        mine = [r for r in rows if r['mode'] == mode]
        step = [r for r in mine if r['kind'] == 'step']
        categories = [r for r in mine if r['kind'] == 'category']
        kernels = [r for r in mine if r['kind'] == 'kernel']
        assert len(step) == 1 and step[0]['ms'] > 0 and step[0]['busy_ms'] > 0
        # the categories partition the kernels' summed time; the top kernels are a part of it
        assert sum(r['ms'] for r in categories) == pytest.approx(step[0]['busy_ms'])
        assert sum(r['pct'] for r in categories) == pytest.approx(100)
        assert 0 < len(kernels) <= 15 and sum(r['ms'] for r in kernels) <= step[0]['busy_ms']
        assert [r['ms'] for r in kernels] == sorted((r['ms'] for r in kernels), reverse=True)
        # OverLoCK is convolutions first: they must be found by name (on the CPU: ATen ops)
        assert 'convolution' in {r['name'] for r in categories}
    assert any(r['mode'] == 'train' and r['category'] == 'optimizer'
               for r in rows if r['kind'] == 'kernel') or any(
        r['name'] == 'optimizer' for r in rows if r['kind'] == 'category')
    assert '| train | category | convolution |' in quick_run['md']
    # without selective recomputation the backward recomputes nothing: fewer operators run
    calls = {r['mode']: r['calls'] for r in rows if r['kind'] == 'step'}
    assert calls['train, no recompute'] < calls['train']


def test_depthwise_section_times_each_stage_in_both_layouts(quick_run: dict) -> None:
    rows = quick_run['json']['sections']['depthwise']['rows']
    cases = [(r['stage'], r['kernel'], r['dilation'], r['layout']) for r in rows]
    # OverLoCK-T: large kernels 17 / 15 / 13 / 7, each with its most dilated 3x3 branch
    expected = [(stage, k, d, layout)
                for stage, pairs in ((1, [(17, 1), (3, 7), (3, 1)]), (2, [(15, 1), (3, 7), (3, 1)]),
                                     (3, [(13, 1), (3, 5), (3, 1)]), (4, [(7, 1), (3, 3), (3, 1)]))
                for k, d in pairs for layout in ('channels_last', 'NCHW')]
    assert cases == expected
    for r in rows:
        assert r['status'] == 'ok', r
        macs = r['batch'] * r['channels'] * r['size'] ** 2 * r['kernel'] ** 2
        assert r['fwd_gmacs'] == pytest.approx(macs / (r['fwd_ms'] / 1e3) / 1e9)
        assert r['fwd_bwd_gmacs'] == pytest.approx(3 * macs / (r['fwd_bwd_ms'] / 1e3) / 1e9)
    assert '| 1 | 64x16x16 | 17 | 1 | channels_last |' in quick_run['md']


def test_kernel_categories_by_name() -> None:
    gpu = load_gpu_benchmark()
    assert gpu.kernel_category('_na_forward_kernel') == 'aggregation (Triton)'
    assert gpu.kernel_category('sm90_xmma_fprop_implicit_gemm_bf16bf16_nhwc') == 'convolution'
    assert gpu.kernel_category('nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN') == 'matmul'
    assert gpu.kernel_category('void at::native::batch_norm_collect_statistics_kernel') == (
        'normalisation')
    assert gpu.kernel_category('something_unheard_of') == 'other'


def test_ratios_follow_from_rows(quick_run: dict) -> None:
    sections, ratios = quick_run['json']['sections'], quick_run['json']['ratios']

    def row(section: str, **match) -> dict:
        return next(r for r in sections[section]['rows']
                    if all(r[k] == v for k, v in match.items()))

    for mode in ('train', 'infer'):
        ours = row('classification', impl='ours', mode=mode)['fps']
        base = row('classification', impl='baseline', mode=mode)['fps']
        convnext = max(r['fps'] for r in sections['peers']['rows']
                       if r['model'] == 'convnext_tiny' and r['mode'] == mode)
        assert ratios[f'classification_{mode}_speedup_xt']['value'] == pytest.approx(ours / base)
        goal = ratios[f'classification_{mode}_vs_convnext_tiny']
        assert goal['value'] == pytest.approx(ours / convnext) and goal['arch'] == 'xt'
    for shape in ('1x3x64x64', '1x3x64x96'):
        speedup = ratios[f'dense_train_speedup_{shape}']['value']
        assert speedup == pytest.approx(row('dense_training', input=shape, impl='ours')['fps']
                                        / row('dense_training', input=shape,
                                              impl='baseline')['fps'])
        memory = ratios[f'dense_peak_memory_ratio_{shape}']
        assert memory['value'] is None and 'CPU' in memory['missing']
    assert ratios['kernel_pct_of_copy']['value'] is None
    assert '| classification_train_speedup_xt |' in quick_run['md']


def test_budget_leaves_a_partial_file(tmp_path: Path) -> None:
    out = tmp_path / 'partial'
    data = load_gpu_benchmark().run(['--device', 'cpu', '--quick', '--budget', '1e-9',
                                     '--sections', 'copy_bandwidth', 'classification',
                                     '--out', str(out)])
    saved = json.loads(out.with_suffix('.json').read_text())
    assert saved['meta']['status'].startswith('partial: budget')
    assert data['meta']['status'] == saved['meta']['status']
    rows = saved['sections']['classification']['rows']
    assert [(r['impl'], r['mode'], r['status']) for r in rows] == [
        (impl, mode, 'skipped') for impl in ('ours', 'baseline') for mode in ('infer', 'train')]
    assert saved['sections']['copy_bandwidth']['rows'][0]['status'] == 'skipped'
    assert saved['sections']['peers']['note'] == 'not run (--sections)'
    assert saved['ratios']['classification_train_speedup_xt']['value'] is None
    assert 'skipped' in out.with_suffix('.md').read_text()
    # a negative budget (what is left before a caller's timeout) runs nothing; 0 means no limit
    negative = load_gpu_benchmark().run(['--device', 'cpu', '--quick', '--budget', '-5',
                                         '--sections', 'copy_bandwidth', '--out', str(out)])
    assert negative['sections']['copy_bandwidth']['rows'][0]['status'] == 'skipped'


def test_bad_arguments_are_refused() -> None:
    gpu = load_gpu_benchmark()
    with pytest.raises(SystemExit, match='--device cpu runs only with --quick'):
        gpu.run(['--device', 'cpu'])
    with pytest.raises(SystemExit, match='--iters must be at least 1'):
        gpu.run(['--device', 'cpu', '--quick', '--iters', '0'])
    assert gpu.parse_dense_shape('2x3x800x1216') == gpu.parse_dense_shape('2x800x1216') == (
        2, 800, 1216)
    with pytest.raises(Exception, match='expected BxHxW'):
        gpu.parse_dense_shape('2x800')


def test_kernel_section_under_the_triton_interpreter(tmp_path: Path) -> None:
    """The kernel section through benchmarks/triton_bandwidth.py (TRITON_INTERPRET=1 must be set
    before Triton is imported: a subprocess), and its % of the copy bandwidth."""
    out = tmp_path / 'kernels'
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(SCRIPT), '--device', 'cpu', '--quick',
                           '--sections', 'copy_bandwidth', 'kernel_bandwidth', '--out', str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix('.json').read_text())
    rows = data['sections']['kernel_bandwidth']['rows']
    assert [r['shape'] for r in rows] == ['1x2x9x11x4x5', '1x1x13x14x3x13']
    copy_gbs = data['sections']['copy_bandwidth']['rows'][0]['gbs']
    for r in rows:
        assert r['status'] == 'ok' and r['dtype'] == 'float32'
        assert r['forward_gbs'] == pytest.approx(r['forward_mb'] / r['forward_ms'])  # MB/ms = GB/s
        key = f"kernel_backward_pct_of_copy_{r['shape']}_float32"
        assert data['ratios'][key]['value'] == pytest.approx(100 * r['backward_gbs'] / copy_gbs)
    assert data['meta']['status'] == 'complete'


class OutOfMemoryAbove(torch.nn.Module):
    """A classifier that runs out of (CUDA) memory on batches larger than ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.head = torch.nn.Conv2d(3, 1000, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB')
        return self.head(x).mean((2, 3))


def test_batch_halves_on_out_of_memory() -> None:
    gpu = load_gpu_benchmark()
    case = gpu.Case(torch.device('cpu'), torch.float32, iters=2, warmup=1)
    model = OutOfMemoryAbove(limit=5)
    for mode in ('train', 'infer'):
        fields = case.measure(model, mode, 16, 8, 8, halve=True)
        assert fields['status'] == 'ok' and fields['batch_requested'] == 16
        assert fields['batch_size'] == 4 and len(fields['times_s']) == 2  # 16 -> 8 -> 4
    fields = case.measure(model, 'train', 16, 8, 8, halve=False)  # dense cases keep the batch
    assert fields['status'] == 'oom' and fields['batch_size'] == 16
    assert 'out of memory' in fields['error']
    assert gpu.is_oom(RuntimeError('CUDA error: out of memory'))
    assert not gpu.is_oom(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    model.limit = -1  # every batch fails: reported at batch 1, not an endless loop
    assert case.measure(model, 'infer', 3, 8, 8, halve=True)['batch_size'] == 1


def test_long_cases_time_fewer_iterations() -> None:
    gpu = load_gpu_benchmark()
    model = OutOfMemoryAbove(limit=100)
    slow = gpu.Case(torch.device('cpu'), torch.float32, iters=10, warmup=1, max_case_s=1e-6)
    fields = slow.measure(model, 'infer', 2, 8, 8, halve=True)
    assert fields['iters'] == 3 and fields['iters_requested'] == 10
    unlimited = gpu.Case(torch.device('cpu'), torch.float32, iters=5, warmup=1)
    assert unlimited.measure(model, 'infer', 2, 8, 8, halve=True)['iters'] == 5
