"""Checks of the Triton neighbourhood-aggregation kernels on the CPU, through Triton's interpreter.

Run by ``tests/test_neighborhood_triton.py`` in a subprocess: ``TRITON_INTERPRET=1`` has to be set
before the kernels are imported, which a pytest process that has imported them already (or any
other Triton code) cannot do. All cases run in this one process to pay the start-up once.

Every case compares the values and both gradients of ``neighborhood_aggregate(...,
backend='triton')`` with autograd through the brute-force loop ``na2d_av_reference`` in float64,
evaluated on the very inputs the kernels see (half-precision inputs included, converted exactly).
Tolerances, ``|ours - ref| <= atol + rtol * |ref|`` per element:

- float32: ``rtol = atol = 1e-5``; the kernels sum at most ``(K + K // 2)**2`` products in float32
  (relative rounding ``2**-24`` per step, ~1e-6 at K = 17 for these O(1) operands).
- bfloat16: ``rtol = 2**-7``: the kernels accumulate in float32 and convert each result once to
  bfloat16 (8 significant bits). On a GPU the conversion rounds to nearest (at most half an ulp,
  ``2**-8`` of the value; the CUDA test holds it to that), but Triton's interpreter truncates
  float32 to bfloat16 (``_convert_float`` without a rounding mode), up to one ulp, ``2**-7``. Plus
  ``atol = 1e-5`` for the float32 accumulation before that conversion.
- float16: ``rtol = 2**-11`` (11 significant bits), ``atol = 1e-5`` likewise.
- float64 (accumulated in float64): ``rtol = atol = 1e-12``.

Prints one line per case and a final ``SUMMARY {json}`` line; exits 1 if any case failed.

    TRITON_INTERPRET=1 python tests/triton_interpreter_checks.py
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Optional

if os.environ.get('TRITON_INTERPRET') != '1':
    sys.exit('set TRITON_INTERPRET=1 to run these checks on the CPU (Triton\'s interpreter)')

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mmoverlock.ops import na2d_av_reference, neighborhood_aggregate  # noqa: E402
from mmoverlock.ops import neighborhood_triton as nt  # noqa: E402
from mmoverlock.ops.neighborhood_triton import triton_interpreted  # noqa: E402

TOLERANCES = {  # dtype: (rtol, atol), see the module docstring
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2.0 ** -7, 1e-5),  # the interpreter truncates to bfloat16
    torch.float16: (2.0 ** -11, 1e-5),
    torch.float64: (1e-12, 1e-12),
}


def make_inputs(b: int, g: int, h: int, w: int, c: int, k: int, dtype: torch.dtype,
                value_dtype: Optional[torch.dtype] = None, layout: str = 'contiguous',
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax weights, values and an output gradient. ``layout='channels_last_view'`` makes
    the values (and the output gradient) the strided views the model passes: one channel half of
    a channels-last ``(B, 2*G*C, H, W)`` map, split into groups, permuted to ``(B, G, H, W, C)``."""
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(b, g, h, w, k * k, generator=gen).softmax(-1).to(dtype)
    value_dtype = value_dtype or dtype

    def map_like() -> torch.Tensor:
        if layout == 'contiguous':
            return torch.randn(b, g, h, w, c, generator=gen).to(value_dtype)
        full = torch.randn(b, 2 * g * c, h, w, generator=gen).to(value_dtype)
        full = full.contiguous(memory_format=torch.channels_last)
        part = full[:, g * c:]  # the second half, as dynamic_aggregate's chunk
        return part.reshape(b, g, c, h, w).permute(0, 1, 3, 4, 2)

    return attn, map_like(), map_like()


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> list[str]:
    rtol, atol = TOLERANCES[dtype]
    if ours.dtype != dtype:
        return [f'{name}: dtype {ours.dtype}, expected {dtype}']
    if ours.shape != ref.shape:
        return [f'{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}']
    diff = (ours.double() - ref).abs()
    bound = atol + rtol * ref.abs()
    if not bool((diff <= bound).all()):
        worst = int((diff - bound).flatten().argmax())
        return [f'{name}: max error {diff.max().item():.3g} exceeds the tolerance (rtol '
                f'{rtol:.3g}, atol {atol:.3g}); worst element {worst}: '
                f'{ours.flatten()[worst].item():.6g} vs {ref.flatten()[worst].item():.6g}']
    return []


@contextlib.contextmanager
def skipped_gradients(attn: bool, value: bool) -> Iterator[None]:
    """Make the kernels of the gradients that are not needed raise if they are launched."""
    saved = nt._attn_grad, nt._value_grad

    def refuse(*args: object) -> None:
        raise AssertionError('a gradient kernel ran for an operand that needs no gradient')

    nt._attn_grad = refuse if attn else saved[0]
    nt._value_grad = refuse if value else saved[1]
    try:
        yield
    finally:
        nt._attn_grad, nt._value_grad = saved


def check_against_reference(b: int, g: int, h: int, w: int, c: int, k: int,
                            dtype: torch.dtype = torch.float32,
                            value_dtype: Optional[torch.dtype] = None,
                            layout: str = 'contiguous',
                            needs: tuple[bool, bool] = (True, True)) -> list[str]:
    attn, value, grad = make_inputs(b, g, h, w, c, k, dtype, value_dtype, layout)
    out_dtype = torch.promote_types(attn.dtype, value.dtype)
    a = attn.clone().requires_grad_(needs[0])
    v = value.detach().requires_grad_(needs[1])  # keeps the strided layout
    out = neighborhood_aggregate(a, v, backend='triton')
    grad = grad.to(out_dtype)
    # autograd.grad hands back the gradients as the backward made them (a leaf's .grad would be
    # re-laid out by autograd for non-dense leaves such as the channels-last view)
    inputs = [t for t, want in zip((a, v), needs) if want]
    with skipped_gradients(not needs[0], not needs[1]):
        grads = iter(torch.autograd.grad(out, inputs, grad))
    ours_grads = [next(grads) if want else None for want in needs]
    ref_a = attn.double().requires_grad_(needs[0])
    ref_v = value.double().requires_grad_(needs[1])
    ref = na2d_av_reference(ref_a, ref_v)
    ref.backward(grad.double())
    errors = compare('output', out, ref, out_dtype)
    if layout == 'channels_last_view':
        # the output lies in the values' memory order: pixel-major rows of (group, channel)
        if not out.permute(0, 2, 3, 1, 4).is_contiguous():
            errors.append(f'output strides {out.stride()} are not in the values\' order')
    for name, ours, operand, theirs in (('attn grad', ours_grads[0], a, ref_a),
                                        ('value grad', ours_grads[1], v, ref_v)):
        if ours is not None:
            errors += compare(name, ours, theirs.grad, operand.dtype)
    if (needs[1] and layout == 'channels_last_view'
            and not ours_grads[1].permute(0, 2, 3, 1, 4).is_contiguous()):
        errors.append(f'value grad strides {ours_grads[1].stride()} are not in the values\' '
                      'order')
    return errors


def check_border_definition() -> list[str]:
    """Hand-checkable border semantics: all weight on tap (0, 0) reads the window's first pixel,
    which the clamped window puts on the map (never zero padding)."""
    k, h, w = 5, 6, 7
    attn = torch.zeros(1, 1, h, w, k * k)
    attn[..., 0] = 1
    value = torch.arange(float(h * w)).view(1, 1, h, w, 1)
    out = neighborhood_aggregate(attn, value, backend='triton')
    expected = {(0, 0): value[0, 0, 0, 0, 0], (3, 3): value[0, 0, 1, 1, 0],
                (5, 6): value[0, 0, h - k, w - k, 0]}
    return [f'pixel {p}: {out[0, 0, p[0], p[1], 0].item()} instead of {e.item()}'
            for p, e in expected.items() if out[0, 0, p[0], p[1], 0] != e]


def check_model_aggregation() -> list[str]:
    """The model's ``dynamic_aggregate`` (channels-last map, a 5x5 and a 7x7 part) with the backend
    chosen by the environment variable, as the model never names one: Triton against the PyTorch
    routes, values and gradients."""
    from mmoverlock.models.layers.overlock_blocks import dynamic_aggregate
    from mmoverlock.ops.neighborhood import BACKEND_ENV

    gen = torch.Generator().manual_seed(1)
    b, g, h, w, c = 1, 2, 9, 8, 3
    x = torch.randn(b, 2 * g * c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    weights = [torch.randn(b, g, h, w, k * k, generator=gen).softmax(-1) for k in (5, 7)]
    grad = torch.randn(b, 2 * g * c, h, w, generator=gen)
    results = {}
    for backend in ('torch', 'triton'):
        os.environ[BACKEND_ENV] = backend
        try:
            inputs = [t.clone().requires_grad_(True) for t in [x] + weights]
            out = dynamic_aggregate(inputs[0], inputs[1:])
            results[backend] = [out] + list(torch.autograd.grad(out, inputs, grad))
        finally:
            del os.environ[BACKEND_ENV]
    errors = []
    for name, ours, ref in zip(('output', 'x grad', '5x5 grad', '7x7 grad'), results['triton'],
                               results['torch']):
        if not torch.allclose(ours, ref, rtol=1e-5, atol=1e-5):
            errors.append(f'{name}: max difference {(ours - ref).abs().max().item():.3g}')
    return errors


def check_expanded_output_gradient() -> list[str]:
    """``out.sum().backward()`` hands the backward an expanded gradient (all strides 0)."""
    attn, value, _ = make_inputs(1, 2, 7, 9, 3, 5, torch.float32)
    a, v = attn.requires_grad_(True), value.requires_grad_(True)
    grads = torch.autograd.grad(neighborhood_aggregate(a, v, backend='triton').sum(), (a, v))
    ref_a, ref_v = attn.detach().double().requires_grad_(), value.detach().double().requires_grad_()
    expected = torch.autograd.grad(na2d_av_reference(ref_a, ref_v).sum(), (ref_a, ref_v))
    return (compare('attn grad', grads[0], expected[0], torch.float32)
            + compare('value grad', grads[1], expected[1], torch.float32))


def check_bad_dtype() -> list[str]:
    attn = torch.ones(1, 1, 5, 5, 9, dtype=torch.int32)
    value = torch.ones(1, 1, 5, 5, 2, dtype=torch.int32)
    try:
        neighborhood_aggregate(attn, value, backend='triton')
    except TypeError as error:
        return [] if 'float32, bfloat16, float16' in str(error) else [f'message: {error}']
    return ['int32 operands were accepted']


CASES: list[tuple[str, Callable[[], list[str]]]] = [
    ('border definition', check_border_definition),
    ('integer dtype refused', check_bad_dtype),
    ('model dynamic_aggregate via MMOVERLOCK_NA_BACKEND', check_model_aggregation),
    # the model's kernels: 5 (small), 13 (stage 3) and 7 (stage 4); odd sizes, H or W == K
    ('K=13 13x17 (H == K)', lambda: check_against_reference(1, 1, 13, 17, 3, 13)),
    ('K=13 15x14 B=2 G=2', lambda: check_against_reference(2, 2, 15, 14, 2, 13)),
    ('K=5 9x11 B=2 G=3', lambda: check_against_reference(2, 3, 9, 11, 4, 5)),
    ('K=5 5x5 (map == kernel)', lambda: check_against_reference(1, 2, 5, 5, 3, 5)),
    ('K=7 7x10 G=2 (H == K)', lambda: check_against_reference(1, 2, 7, 10, 5, 7)),
    ('K=7 12x9 channels-last view', lambda: check_against_reference(
        2, 2, 12, 9, 3, 7, layout='channels_last_view')),
    # the other odd kernels
    ('K=3 8x9', lambda: check_against_reference(1, 2, 8, 9, 3, 3)),
    ('K=9 9x12', lambda: check_against_reference(1, 1, 9, 12, 2, 9)),
    ('K=11 12x11', lambda: check_against_reference(1, 1, 12, 11, 2, 11)),
    ('K=15 15x16', lambda: check_against_reference(1, 1, 15, 16, 2, 15)),
    ('K=17 17x17', lambda: check_against_reference(1, 1, 17, 17, 2, 17)),
    # channel tiling: more channels than one tile (forward and value grad tile the channels, the
    # weight gradient loops over them)
    ('K=3 6x7 C=40', lambda: check_against_reference(1, 1, 6, 7, 40, 3)),
    # the weight gradient's channel chunks within its segments of taps (K = 9: 8 + 1 taps a row)
    ('K=9 9x10 C=40', lambda: check_against_reference(1, 1, 9, 10, 40, 9)),
    # half precision (float32 accumulation) and float64 (float64 accumulation)
    ('bf16 K=5 9x11', lambda: check_against_reference(2, 2, 9, 11, 8, 5, torch.bfloat16)),
    ('bf16 K=13 13x15 channels-last view', lambda: check_against_reference(
        1, 2, 13, 15, 4, 13, torch.bfloat16, layout='channels_last_view')),
    ('fp16 K=5 9x11', lambda: check_against_reference(2, 2, 9, 11, 8, 5, torch.float16)),
    ('fp16 K=7 10x7', lambda: check_against_reference(1, 2, 10, 7, 6, 7, torch.float16)),
    ('fp64 K=5 7x8', lambda: check_against_reference(1, 2, 7, 8, 3, 5, torch.float64)),
    # float32 weights with bfloat16 values (autocast's softmax output with a half-precision map):
    # float32 output, each gradient in its operand's dtype
    ('fp32 attn, bf16 value', lambda: check_against_reference(
        1, 2, 8, 9, 4, 5, torch.float32, value_dtype=torch.bfloat16)),
    # one gradient only; a broadcast output gradient
    ('expanded output gradient (out.sum())', check_expanded_output_gradient),
    ('attn grad only', lambda: check_against_reference(1, 2, 7, 9, 3, 5, needs=(True, False))),
    ('value grad only', lambda: check_against_reference(1, 2, 7, 9, 3, 5, needs=(False, True))),
]


def main() -> int:
    torch.set_num_threads(1)
    if not triton_interpreted():
        print('the kernels are compiled, not interpreted: TRITON_INTERPRET was not seen')
        return 1
    failures: dict[str, list[str]] = {}
    start = time.perf_counter()
    for name, case in CASES:
        t0 = time.perf_counter()
        try:
            errors = case()
        except Exception:  # noqa: BLE001  (reported as a failed case)
            errors = [traceback.format_exc()]
        status = 'ok' if not errors else 'FAIL'
        print(f'{status} {name} ({time.perf_counter() - t0:.1f} s)', *errors, sep='\n    ')
        if errors:
            failures[name] = errors
    summary = dict(cases=len(CASES), failures=sorted(failures),
                   seconds=round(time.perf_counter() - start, 1))
    print('SUMMARY', json.dumps(summary))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
