"""GPU benchmark: OverLoCK throughput and memory, ours vs the authors' route, against peers.

One run, one card, one dtype (bf16 autocast by default). Sections, in the order they run (so that
a run cut short keeps what the issue's goals need first):

1. ``copy_bandwidth``: a device-to-device copy of a large tensor, the card's achievable bandwidth;
2. ``kernel_bandwidth``: the Triton aggregation kernels on OverLoCK-T's stage-3 maps (800x1216
   image, batch 2), measured by ``benchmarks/triton_bandwidth.py``, as % of that copy bandwidth;
3. ``profile``: one inference and one training step of OverLoCK-T (ours, the classification
   settings; training also without selective recomputation) under ``torch.profiler``: the step's
   wall time against its kernels' summed time, the kernels' time by category (convolution,
   Triton aggregation, matmul, norms, copies, ...) and the largest kernels;
   ``depthwise``: OverLoCK-T's depthwise convolutions alone (each stage's large kernel, its most
   dilated branch, a 3x3), forward and forward + backward, channels-last and NCHW;
4. ``classification``: OverLoCK classifiers (timm ``overlock_*``) at 224x224, batch 128:
   inference and training (forward + backward + AdamW step) images per second, ``ours`` and
   ``baseline`` with the same weights (OverLoCK-T first, the other archs at the end of the run);
5. ``peers``: timm's ``convnext_tiny`` (NCHW and channels-last; the ratios take the faster) and
   mmdet's Swin-T backbone (built as ``benchmarks/backbone.py`` builds it; no head), same settings;
6. ``dense_training``: training steps of the OverLoCK-T backbone (detection form) at
   2x3x800x1216 and 8x3x512x512 with the peak CUDA memory of each case, ours vs baseline.

``ours`` is mmoverlock as shipped (channels-last maps, Triton aggregation on CUDA, selective
recomputation in training); ``baseline`` is the same network run the way the authors' code runs
it: values unfolded into every window (``neighborhood_aggregate(..., backend='unfold')``), NCHW,
PyTorch's own convolutions, plain autograd (``mmoverlock.utils.benchmark.route``).

Timing: ``--warmup`` untimed iterations, then the median of ``--iters`` iterations, each ended by
``torch.cuda.synchronize`` (wall clock, ``perf_counter``). Classification and peers halve the batch
on running out of memory and record the batch used; dense cases keep theirs (the memory ratio
needs equal batches) and record the OOM. ``torch.cuda.max_memory_allocated`` is reset per case.

Results go to ``--out`` (``.json`` and ``.md``), rewritten after every case: a run stopped by
``--budget`` (remaining cases recorded as skipped), a timeout or a crash still leaves its file.
The exit status is 1 when a case failed with an error other than running out of memory.

    python benchmarks/gpu.py [--dtype bf16|fp16|fp32] [--archs xt t s b] [--out PREFIX]
    python benchmarks/gpu.py --quick                        # smoke run on the GPU
    python benchmarks/gpu.py --device cpu --quick           # smoke run of the code paths, CPU
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmoverlock.utils.benchmark import (  # noqa: E402
    IMPLEMENTATIONS,
    Timing,
    route,
    route_kwargs,
    time_callable,
)

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
KERNEL_DTYPE_NAMES = {torch.bfloat16: 'bfloat16', torch.float16: 'float16',
                      torch.float32: 'float32'}
ARCHS = ('xt', 't', 's', 'b')
SECTIONS = {
    'copy_bandwidth': 'Device-to-device copy (the card\'s achievable bandwidth)',
    'kernel_bandwidth': 'Triton aggregation kernels on OverLoCK-T\'s stage-3 maps',
    'profile': 'Where one step of OverLoCK (ours) spends its time (torch.profiler)',
    'depthwise': 'OverLoCK-T\'s depthwise convolutions alone: memory layouts',
    'classification': 'OverLoCK classifiers: inference and training throughput',
    'peers': 'Peers at the same settings',
    'dense_training': 'Dense training steps (OverLoCK backbone, detection form)',
}
DEFAULT_DENSE = ['2x800x1216', '8x512x512']
#: (image size, batch, dense shapes, iterations, warm-up) of --quick, by device type
QUICK = {'cpu': (64, 2, ['1x64x64', '1x64x96'], 1, 0),
         'cuda': (224, 8, ['1x256x384', '2x256x256'], 2, 1)}
NUM_CLASSES = 1000
PROBE_IMAGES = 4  # images of the ours-vs-baseline output comparison
#: kernel-name fragments (lower case) of each category of the profile section; first match wins
KERNEL_CATEGORIES = (
    ('aggregation (Triton)', ('_na_forward', '_na_attn_grad', '_na_value_grad')),
    ('convolution', ('conv', 'cudnn', 'xmma', 'implicit', 'dgrad', 'wgrad', 'fprop', 'winograd')),
    ('matmul', ('gemm', 'cutlass', 'nvjet', 'cublas', 'addmm', 'mm')),
    ('normalisation', ('batch_norm', 'batchnorm', 'layer_norm', 'layernorm', 'welford',
                       'native_norm', 'group_norm')),
    ('softmax', ('softmax',)),
    ('copy / layout', ('copy', 'transpose', 'permute', 'cat', 'pad', 'clone', 'contiguous',
                       'im2col', 'col2im', 'unfold')),
    ('optimizer', ('adam', 'foreach', 'multi_tensor')),
    ('reduction', ('reduce', 'sum', 'mean')),
    ('elementwise', ('elementwise', 'vectorized', 'unrolled', 'mul', 'add', 'gelu', 'sigmoid')),
)
PROFILE_TOP = 15  # kernels listed per mode
#: OverLoCK-T's depthwise convolutions at 224x224: (channels, map size, large kernel) of each
#: stage; timed with the large kernel, its most dilated branch (3x3) and a 3x3
DEPTHWISE_STAGES = ((64, 56, 17), (128, 28, 15), (256, 14, 13), (512, 7, 7))
#: (mode, selective recomputation) of the profiled steps
PROFILED_STEPS = (('infer', True), ('train', True), ('train, no recompute', False))


class Interrupted(BaseException):
    """SIGTERM (e.g. from ``timeout``): stop, leaving the results so far marked as interrupted."""


# ------------------------------------------------------------------------------------------------
# Settings and machine description
# ------------------------------------------------------------------------------------------------
def parse_dense_shape(text: str) -> tuple[int, int, int]:
    """``BxHxW`` or ``Bx3xHxW`` -> ``(B, H, W)``.

    Args:
        text: The shape as given on the command line.
    """
    parts = text.lower().split('x')
    if len(parts) == 4 and parts[1] == '3':
        parts = [parts[0]] + parts[2:]
    try:
        b, h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'dense shape {text!r}: expected BxHxW or Bx3xHxW, e.g. 2x800x1216') from None
    if min(b, h, w) < 1:
        raise argparse.ArgumentTypeError(f'dense shape {text!r}: sizes must be positive')
    return b, h, w


def shape_name(b: int, h: int, w: int) -> str:
    """``2x3x800x1216`` for ``(2, 800, 1216)``."""
    return f'{b}x3x{h}x{w}'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda', help='cuda (default), cuda:N, or cpu with '
                        '--quick (a smoke test of the code paths)')
    parser.add_argument('--dtype', choices=list(DTYPES), default='bf16',
                        help='autocast dtype (fp32: no autocast)')
    parser.add_argument('--archs', nargs='+', choices=ARCHS, default=None,
                        help='OverLoCK classifiers (default all; --quick: xt)')
    parser.add_argument('--batch', type=int, default=None,
                        help='classification batch (default 128; halved on OOM)')
    parser.add_argument('--image-size', type=int, default=None, help='default 224')
    parser.add_argument('--dense-shapes', nargs='+', type=parse_dense_shape, default=None,
                        help=f'BxHxW training shapes of the backbone (default {DEFAULT_DENSE})')
    parser.add_argument('--dense-arch', choices=ARCHS, default=None,
                        help="backbone of the dense section (default t; --quick: the first arch)")
    parser.add_argument('--iters', type=int, default=None, help='timed iterations (default 10)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed iterations (default 3)')
    parser.add_argument('--copy-mib', type=int, default=None,
                        help='size of the copied tensor (default 1024 on CUDA)')
    parser.add_argument('--kernel-runs', type=int, default=None,
                        help="triton_bandwidth's runs (default 20)")
    parser.add_argument('--no-cudnn-benchmark', action='store_true',
                        help='leave torch.backends.cudnn.benchmark off (default on, as timm '
                        'trains)')
    parser.add_argument('--max-case-seconds', type=float, default=20.0,
                        help='fewer timed iterations (at least 3) where they would take longer '
                        '(0: no limit)')
    parser.add_argument('--budget', type=float, default=240.0,
                        help='seconds; cases that would start later are recorded as skipped '
                        '(0: no limit; negative: none runs)')
    parser.add_argument('--sections', nargs='+', choices=list(SECTIONS), default=list(SECTIONS),
                        help='run only these sections (default all)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: one arch, tiny batch, 1-2 iterations (tiny images on CPU)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'gpu'),
                        help='writes OUT.json and OUT.md')
    return parser


def given(value: Any, default: Any) -> Any:
    """``value`` when the option was given, else ``default``."""
    return default if value is None else value


def resolve_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The run's settings: the arguments given, the defaults (full or --quick) for the rest."""
    if device.type not in ('cuda', 'cpu'):
        raise SystemExit(f'--device {args.device}: use cuda, cuda:N or cpu')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU '
                         'build of torch). Run on a GPU machine, or `--device cpu --quick` for a '
                         'smoke test of the code paths.')
    if device.type == 'cpu' and not args.quick:
        raise SystemExit('--device cpu runs only with --quick (a smoke test of the code paths); '
                         'CPU speed is what benchmarks/backbone.py measures.')
    quick = QUICK[device.type] if args.quick else None
    size, batch, dense, iters, warmup = quick or (224, 128, DEFAULT_DENSE, 10, 3)
    archs = given(args.archs, ['xt'] if args.quick else list(ARCHS))
    s = dict(
        archs=archs,
        image_size=given(args.image_size, size),
        batch=given(args.batch, batch),
        dense_shapes=given(args.dense_shapes, [parse_dense_shape(d) for d in dense]),
        dense_arch=given(args.dense_arch, archs[0] if args.quick else 't'),
        iters=given(args.iters, iters),
        warmup=given(args.warmup, warmup),
        copy_mib=given(args.copy_mib, 1024 if device.type == 'cuda' and not args.quick else 64),
        kernel_runs=given(args.kernel_runs, 2 if args.quick else 20),
        cudnn_benchmark=device.type == 'cuda' and not args.no_cudnn_benchmark,
        max_case_s=args.max_case_seconds, budget_s=args.budget, quick=args.quick, dtype=args.dtype,
        sections=args.sections)
    for key in ('batch', 'image_size', 'iters', 'copy_mib', 'kernel_runs'):
        if s[key] < 1:
            raise SystemExit(f'--{key.replace("_", "-")} must be at least 1, got {s[key]}')
    if s['warmup'] < 0:
        raise SystemExit(f'--warmup must be 0 or more, got {s["warmup"]}')
    return s


def package_version(name: str) -> Optional[str]:
    """Installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine(device: torch.device) -> dict[str, Any]:
    """The card (or CPU) and the software versions the figures depend on."""
    from mmoverlock.ops.cpu_routes import cpu_model
    from mmoverlock.version import __version__
    info: dict[str, Any] = dict(device_type=device.type, host_cpu=cpu_model(),
                                host_cores=os.cpu_count())
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device),
                    capability='sm{}{}'.format(*torch.cuda.get_device_capability(device)),
                    memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    else:
        info.update(name=f'CPU: {cpu_model()}', threads=torch.get_num_threads())
    info['versions'] = dict(
        python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        triton=package_version('triton'), timm=package_version('timm'),
        mmdet=package_version('mmdet'), mmcv=package_version('mmcv'),
        mmengine=package_version('mmengine'), mmoverlock=__version__)
    return info


def aggregation_backend(device: torch.device) -> dict[str, str]:
    """The neighbourhood-aggregation backend each implementation runs on this device."""
    from mmoverlock.ops import neighborhood
    out = {}
    for impl in IMPLEMENTATIONS:
        with route(impl):
            out[impl] = neighborhood._resolve_backend(None, device)
    return out


# ------------------------------------------------------------------------------------------------
# Results: rewritten after every case
# ------------------------------------------------------------------------------------------------
class Report:
    """The run's results, written to ``OUT.json`` / ``OUT.md`` after every change.

    Args:
        out: Path prefix of the two files.
        meta: Command, machine, versions, dtype and settings.
        budget_s: Seconds after which no case starts (0: no limit; negative: none starts).
    """

    def __init__(self, out: Path, meta: dict[str, Any], budget_s: float) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict[str, Any] = dict(
            meta=dict(meta, status='running', elapsed_s=0.0),
            sections={k: dict(title=t, rows=[], note='') for k, t in SECTIONS.items()},
            ratios={})
        out.parent.mkdir(parents=True, exist_ok=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.budget_s != 0 and self.elapsed > self.budget_s

    def note(self, section: str, text: str) -> None:
        self.data['sections'][section]['note'] = text
        self.write()

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.data['sections'][section]['rows'].append(row)
        print(f'[{self.elapsed:6.1f}s] {section}: {one_line(row)}', flush=True)
        self.write()

    def rows_with_status(self, status: str) -> list[dict]:
        return [r for s in self.data['sections'].values() for r in s['rows']
                if r.get('status') == status]

    def write(self, status: Optional[str] = None) -> None:
        meta = self.data['meta']
        if status:
            meta['status'] = status
        meta['elapsed_s'] = round(self.elapsed, 1)
        self.data['ratios'] = compute_ratios(self.data['sections'], meta['settings'])
        for suffix, text in (('.json', json.dumps(self.data, indent=1) + '\n'),
                             ('.md', markdown(self.data))):
            path = self.out.with_suffix(suffix)
            tmp = path.with_name(path.name + '.tmp')
            tmp.write_text(text)
            os.replace(tmp, path)


def one_line(row: dict[str, Any]) -> str:
    keys = ('model', 'impl', 'layout', 'mode', 'input', 'shape', 'dtype', 'batch', 'status')
    text = ' '.join(f'{k}={row[k]}' for k in keys if k in row)
    if 'fps' in row:
        text += f" {row['fps']:.1f} img/s"
    if row.get('peak_cuda_mib') is not None:
        text += f" peak {row['peak_cuda_mib']:.0f} MiB"
    if 'gbs' in row:
        text += f" {row['gbs']:.0f} GB/s"
    return text


# ------------------------------------------------------------------------------------------------
# Measuring one case
# ------------------------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (disabled for float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def images(batch: int, h: int, w: int, device: torch.device, seed: int = 1) -> Tensor:
    """A fixed random batch (the same for every implementation)."""
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)


def loss_of(out: Any, labels: Tensor) -> Tensor:
    """Cross-entropy of classifier logits (a dict of heads: their sum); the sum of the maps'
    means for a backbone's tuple of maps."""
    if isinstance(out, dict):
        return sum(F.cross_entropy(o.float(), labels) for o in out.values())
    if isinstance(out, Tensor):
        return F.cross_entropy(out.float(), labels)
    return sum(o.float().mean() for o in out)


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ('out of memory' in text
                                                or 'ALLOC_FAILED' in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


class Case:
    """How to run one model: device, dtype, iterations, channels-last input or not.

    Args:
        device: Where the model runs.
        dtype: Autocast dtype (float32: none).
        iters: Timed iterations.
        warmup: Untimed iterations first.
        max_case_s: Seconds the timed iterations may take (fewer iterations, at least 3, when
            the last warm-up iteration says they would take longer; 0: no limit).
        channels_last_input: Give the model channels-last images (as a channels-last peer is
            fed); OverLoCK converts its input itself.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, iters: int, warmup: int,
                 max_case_s: float = 0.0, channels_last_input: bool = False) -> None:
        self.device, self.dtype = device, dtype
        self.iters, self.warmup, self.max_case_s = iters, warmup, max_case_s
        self.channels_last_input = channels_last_input

    def inputs(self, batch: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        x = images(batch, h, w, self.device)
        if self.channels_last_input:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(2))
        return x, labels.to(self.device)

    def train_step(self, model: nn.Module, batch: int, h: int, w: int) -> Callable[[], None]:
        """One training iteration: forward under autocast, backward, AdamW step."""
        x, labels = self.inputs(batch, h, w)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(self.device, self.dtype):
                loss = loss_of(model(x), labels)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return step

    def infer_step(self, model: nn.Module, batch: int, h: int, w: int) -> Callable[[], None]:
        """One inference iteration (eval mode, no autograd, autocast)."""
        x, _ = self.inputs(batch, h, w)
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast(self.device, self.dtype):
                model(x)
        return step

    def time_step(self, step: Callable[[], None], batch: int) -> Timing:
        """Warm-up, then the timed iterations: fewer (at least 3) when the last warm-up
        iteration says that they would take longer than ``max_case_s``."""
        iters = self.iters
        if self.warmup > 0:
            last = time_callable(step, iters=1, warmup=self.warmup - 1, device=self.device).median
            if self.max_case_s > 0:
                iters = max(min(iters, 3), min(iters, int(self.max_case_s / max(last, 1e-9))))
        timing = time_callable(step, iters=iters, warmup=0, batch_size=batch, device=self.device)
        timing.warmup = self.warmup
        return timing

    def measure(self, model: nn.Module, mode: str, batch: int, h: int, w: int,
                halve: bool) -> dict[str, Any]:
        """Time ``mode`` ('train' | 'infer') at ``batch``, halving it on OOM when ``halve``.

        Returns:
            The row's fields: status ('ok' | 'oom'), batch used, timing, peak CUDA memory.
        """
        requested = batch
        make = self.train_step if mode == 'train' else self.infer_step
        while True:
            oom_message = None
            if self.device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                timing = self.time_step(make(model, batch, h, w), batch)
                peak = (torch.cuda.max_memory_allocated(self.device) / 2**20
                        if self.device.type == 'cuda' else None)
                model.zero_grad(set_to_none=True)
                return dict(status='ok', batch_requested=requested, **timing.as_dict(),
                            iters_requested=self.iters, peak_cuda_mib=peak)
            except Exception as error:  # noqa: BLE001  (OOM is a result; the rest re-raised)
                if not is_oom(error):
                    raise
                oom_message = str(error).splitlines()[0][:300]
            # outside the except block, so that the traceback's tensors are gone
            model.zero_grad(set_to_none=True)
            free_memory(self.device)
            if not halve or batch == 1:
                return dict(status='oom', batch_requested=requested, batch_size=batch,
                            error=oom_message)
            batch //= 2


def run_model(report: Report, section: str, base: dict[str, Any], build: Callable[[], nn.Module],
              case: Case, modes: list[tuple[str, Callable[[nn.Module, dict], dict]]]) -> None:
    """Build a model once and add one row per mode to ``section``.

    Args:
        report: Where the rows go.
        section: Section name.
        base: The rows' identifying fields.
        build: Returns the model (on the CPU; it is moved to the case's device).
        case: Device, dtype, iterations.
        modes: ``(mode, fn)``: ``fn(model, row)`` returns the measured fields.
    """
    if report.out_of_time():
        for mode, _ in modes:
            report.add(section, dict(base, mode=mode, status='skipped',
                                     error=f'budget of {report.budget_s:g} s spent'))
        return
    try:
        model = build().to(case.device)
    except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
        for mode, _ in modes:
            report.add(section, dict(base, mode=mode, **error_fields(error)))
        return
    for mode, fn in modes:
        row = dict(base, mode=mode)
        if report.out_of_time():
            row.update(status='skipped', error=f'budget of {report.budget_s:g} s spent')
        else:
            try:
                row.update(fn(model, row))
            except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
                row.update(error_fields(error))
        report.add(section, row)
    del model
    free_memory(case.device)


def error_fields(error: BaseException) -> dict[str, Any]:
    return dict(status='error', error=f'{type(error).__name__}: {error}'[:500],
                traceback=traceback.format_exc()[-3000:])


def rename_batch(fields: dict[str, Any]) -> dict[str, Any]:
    """``batch_size`` (of the timing) as ``batch``."""
    fields = dict(fields)
    fields['batch'] = fields.pop('batch_size')
    return fields


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = ROOT / 'benchmarks' / f'{name}.py'
    module_name = f'mmoverlock_benchmarks_{name}'
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def copy_row(device: torch.device, mib: int, iters: int) -> dict[str, Any]:
    """Median bandwidth of ``dst.copy_(src)`` for a ``mib`` MiB tensor (bytes read + written)."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_callable(partial(dst.copy_, src), iters=iters, warmup=3, device=device)
    moved = 2 * src.numel() * src.element_size()
    return dict(tensor_mib=mib, status='ok', iters=iters, median_ms=timing.median * 1e3,
                gbs=moved / timing.median / 1e9, times_s=timing.times)


def copy_bandwidth(report: Report, device: torch.device, mib: int, iters: int) -> None:
    """The device-to-device copy row (its tensors freed before the next section)."""
    if report.out_of_time():
        report.add('copy_bandwidth', dict(tensor_mib=mib, status='skipped',
                                          error=f'budget of {report.budget_s:g} s spent'))
        return
    try:
        row = copy_row(device, mib, iters)
    except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
        row = dict(tensor_mib=mib, **error_fields(error))
    free_memory(device)
    report.add('copy_bandwidth', row)


def kernel_bandwidth(report: Report, device: torch.device, dtype: torch.dtype,
                     runs: int) -> None:
    """The Triton kernels on OverLoCK-T's stage-3 maps, by ``benchmarks/triton_bandwidth.py``."""
    section = 'kernel_bandwidth'
    interpreted = os.environ.get('TRITON_INTERPRET') == '1'
    if device.type != 'cuda' and not interpreted:
        report.note(section, 'skipped: the Triton kernels need a CUDA device (or '
                    'TRITON_INTERPRET=1 for a dry run on the CPU)')
        return
    if report.out_of_time():
        report.add(section, dict(status='skipped',
                                 error=f'budget of {report.budget_s:g} s spent'))
        return
    try:
        bench = load_benchmark('triton_bandwidth')
        if device.type == 'cuda':
            # stage 3 of OverLoCK-T on an 800x1216 image: 50x76 maps, 8 groups
            shapes = [s for s in bench.SHAPES if s[1:4] == (8, 50, 76)]
            dtypes = [dtype] + ([torch.float32] if dtype != torch.float32 else [])
            note = ('OverLoCK-T stage 3 at 800x1216 (B x G x H x W x C x K), '
                    f'triton.testing.do_bench median, {runs} runs')
        else:
            shapes, dtypes = bench.TINY_SHAPES, [torch.float32]
            note = 'TRITON_INTERPRET=1 on the CPU: tiny shapes, numbers meaningless'
        report.note(section, note)
        rows = bench.measure(shapes, dtypes, device, runs=runs, baseline=False)
    except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
        report.add(section, error_fields(error))
        return
    for row in rows:
        report.add(section, dict(row, status='ok'))


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel (or, on the CPU, an ATen op) by its name."""
    lower = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in lower for f in fragments):
            return category
    return 'other'


def profile_once(step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """One ``step`` under ``torch.profiler``: its wall time, the summed time of its kernels
    (CUDA kernels on a GPU; ATen ops' self CPU time on the CPU) by name, and their count."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    kernels: dict[str, list[float]] = {}
    if cuda:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                entry = kernels.setdefault(event.name, [0.0, 0])
                entry[0] += event.time_range.elapsed_us() / 1e3
                entry[1] += 1
    else:
        for event in prof.key_averages():
            if event.self_cpu_time_total > 0:
                kernels[event.key] = [event.self_cpu_time_total / 1e3, event.count]
    return dict(wall_ms=wall * 1e3, kernels=kernels)


def profile_rows(mode: str, profiled: dict[str, Any]) -> list[dict[str, Any]]:
    """A summary row, one row per category and the ``PROFILE_TOP`` largest kernels of one
    profiled step (times in ms, shares of the kernels' summed time)."""
    kernels = profiled['kernels']
    busy = sum(ms for ms, _ in kernels.values())
    launches = sum(n for _, n in kernels.values())
    rows = [dict(mode=mode, kind='step', name='wall time of the step / summed kernel time',
                 calls=launches, ms=profiled['wall_ms'], busy_ms=busy,
                 peak_cuda_mib=profiled.get('peak_cuda_mib'), status='ok')]
    categories: dict[str, list[float]] = {}
    for name, (ms, n) in kernels.items():
        entry = categories.setdefault(kernel_category(name), [0.0, 0])
        entry[0] += ms
        entry[1] += n
    for name, (ms, n) in sorted(categories.items(), key=lambda kv: -kv[1][0]):
        rows.append(dict(mode=mode, kind='category', name=name, calls=n, ms=ms,
                         pct=100 * ms / max(busy, 1e-9), status='ok'))
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:PROFILE_TOP]
    for name, (ms, n) in top:
        rows.append(dict(mode=mode, kind='kernel', name=name[:100],
                         category=kernel_category(name), calls=n, ms=ms,
                         pct=100 * ms / max(busy, 1e-9), status='ok'))
    return rows


def profile_section(report: Report, arch: str, case: Case, settings: dict[str, Any]) -> None:
    """One inference and one training step of ``overlock_{arch}`` (ours, the classification
    section's batch and size) under the profiler, after the case's warm-up iterations."""
    import timm

    import mmoverlock.models.classifiers  # noqa: F401  (registers the timm models)
    section = 'profile'
    size, batch = settings['image_size'], settings['batch']
    report.note(section, f'overlock_{arch} (ours), {batch}x3x{size}x{size}, one step after '
                f'{max(case.warmup, 1)} warm-up; the kernels\' times summed by name '
                '(CUDA kernels on a GPU, ATen ops\' self CPU time on the CPU). Wall time much '
                'larger than the summed kernel time: the step waits on the host.')
    if report.out_of_time():
        report.add(section, dict(status='skipped', error=f'budget of {report.budget_s:g} s spent'))
        return
    try:
        torch.manual_seed(0)
        with route('ours'):
            model = timm.create_model(f'overlock_{arch}', **route_kwargs('ours')).to(case.device)
            # training twice: as shipped (selective recomputation) and with plain autograd,
            # which tells what the recomputation costs on this device
            for mode, recompute in PROFILED_STEPS:
                for module in model.modules():
                    if hasattr(module, 'selective_cp'):
                        module.selective_cp = recompute
                make = case.infer_step if mode == 'infer' else case.train_step
                step = make(model, batch, size, size)
                for _ in range(max(case.warmup, 1)):
                    step()
                if case.device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(case.device)
                profiled = profile_once(step, case.device)
                if case.device.type == 'cuda':
                    profiled['peak_cuda_mib'] = torch.cuda.max_memory_allocated(case.device) / 2**20
                for row in profile_rows(mode, profiled):
                    report.add(section, row)
                model.zero_grad(set_to_none=True)
        del model
    except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
        report.add(section, error_fields(error))
    free_memory(case.device)


def depthwise_cases(settings: dict[str, Any]) -> list[tuple[int, int, int, int, int]]:
    """``(channels, map size, kernel, dilation, stage)`` of the depthwise section: each stage's
    large kernel, its most dilated branch and a plain 3x3, scaled to the section's image size."""
    from mmoverlock.models.layers.dilated_reparam import DILATED_BRANCHES
    cases = []
    for stage, (channels, size, k) in enumerate(DEPTHWISE_STAGES, 1):
        size = max(1, size * settings['image_size'] // 224)
        branch_k, branch_d = [(kk, d) for kk, d in zip(*DILATED_BRANCHES[k])][-1]
        for kernel, dilation in ((k, 1), (branch_k, branch_d), (3, 1)):
            cases.append((channels, size, kernel, dilation, stage))
    return cases


def depthwise_row(case: Case, batch: int, channels: int, size: int, kernel: int, dilation: int,
                  layout: str) -> dict[str, Any]:
    """Forward and forward + backward of one depthwise convolution (``F.conv2d``, same padding,
    the case's autocast dtype) in one memory layout; multiply-adds per second of each."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(batch, channels, size, size, generator=gen).to(case.device)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = (torch.randn(channels, 1, kernel, kernel, generator=gen) / kernel).to(case.device)
    weight.requires_grad_(True)
    pad = dilation * (kernel // 2)

    def forward() -> Tensor:
        with autocast(case.device, case.dtype):
            return F.conv2d(x, weight, padding=pad, dilation=dilation, groups=channels)

    def forward_backward() -> None:
        forward().float().sum().backward()

    def no_grad_forward() -> None:
        with torch.no_grad():
            forward()

    macs = batch * channels * size * size * kernel * kernel
    row = dict(channels=channels, size=size, kernel=kernel, dilation=dilation, layout=layout,
               batch=batch, status='ok')
    for name, fn, passes in (('fwd', no_grad_forward, 1), ('fwd_bwd', forward_backward, 3)):
        timing = time_callable(fn, iters=case.iters, warmup=max(case.warmup, 1),
                               device=case.device)
        row[f'{name}_ms'] = timing.median * 1e3
        row[f'{name}_gmacs'] = passes * macs / timing.median / 1e9
    return row


def depthwise_section(report: Report, case: Case, settings: dict[str, Any]) -> None:
    """OverLoCK-T's depthwise convolutions, channels-last (as ours runs them) and NCHW."""
    section = 'depthwise'
    batch = settings['batch']
    report.note(section, f'F.conv2d with groups = channels, batch {batch}, '
                f'{settings["image_size"]}x{settings["image_size"]} images\' stage maps, '
                f'{settings["dtype"]} autocast; fwd_bwd counts 3 passes of multiply-adds '
                '(forward, input gradient, weight gradient)')
    for channels, size, kernel, dilation, stage in depthwise_cases(settings):
        for layout in ('channels_last', 'NCHW'):
            base = dict(stage=stage, channels=channels, size=size, kernel=kernel,
                        dilation=dilation, layout=layout, batch=batch)
            if report.out_of_time():
                report.add(section, dict(base, status='skipped',
                                         error=f'budget of {report.budget_s:g} s spent'))
                continue
            try:
                row = dict(depthwise_row(case, batch, channels, size, kernel, dilation, layout),
                           stage=stage)
            except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
                row = dict(base, **error_fields(error))
            report.add(section, row)
    free_memory(case.device)


def shared_weights(make: Callable[[], nn.Module],
                   state: dict[str, Tensor]) -> Callable[[], nn.Module]:
    """``make`` whose first model's weights go into ``state`` and into every later model.

    Args:
        make: Builds a model.
        state: Empty at first; shared by the builders that must agree.
    """
    def build() -> nn.Module:
        model = make()
        if state:
            model.load_state_dict(state)
        else:
            state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model
    return build


def timed(case: Case, mode: str, batch: int, h: int, w: int,
          halve: bool) -> Callable[[nn.Module, dict], dict]:
    """A ``run_model`` mode function: :meth:`Case.measure` with these settings."""
    def fn(model: nn.Module, row: dict) -> dict:
        return rename_batch(case.measure(model, mode, batch, h, w, halve=halve))
    return fn


def probed(measure: Callable[[nn.Module, dict], dict], case: Case, size: int, impl: str,
           probes: dict[str, Tensor]) -> Callable[[nn.Module, dict], dict]:
    """``measure``, then the logits of fixed images kept in ``probes[impl]``; the baseline's row
    gets the largest difference from ours (same weights, same images, same dtype)."""
    def fn(model: nn.Module, row: dict) -> dict:
        fields = measure(model, row)
        if fields['status'] != 'ok':
            return fields
        x = images(PROBE_IMAGES, size, size, case.device, seed=3)
        with torch.no_grad(), autocast(case.device, case.dtype):
            probes[impl] = model(x).float().cpu()
        if impl != 'ours' and 'ours' in probes:
            fields['max_abs_diff_vs_ours'] = (probes[impl] - probes['ours']).abs().max().item()
            fields['ours_max_abs'] = probes['ours'].abs().max().item()
        return fields
    return fn


def classification(report: Report, arch: str, case: Case, settings: dict[str, Any]) -> None:
    """Inference, then training, of ``overlock_{arch}``: ours, then the baseline with the same
    weights (its inference row also holds the largest difference of its logits from ours)."""
    import timm

    import mmoverlock.models.classifiers  # noqa: F401  (registers the timm models)
    size, batch = settings['image_size'], settings['batch']
    state: dict[str, Tensor] = {}
    probes: dict[str, Tensor] = {}
    for impl in IMPLEMENTATIONS:
        make = shared_weights(partial(timm.create_model, f'overlock_{arch}',
                                      **route_kwargs(impl)), state)
        infer = probed(timed(case, 'infer', batch, size, size, halve=True), case, size, impl,
                       probes)
        train = timed(case, 'train', batch, size, size, halve=True)
        base = dict(model=f'overlock_{arch}', arch=arch, impl=impl, input=f'{size}x{size}')
        torch.manual_seed(0)
        with route(impl):
            run_model(report, 'classification', base, make, case,
                      [('infer', infer), ('train', train)])


def peers(report: Report, device: torch.device, dtype: torch.dtype,
          settings: dict[str, Any]) -> None:
    """timm's ConvNeXt-T (NCHW and channels-last) and mmdet's Swin-T backbone."""
    import timm
    size, batch = settings['image_size'], settings['batch']
    cpu_bench = load_benchmark('backbone')

    def convnext(channels_last: bool) -> nn.Module:
        torch.manual_seed(0)
        model = timm.create_model('convnext_tiny')
        return model.to(memory_format=torch.channels_last) if channels_last else model

    for name, source, layout, make in (
            ('convnext_tiny', 'timm classifier', 'NCHW', partial(convnext, False)),
            ('convnext_tiny', 'timm classifier', 'channels_last', partial(convnext, True)),
            ('swin_t', 'mmdet backbone, no head', 'tokens',
             partial(cpu_bench.build, 'swin', 't', deploy=False))):
        case = Case(device, dtype, settings['iters'], settings['warmup'],
                    settings['max_case_s'], channels_last_input=layout == 'channels_last')
        modes = [(mode, timed(case, mode, batch, size, size, halve=True))
                 for mode in ('infer', 'train')]
        run_model(report, 'peers', dict(model=name, source=source, layout=layout,
                                        input=f'{size}x{size}'), make, case, modes)


def dense_training(report: Report, case: Case, settings: dict[str, Any]) -> None:
    """Training steps of the backbone (built by ``benchmarks/backbone.py``), ours vs baseline,
    same weights, same batch (no halving)."""
    cpu_bench = load_benchmark('backbone')
    arch = settings['dense_arch']
    for b, h, w in settings['dense_shapes']:
        state: dict[str, Tensor] = {}
        for impl in IMPLEMENTATIONS:
            make = shared_weights(partial(cpu_bench.build, impl, arch, deploy=False), state)
            base = dict(model=f'overlock_{arch} backbone', arch=arch, impl=impl,
                        input=shape_name(b, h, w))
            with route(impl):
                run_model(report, 'dense_training', base, make, case,
                          [('train', timed(case, 'train', b, h, w, halve=False))])


# ------------------------------------------------------------------------------------------------
# Ratios and tables
# ------------------------------------------------------------------------------------------------
def find(rows: list[dict], **match: Any) -> Optional[dict]:
    """The first 'ok' row whose fields equal ``match``."""
    for row in rows:
        if row.get('status') == 'ok' and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def ratio(num: Optional[float], den: Optional[float], definition: str,
          missing: str) -> dict[str, Any]:
    if num is None or den is None or den == 0:
        return dict(value=None, definition=definition, missing=missing)
    return dict(value=num / den, definition=definition)


def goal_arch(settings: dict[str, Any]) -> str:
    """The arch of the goals' ratios: T when measured, else the first arch."""
    return 't' if 't' in settings['archs'] else settings['archs'][0]


def compute_ratios(sections: dict[str, dict], settings: dict[str, Any]) -> dict[str, dict]:
    """The ratios the issue's goals need, from the rows measured so far (None when missing)."""
    cls, peer = sections['classification']['rows'], sections['peers']['rows']
    dense = sections['dense_training']['rows']
    out: dict[str, dict] = {}
    arch = goal_arch(settings)
    for mode, word in (('train', 'training'), ('infer', 'inference')):
        ours = find(cls, arch=arch, impl='ours', mode=mode)
        convnext = [r['fps'] for r in peer if r.get('model') == 'convnext_tiny'
                    and r.get('mode') == mode and r.get('status') == 'ok']
        out[f'classification_{mode}_vs_convnext_tiny'] = dict(ratio(
            ours and ours['fps'], max(convnext) if convnext else None,
            f'OverLoCK-{arch.upper()} (ours) {word} img/s / ConvNeXt-T {word} img/s '
            '(its faster layout)', f'OverLoCK-{arch.upper()} ours {mode} or ConvNeXt-T '
            f'{mode} not measured'), arch=arch)
    for a in settings['archs']:
        for mode in ('train', 'infer'):
            ours = find(cls, arch=a, impl='ours', mode=mode)
            base = find(cls, arch=a, impl='baseline', mode=mode)
            out[f'classification_{mode}_speedup_{a}'] = ratio(
                ours and ours['fps'], base and base['fps'],
                f'OverLoCK-{a.upper()} {mode} img/s: ours / baseline',
                f'OverLoCK-{a.upper()} {mode}: ours or baseline not measured')
    for b, h, w in settings['dense_shapes']:
        name = shape_name(b, h, w)
        ours = find(dense, input=name, impl='ours')
        base = find(dense, input=name, impl='baseline')
        out[f'dense_train_speedup_{name}'] = ratio(
            ours and ours['fps'], base and base['fps'],
            f'backbone training img/s at {name}: ours / baseline',
            f'{name}: ours or baseline not measured')
        out[f'dense_peak_memory_ratio_{name}'] = ratio(
            ours and ours['peak_cuda_mib'], base and base['peak_cuda_mib'],
            f'peak CUDA memory of the training step at {name}: ours / baseline',
            f'{name}: ours or baseline not measured, or no CUDA memory (CPU run)')
    copy = find(sections['copy_bandwidth']['rows'])
    kernel_rows = [r for r in sections['kernel_bandwidth']['rows'] if r.get('status') == 'ok']
    if not kernel_rows:
        out['kernel_pct_of_copy'] = ratio(
            None, None, 'Triton kernels\' achieved GB/s as % of the device-to-device copy GB/s',
            'kernels not measured (they need CUDA, or TRITON_INTERPRET=1 on the CPU)')
    for row in kernel_rows:
        for part in ('forward', 'backward'):
            out[f"kernel_{part}_pct_of_copy_{row['shape']}_{row['dtype']}"] = ratio(
                100 * row[f'{part}_gbs'], copy and copy['gbs'],
                f"Triton {part} achieved GB/s ({row['shape']}, {row['dtype']}) as % of the "
                'device-to-device copy GB/s', 'copy bandwidth not measured')
    return out


def fmt(value: Optional[float], spec: str = '.2f', unit: str = '') -> str:
    return '-' if value is None else f'{value:{spec}}{unit}'


def throughput_table(rows: list[dict], keys: list[tuple[str, str]]) -> list[str]:
    head = [title for _, title in keys] + ['batch', 'img/s', 'median ms', 'peak CUDA MiB',
                                           'status']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        batch = str(r.get('batch', '-'))
        if r.get('batch_requested') not in (None, r.get('batch')):
            batch += f" (of {r['batch_requested']})"
        median = r.get('median_s')
        status = r.get('status', '?')
        if 'max_abs_diff_vs_ours' in r:
            status += (f"; logits max abs diff vs ours {r['max_abs_diff_vs_ours']:.2e} "
                       f"(of max {r['ours_max_abs']:.2e})")
        if r.get('error'):
            status += f": {r['error'][:120]}"
        cells = [str(r.get(k, '-')) for k, _ in keys] + [
            batch, fmt(r.get('fps'), '.1f'), fmt(median and median * 1e3, '.1f'),
            fmt(r.get('peak_cuda_mib'), '.0f'), status.replace('|', '/')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def kernel_table(rows: list[dict], copy: Optional[dict]) -> list[str]:
    lines = ['| B x G x H x W x C x K | dtype | fwd ms | fwd GB/s | fwd % of copy | bwd ms '
             '| bwd GB/s | bwd % of copy | status |', '|' + '---|' * 9]
    for r in rows:
        cells = [r.get('shape', '-'), r.get('dtype', '-')]
        for part in ('forward', 'backward'):
            gbs = r.get(f'{part}_gbs')
            pct = 100 * gbs / copy['gbs'] if gbs is not None and copy else None
            cells += [fmt(r.get(f'{part}_ms'), '.3f'), fmt(gbs, '.0f'), fmt(pct, '.1f', '%')]
        cells.append(f"{r['status']} {r.get('error', '')}".strip())
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def depthwise_table(rows: list[dict]) -> list[str]:
    lines = ['| stage | C x H x W | kernel | dilation | layout | fwd ms | fwd GMAC/s | fwd+bwd ms '
             '| fwd+bwd GMAC/s | status |', '|' + '---|' * 10]
    for r in rows:
        lines.append(
            f"| {r.get('stage', '-')} | {r.get('channels')}x{r.get('size')}x{r.get('size')} | "
            f"{r.get('kernel')} | {r.get('dilation')} | {r.get('layout')} | "
            f"{fmt(r.get('fwd_ms'), '.3f')} | {fmt(r.get('fwd_gmacs'), '.0f')} | "
            f"{fmt(r.get('fwd_bwd_ms'), '.3f')} | {fmt(r.get('fwd_bwd_gmacs'), '.0f')} | "
            f"{r['status']} {r.get('error', '')} |")
    return lines


def profile_table(rows: list[dict]) -> list[str]:
    lines = ['| mode | kind | name | calls | ms | % of kernel time |', '|' + '---|' * 6]
    for r in rows:
        if r.get('status') != 'ok':
            lines.append(f"| - | - | {r.get('status')} {r.get('error', '')} | - | - | - |")
            continue
        if r['kind'] == 'step':
            share = f"kernels {fmt(r['busy_ms'], '.1f')} ms"
            if r.get('peak_cuda_mib') is not None:
                share += f", peak {r['peak_cuda_mib']:.0f} MiB"
        else:
            share = fmt(r.get('pct'), '.1f', '%')
        name = r['name'].replace('|', '/')
        if r['kind'] == 'kernel':
            name = f"`{name}` ({r['category']})"
        lines.append(f"| {r['mode']} | {r['kind']} | {name} | {r['calls']} | "
                     f"{fmt(r['ms'], '.2f')} | {share} |")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The report as Markdown: machine, goals' ratios, one table per section."""
    meta, sections = data['meta'], data['sections']
    dev, ver, s = meta['machine'], meta['machine']['versions'], meta['settings']
    lines = ['# GPU benchmark: OverLoCK, ours vs the authors\' route, and peers', '',
             f"Command: `{meta['command']}`", '',
             f"Card: **{dev['name']}**" + (f" ({dev['capability']}, {dev['memory_gib']} GiB)"
                                           if dev['device_type'] == 'cuda' else '')
             + f"; host CPU {dev['host_cpu']}.",
             f"Versions: torch {ver['torch']}, CUDA {ver['cuda']}, cuDNN {ver['cudnn']}, "
             f"Triton {ver['triton']}, timm {ver['timm']}, mmdet {ver['mmdet']}, "
             f"mmoverlock {ver['mmoverlock']}, Python {ver['python']}.",
             f"dtype: **{s['dtype']}** ({'autocast' if s['dtype'] != 'fp32' else 'no autocast'})"
             f"; median of {s['iters']} iterations (at least 3 and fewer where they would "
             f"take over {s['max_case_s']:g} s) after {s['warmup']} warm-up; "
             f"cudnn.benchmark {s['cudnn_benchmark']}; aggregation: ours "
             f"`{meta['aggregation_backend']['ours']}`, baseline "
             f"`{meta['aggregation_backend']['baseline']}`.",
             f"Date {meta['date']}; status: **{meta['status']}** after {meta['elapsed_s']} s.",
             '', '## Goals', '', '| ratio | value | definition |', '|---|---|---|']
    for name, r in data['ratios'].items():
        spec = ('.1f', '%') if '_pct_' in name else ('.2f', 'x')
        value = fmt(r['value'], *spec) if r['value'] is not None else f"- ({r['missing']})"
        lines.append(f"| {name} | {value} | {r['definition']} |")
    tables = {
        'classification': [('model', 'model'), ('impl', 'impl'), ('mode', 'mode'),
                           ('input', 'input')],
        'peers': [('model', 'model'), ('source', 'source'), ('layout', 'layout'),
                  ('mode', 'mode'), ('input', 'input')],
        'dense_training': [('model', 'model'), ('impl', 'impl'), ('input', 'input')],
    }
    for key, section in sections.items():
        lines += ['', f"## {section['title']}", '']
        if section['note']:
            lines += [section['note'], '']
        rows = section['rows']
        if key == 'classification':
            rows = sorted(rows, key=lambda r: ARCHS.index(r['arch']))
        if key in tables:
            lines += throughput_table(rows, tables[key])
        elif key == 'profile':
            lines += profile_table(rows)
        elif key == 'depthwise':
            lines += depthwise_table(rows)
        elif key == 'copy_bandwidth':
            lines += ['| MiB | median ms | GB/s (read + write) | status |', '|---|---|---|---|']
            lines += [f"| {r['tensor_mib']} | {fmt(r.get('median_ms'), '.3f')} | "
                      f"{fmt(r.get('gbs'), '.0f')} | {r['status']} {r.get('error', '')} |"
                      for r in rows]
        else:
            lines += kernel_table(rows, find(sections['copy_bandwidth']['rows']))
    return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report's data (also written to ``--out``).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    settings = resolve_settings(args, device)
    dtype = DTYPES[args.dtype]
    if device.type == 'cuda':
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = settings['cudnn_benchmark']
    meta = dict(command='python benchmarks/gpu.py ' + shlex.join(argv),
                date=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
                machine=describe_machine(device), dtype=args.dtype,
                settings=dict(settings, dense_shapes=[list(s) for s in settings['dense_shapes']],
                              tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                              tf32_cudnn=torch.backends.cudnn.allow_tf32,
                              optimizer='AdamW(lr=1e-4, weight_decay=0.05)',
                              train_loss='cross-entropy of every head (classifiers); sum of '
                              'the maps\' means (backbones)'),
                aggregation_backend=aggregation_backend(device),
                implementations=dict(
                    ours='mmoverlock as shipped: channels-last maps, automatic aggregation '
                    'backend, selective recomputation in training',
                    baseline="the authors' route: unfold aggregation, NCHW, PyTorch's own "
                    'convolutions, plain autograd'))
    report = Report(Path(args.out), meta, settings['budget_s'])
    report.write()
    case = Case(device, dtype, settings['iters'], settings['warmup'], settings['max_case_s'])
    archs = sorted(settings['archs'], key=lambda a: a != goal_arch(settings))
    status = 'complete'
    try:
        # in order of what the goals need first (a run cut short keeps those)
        steps = [('copy_bandwidth', partial(copy_bandwidth, report, device, settings['copy_mib'],
                                            3 if args.quick else 20)),
                 ('kernel_bandwidth', partial(kernel_bandwidth, report, device, dtype,
                                              settings['kernel_runs'])),
                 ('profile', partial(profile_section, report, archs[0], case, settings)),
                 ('depthwise', partial(depthwise_section, report, case, settings)),
                 ('classification', partial(classification, report, archs[0], case, settings)),
                 ('peers', partial(peers, report, device, dtype, settings)),
                 ('dense_training', partial(dense_training, report, case, settings))]
        steps += [('classification', partial(classification, report, arch, case, settings))
                  for arch in archs[1:]]
        for section, step in steps:
            if section in args.sections:
                step()
            else:
                report.data['sections'][section]['note'] = 'not run (--sections)'
        if report.rows_with_status('skipped'):
            status = (f'partial: budget of {settings["budget_s"]:g} s spent, '
                      f'{len(report.rows_with_status("skipped"))} case(s) skipped')
    except (KeyboardInterrupt, Interrupted) as error:
        status = f'interrupted ({type(error).__name__})'
        raise
    finally:
        if report.rows_with_status('error'):
            status += f', {len(report.rows_with_status("error"))} case(s) failed'
        report.write(status)
    return report.data


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted()


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry: 0 when every case ran or ran out of memory, 1 on errors.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        data = run(argv)
    except Interrupted:
        return 143
    print(markdown(data), end='')
    return 1 if 'failed' in data['meta']['status'] else 0


if __name__ == '__main__':
    sys.exit(main())
