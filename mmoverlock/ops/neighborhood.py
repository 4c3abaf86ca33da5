"""2-D neighbourhood aggregation with clamped windows (natten 0.17's ``na2d_av`` semantics).

For a kernel ``K`` on an ``H x W`` map, pixel ``(i, j)`` aggregates the ``K x K`` window that is
centred on it but shifted inwards at the borders so that it always lies inside the map:

    s(i) = clamp(i - K // 2, 0, H - K)
    out[b, g, i, j, :] = sum_{u, v} attn[b, g, i, j, u * K + v] * value[b, g, s(i) + u, s(j) + v, :]

The pure-PyTorch backend (``backend='torch'``) has three routes:

- ``'sparse'``, on the CPU (with MKL): per (image, group) the aggregation is a sparse matrix with
  ``K * K`` entries per row, the weights as they are, times the ``(H*W, C)`` values; MKL's CSR
  product does it in one call, the backward is the transposed product and a sampled dense product
  (``torch.sparse.sampled_addmm``). Forward / forward + backward, 1 thread
  (``benchmarks/results/ops.md``): 4.1 / 19.5 ms for 2x8x32x32x16 values with K = 13 (banded
  10.8 / 29.7 ms), 0.8 / 3.6 ms with K = 5 (banded 3.6 / 10.2, tap loop 3.9 / 14.9 ms), 7.8 /
  39.5 ms on a 1x8x50x76x16 detection map (tap loop 34.8 / 128.8 ms). float32 / float64 only
  (MKL has no half-precision CSR product).

Elsewhere (CUDA tensors when neither Triton nor natten is there), by shape:

- ``'banded'``, for maps that are narrow relative to the kernel (``W <= 5 K``, e.g. OverLoCK's
  stage-3/4 maps at 512x512): each output row is one matrix product of a banded ``W x K*W`` weight
  matrix (the row's weights scattered to their value columns) with the ``K`` value rows it reads:
  ``W / K`` times the multiply-adds of the definition, but three large operations instead of
  ``K * K`` small ones, and plain autograd.
- ``'taps'``, for wide maps: a loop over the ``K * K`` taps that gathers one shifted copy of the
  values at a time, so its peak extra memory is a few value-sized buffers; its backward is written
  by hand because autograd through the loop would keep every gathered copy alive.

On CPU tensors ``backend='torch'`` takes whichever of the applicable routes
:mod:`mmoverlock.ops.cpu_routes` measured fastest for the shape (the forward alone, or forward +
backward where gradients are wanted), or with measuring off the fixed choice above (sparse where
it applies, else banded / taps by width). The choice depends on the processor: in bfloat16, on
2x8x32x32x16 values with K = 5, the banded route is 1.7x / 3.9x (forward / forward + backward)
faster than the tap loop on AVX-512 and 2.8x / 1.45x slower with AVX2 only; and on 8x8 maps the
banded route beats the sparse one (``benchmarks/results/routes_neighborhood.md``).

None materialises the ``(H, W, K*K, C)`` unfolded values of the obvious route, which needs
``K*K`` times the memory of the values (gigabytes at detection resolution).

On CUDA tensors the default is ``backend='triton'`` (:mod:`mmoverlock.ops.neighborhood_triton`:
Triton kernels for the forward and both gradients, float32 / bfloat16 / float16 with float32
accumulation) whenever Triton is importable. On CPU tensors that backend runs only under Triton's
interpreter (``TRITON_INTERPRET=1``, used by the tests).

When natten 0.17.x is installed it can serve as the backend (``backend='natten'``); all agree.

Under autocast the two hand-written functions (``'sparse'``, ``'taps'``) run in float32, their
operands cast on entry: MKL's CSR product has no half-precision kernel, and the tap loop is
element-wise arithmetic (which autocast does not lower) that accumulates ``K * K`` products into
one buffer, rounding at every step in half precision. The banded route is a batched matrix product
and runs in the autocast dtype, as autocast runs ``bmm``.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd

from . import cpu_routes

__all__ = ['window_starts', 'window_index', 'bias_index', 'relative_position_bias',
           'neighborhood_aggregate', 'na2d_av_reference', 'available_backends']

BACKEND_ENV = 'MMOVERLOCK_NA_BACKEND'
BACKENDS = ('auto', 'torch', 'sparse', 'banded', 'taps', 'natten', 'triton', 'unfold')
#: Where the sparse route does not apply, ``backend='torch'`` takes the banded route while
#: ``W <= BANDED_MAX_WIDTH_RATIO * K`` (measured on CPU: 3-8x faster than the tap loop at
#: W / K ~ 1-2.5, slower beyond ~5).
BANDED_MAX_WIDTH_RATIO = 5
#: On the CPU the banded route is a measured candidate up to ``W <= BANDED_MEASURE_MAX_WIDTH_RATIO
#: * K`` only: its banded weights take ``K * W`` values per pixel (memory growing with ``W^2``) and
#: it was 1.4-34x slower than the fastest route on every wider map measured
#: (``benchmarks/results/routes_neighborhood.md``).
BANDED_MEASURE_MAX_WIDTH_RATIO = 10
#: The sparse route's CSR indices are int32 below this many entries, int64 from there on.
INT32_INDEX_LIMIT = 2**31


# ----------------------------------------------------------------------------------------------
# Index arithmetic (pure functions, testable alone)
# ----------------------------------------------------------------------------------------------
def _cached_tensors(maxsize: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``functools.lru_cache`` for functions that build index tensors, the tensors built as
    ordinary ones even when the first call comes under ``torch.inference_mode()``: a tensor made
    there cannot be saved for a backward, and these are reused in training."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def build(*args: Any) -> Any:
            with torch.inference_mode(False):
                return fn(*args)
        return functools.lru_cache(maxsize=maxsize)(build)
    return decorate


def window_starts(length: int, kernel_size: int) -> Tensor:
    """Start of each position's clamped window along one axis: ``clamp(i - K//2, 0, L - K)``."""
    _check_length(length, kernel_size)
    idx = torch.arange(length)
    return (idx - kernel_size // 2).clamp(0, length - kernel_size)


@_cached_tensors(maxsize=256)
def _window_index_cpu(length: int, kernel_size: int) -> Tensor:
    starts = window_starts(length, kernel_size)
    return starts[None, :] + torch.arange(kernel_size)[:, None]  # (K, L): s(i) + u


@_cached_tensors(maxsize=256)
def _bias_index_cpu(length: int, kernel_size: int) -> Tensor:
    idx = torch.arange(length)
    starts = window_starts(length, kernel_size)
    taps = torch.arange(kernel_size)
    # (L, K): s(i) + u - i + K - 1, a row of the (2K - 1)-wide bias table
    return starts[:, None] + taps[None, :] - idx[:, None] + kernel_size - 1


@_cached_tensors(maxsize=256)
def _index_on(device: torch.device, build: Callable[..., Tensor], *args: int) -> Tensor:
    """``build(*args)`` (a cached CPU index) copied to ``device`` once and kept there.

    Copying a CPU tensor to a GPU is a blocking transfer: the host waits for the GPU to finish the
    work queued before it. Done per call, the index copies of the blocks would stall the host
    several times per forward; kept on the device, the forward queues its kernels without waiting.
    The indices are never written to.
    """
    return build(*args).to(device)


def _device_index(build: Callable[..., Tensor], device: torch.device | str, *args: int) -> Tensor:
    device = torch.device(device)
    if device.type == 'cpu':
        return build(*args)
    if device.index is None and device.type == 'cuda':
        device = torch.device('cuda', torch.cuda.current_device())
    return _index_on(device, build, *args)


def window_index(length: int, kernel_size: int, device: torch.device | str = 'cpu') -> Tensor:
    """``(K, L)`` tensor whose row ``u`` holds ``s(i) + u`` for every position ``i`` (built once
    per shape and device; not to be written to)."""
    return _device_index(_window_index_cpu, device, length, kernel_size)


def bias_index(length: int, kernel_size: int, device: torch.device | str = 'cpu') -> Tensor:
    """``(L, K)`` index into a ``2K - 1`` bias axis: ``s(i) + u - i + K - 1`` (built once per
    shape and device; not to be written to)."""
    return _device_index(_bias_index_cpu, device, length, kernel_size)


def relative_position_bias(rpb: Tensor, height: int, width: int) -> Tensor:
    """Expand a ``(G, 2K-1, 2K-1)`` relative position table to per-pixel tap biases.

    Returns a ``(G, H, W, K*K)`` tensor: ``rpb[g, s(i)+u-i+K-1, s(j)+v-j+K-1]`` for tap ``u*K+v``.
    """
    if rpb.dim() != 3 or rpb.shape[-1] != rpb.shape[-2] or rpb.shape[-1] % 2 == 0:
        raise ValueError(f'rpb must have shape (G, 2K-1, 2K-1), got {tuple(rpb.shape)}')
    k = (rpb.shape[-1] + 1) // 2
    flat = _device_index(_flat_bias_index_cpu, rpb.device, height, width, k)
    return rpb.flatten(1).index_select(1, flat).view(rpb.shape[0], height, width, k * k)


@_cached_tensors(maxsize=64)
def _flat_bias_index_cpu(height: int, width: int, kernel_size: int) -> Tensor:
    """``(H*W*K*K,)`` index into a flattened ``(2K-1)**2`` bias table (one gather, no
    broadcasting advanced indexing: ~10x faster on CPU)."""
    rows = bias_index(height, kernel_size)  # (H, K)
    cols = bias_index(width, kernel_size)  # (W, K)
    span = 2 * kernel_size - 1
    return (rows[:, None, :, None] * span + cols[None, :, None, :]).flatten()


def _check_length(length: int, kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be a positive odd number, got {kernel_size}')
    if length < kernel_size:
        raise ValueError(
            f'neighbourhood aggregation needs a map at least as large as the kernel: got a side '
            f'of {length} for kernel_size {kernel_size}. Resize the map up to the kernel size '
            '(as OverLoCK\'s ContMix does) or use a smaller kernel.')


def _check_shapes(attn: Tensor, value: Tensor) -> int:
    if attn.dim() != 5 or value.dim() != 5:
        raise ValueError('expected attn (B, G, H, W, K*K) and value (B, G, H, W, C), got '
                         f'{tuple(attn.shape)} and {tuple(value.shape)}')
    if attn.shape[:4] != value.shape[:4]:
        raise ValueError(f'attn {tuple(attn.shape)} and value {tuple(value.shape)} must agree in '
                         '(B, G, H, W)')
    taps = attn.shape[-1]
    k = math.isqrt(int(taps))
    if k * k != taps:
        raise ValueError(f'the last axis of attn must be K*K for a square kernel, got {taps}')
    _check_length(value.shape[2], k)
    _check_length(value.shape[3], k)
    return k


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch backend
# ----------------------------------------------------------------------------------------------
class _ColumnWindows:
    """Column bookkeeping of the clamped windows: for tap column ``v``, output columns split into
    the interior (window start ``j - K//2``: a shifted slice of the values) and the two borders
    (window start clamped to ``0`` / ``W - K``: a single value column, broadcast). Every operand is
    then a view, so no shifted copy of the values is ever made along the columns."""

    def __init__(self, width: int, kernel_size: int) -> None:
        self.k = kernel_size
        self.half = kernel_size // 2
        self.inner = width - kernel_size + 1
        self.width = width

    def regions(self, v: int):
        """Yield ``(output columns, value columns)`` slice pairs for tap column ``v``."""
        half, inner, k, w = self.half, self.inner, self.k, self.width
        yield slice(half, half + inner), slice(v, v + inner)
        if half:
            yield slice(0, half), slice(v, v + 1)
            yield slice(half + inner, w), slice(w - k + v, w - k + v + 1)


class _NeighborhoodAggregate(torch.autograd.Function):
    """Tap-by-tap aggregation with a hand-written backward (see module docstring).

    Works on planar values ``(B, G, C, H, W)``: one row-gathered copy of the values per tap row,
    views for every tap column, and per-tap weights ``(B, G, 1, H, W)`` broadcast over channels.
    """

    # float32 under autocast (module docstring); CPU (half-precision values) and CUDA (without
    # natten); each decorator acts on its own device's tensors and autocast state, so they stack
    @staticmethod
    @custom_fwd(device_type='cuda', cast_inputs=torch.float32)
    @custom_fwd(device_type='cpu', cast_inputs=torch.float32)
    def forward(ctx, attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
        k = kernel_size
        planar = value.permute(0, 1, 4, 2, 3).contiguous()  # free when value is a planar view
        height, width = planar.shape[-2:]
        rows = window_index(height, k, value.device)
        cols = _ColumnWindows(width, k)
        # tap-major copy of the weights: each tap's map is then contiguous
        taps = attn.permute(4, 0, 1, 2, 3).contiguous().unsqueeze(3)  # (K*K, B, G, 1, H, W)
        out = torch.zeros_like(planar)
        for u in range(k):
            shifted_rows = planar.index_select(3, rows[u])
            for v in range(k):
                tap = taps[u * k + v]
                for dst, src in cols.regions(v):
                    out[..., dst].addcmul_(shifted_rows[..., src], tap[..., dst])
        ctx.save_for_backward(attn, planar)
        ctx.kernel_size = k
        return out.permute(0, 1, 3, 4, 2)

    @staticmethod
    @custom_bwd(device_type='cuda')
    @custom_bwd(device_type='cpu')
    def backward(ctx, grad_out: Tensor):
        attn, planar = ctx.saved_tensors
        k = ctx.kernel_size
        height, width = planar.shape[-2:]
        rows = window_index(height, k, planar.device)
        cols = _ColumnWindows(width, k)
        grad = grad_out.permute(0, 1, 4, 2, 3).contiguous()  # planar (B, G, C, H, W)
        taps = attn.permute(4, 0, 1, 2, 3).contiguous().unsqueeze(3)
        need_attn, need_value = ctx.needs_input_grad[:2]
        tap_shape = (k * k,) + grad.shape[:2] + grad.shape[3:]  # (K*K, B, G, H, W)
        grad_taps = attn.new_empty(tap_shape) if need_attn else None
        grad_planar = torch.zeros_like(planar) if need_value else None
        for u in range(k):
            shifted_rows = planar.index_select(3, rows[u])
            row_grad = torch.zeros_like(planar) if need_value else None
            for v in range(k):
                t = u * k + v
                for dst, src in cols.regions(v):
                    g = grad[..., dst]
                    if need_attn:
                        grad_taps[t][..., dst] = (g * shifted_rows[..., src]).sum(2)
                    if need_value:
                        contrib = g * taps[t][..., dst]
                        if contrib.shape[-1] != src.stop - src.start:  # border: one column
                            contrib = contrib.sum(-1, keepdim=True)
                        row_grad[..., src] += contrib
            if need_value:
                grad_planar.index_add_(3, rows[u], row_grad)
        grad_attn = grad_taps.permute(1, 2, 3, 4, 0) if need_attn else None
        grad_value = grad_planar.permute(0, 1, 3, 4, 2) if need_value else None
        return grad_attn, grad_value, None


def _aggregate_taps(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    return _NeighborhoodAggregate.apply(attn, value, kernel_size)


@_cached_tensors(maxsize=64)
def _band_index_cpu(width: int, kernel_size: int) -> Tensor:
    """``(W, K*K)``: where tap ``(u, v)`` of output column ``j`` sits in a row of ``K`` stacked
    value rows of width ``W``: ``u * W + s(j) + v``."""
    k = kernel_size
    starts = window_starts(width, k)
    taps_u = torch.arange(k).view(1, k, 1)
    taps_v = torch.arange(k).view(1, 1, k)
    return (taps_u * width + starts.view(-1, 1, 1) + taps_v).reshape(width, k * k)


def _aggregate_banded(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    """Row-wise banded matrix products (see module docstring); autograd does the backward."""
    b, g, h, w, c = value.shape
    k = kernel_size
    index = _device_index(_band_index_cpu, value.device, w, k).expand(b, g, h, w, k * k)
    band = attn.new_zeros(b, g, h, w, k * w).scatter(-1, index, attn)  # (.., W, K*W)
    rows = window_index(h, k, value.device).t().reshape(-1)  # s(i) + u, i-major
    value_rows = value.index_select(2, rows).reshape(b * g * h, k * w, c)
    return torch.bmm(band.view(b * g * h, w, k * w), value_rows).view(b, g, h, w, c)


@_cached_tensors(maxsize=32)
def _sparse_pattern_cpu(height: int, width: int, kernel_size: int) -> tuple[Tensor, ...]:
    """CSR pattern of the ``(H*W, H*W)`` aggregation matrix of one (image, group) and of its
    transpose: ``(crow, col, t_crow, t_col, t_perm)``. Row ``p`` holds the ``K*K`` window pixels of
    pixel ``p`` in tap order (ascending, as CSR wants), so the weights ``attn[b, g]`` flattened
    are its values as they are; ``t_perm`` orders them for the transpose (``attn[..., t_perm]``).
    int32 indices: half the memory traffic, and what MKL's sparse routines take natively."""
    k, pixels = kernel_size, height * width
    rows = window_index(height, k).t()  # (H, K): s(i) + u
    cols = window_index(width, k).t()  # (W, K): s(j) + v
    col = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(-1)
    crow = torch.arange(0, pixels * k * k + 1, k * k)
    # the transpose lists the same entries by column, each column's rows ascending (stable sort)
    t_perm = torch.sort(col, stable=True).indices
    t_col = t_perm // (k * k)
    t_crow = torch.cat([crow.new_zeros(1), torch.bincount(col, minlength=pixels).cumsum(0)])
    return tuple(t.to(torch.int32) for t in (crow, col, t_crow, t_col, t_perm))


def _csr(crow: Tensor, col: Tensor, values: Tensor, pixels: int) -> Tensor:
    _consume_csr_beta_warning()
    # the pattern is built above and valid by construction: no per-call invariant checks
    return torch.sparse_csr_tensor(crow, col, values, size=(pixels, pixels), check_invariants=False)


@functools.lru_cache(maxsize=1)
def _consume_csr_beta_warning() -> None:
    """PyTorch warns once per process that CSR tensors are "in beta"; say nothing to our users."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        index = torch.zeros(2, dtype=torch.int32)
        torch.sparse_csr_tensor(index, index[:0], torch.zeros(0), size=(1, 1),
                                check_invariants=False)


def _sparse_forward(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    """``A @ V`` of :class:`_SparseAggregate` (float32 / float64 operands of one dtype)."""
    b, g, h, w, c = value.shape
    pixels = h * w
    weights = attn.reshape(b * g, -1)  # rows of (pixel, tap), tap fastest
    values = value.reshape(b * g * pixels, c)
    # all (image, group) pairs as one block-diagonal matrix: one product instead of B*G
    # (a few hundred fewer operator calls per block, which selective recomputation
    # intercepts one by one); its column indices are the pattern's, offset per block
    crow, col = _block_diagonal_pattern_cpu(h, w, kernel_size, b * g)
    matrix = _csr(crow, col, weights.view(-1), b * g * pixels)
    return torch.sparse.mm(matrix, values).view(b, g, h, w, c)


@_cached_tensors(maxsize=8)
def _block_diagonal_pattern_cpu(height: int, width: int, kernel_size: int,
                                blocks: int) -> tuple[Tensor, Tensor]:
    """``(crow, col)`` of the block-diagonal matrix of ``blocks`` (image, group) pairs, each
    block the pattern of :func:`_sparse_pattern_cpu` (its columns offset by the block's first
    pixel). int32 indices, 64-bit only where the entries of all blocks overflow int32. Kept for
    the few shapes a run sees (4 bytes per entry: 41 MB for OverLoCK-T's 13x13 kernels on two
    800x1216 images), so that building them is not repeated on every call."""
    _, col, *_ = _sparse_pattern_cpu(height, width, kernel_size)
    pixels, taps = height * width, kernel_size ** 2
    index_dtype = col.dtype if blocks * pixels * taps < INT32_INDEX_LIMIT else torch.int64
    col = col.to(index_dtype)
    offsets = torch.arange(0, blocks * pixels, pixels, dtype=index_dtype).view(-1, 1)
    crow = torch.arange(0, blocks * pixels * taps + 1, taps, dtype=index_dtype)
    return crow, (col.view(1, -1) + offsets).view(-1)


def _sparse_backward(attn: Tensor, value: Tensor, grad_out: Tensor, kernel_size: int,
                     need_attn: bool, need_value: bool) -> tuple[Optional[Tensor],
                                                                 Optional[Tensor]]:
    """``(dA, dV)`` of :class:`_SparseAggregate` for ``grad_out`` (each None if not needed)."""
    b, g, h, w, c = grad_out.shape
    pixels = h * w
    crow, col, t_crow, t_col, t_perm = _sparse_pattern_cpu(h, w, kernel_size)
    weights = attn.reshape(b * g, -1)
    values = value.reshape(b * g, pixels, c)
    grad = grad_out.reshape(b * g, pixels, c)
    grad_attn = grad_value = None
    if need_attn:
        sampled = [torch.sparse.sampled_addmm(_csr(crow, col, weights[i], pixels), grad[i],
                                              values[i].t(), beta=0.0).values()
                   for i in range(b * g)]
        grad_attn = torch.stack(sampled).view(b, g, h, w, -1)
    if need_value:
        transposed = weights.index_select(1, t_perm)
        products = torch.stack([
            torch.sparse.mm(_csr(t_crow, t_col, transposed[i], pixels), grad[i])
            for i in range(b * g)]).view(b, g, h, w, c)
        # in the values' own memory order (e.g. channels-last rows of channels when they are
        # a view of a channels-last map), so the gradient flows back through the caller's
        # reshapes as a view instead of a planar copy in a mixed layout
        grad_value = _empty_in_order_of(value.stride(), products).copy_(products)
    return grad_attn, grad_value


class _SparseAggregate(torch.autograd.Function):
    """The aggregation as a sparse-times-dense matrix product, per (image, group) a CSR matrix with
    ``K*K`` entries per row whose values are the weights (see ``_sparse_pattern_cpu``).

    forward ``out = A @ V``; backward ``dV = A^T @ dOut`` (the transpose's pattern is
    precomputed, its values are one gather of the weights) and ``dA = (dOut @ V^T)`` sampled at
    A's pattern (``torch.sparse.sampled_addmm``). Only the weights and values are kept.
    """

    @staticmethod
    @custom_fwd(device_type='cpu', cast_inputs=torch.float32)  # MKL: float32 / float64 only
    def forward(ctx, attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
        ctx.save_for_backward(attn, value)
        ctx.kernel_size = kernel_size
        return _sparse_forward(attn, value, kernel_size)

    @staticmethod
    @custom_bwd(device_type='cpu')
    def backward(ctx, grad_out: Tensor):
        attn, value = ctx.saved_tensors
        grad_attn, grad_value = _sparse_backward(attn, value, grad_out, ctx.kernel_size,
                                                 *ctx.needs_input_grad[:2])
        return grad_attn, grad_value, None


# Under torch.compile the sparse route is one opaque operator: dynamo cannot trace sparse tensors,
# and a graph break in every ContMix block (whose resume functions are then recompiled block by
# block) made compiling OverLoCK several times slower. Same kernels, same autocast policy.
@torch.library.custom_op('mmoverlock::sparse_aggregate', mutates_args=(), device_types='cpu')
def _sparse_aggregate_op(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    return _sparse_forward(attn, value, kernel_size)


@_sparse_aggregate_op.register_fake
def _(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    return value.new_empty(value.shape)


@torch.library.custom_op('mmoverlock::sparse_aggregate_backward', mutates_args=(),
                         device_types='cpu')
def _sparse_aggregate_backward_op(attn: Tensor, value: Tensor, grad_out: Tensor,
                                  kernel_size: int) -> tuple[Tensor, Tensor]:
    grad_attn, grad_value = _sparse_backward(attn, value, grad_out, kernel_size, True, True)
    return grad_attn, grad_value


@_sparse_aggregate_backward_op.register_fake
def _(attn: Tensor, value: Tensor, grad_out: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    return attn.new_empty(attn.shape), _empty_in_order_of(value.stride(), value)


def _sparse_aggregate_setup(ctx, inputs: tuple, output: Tensor) -> None:
    attn, value, kernel_size = inputs
    ctx.save_for_backward(attn, value)
    ctx.kernel_size = kernel_size


def _sparse_aggregate_grad(ctx, grad_out: Tensor) -> tuple:
    attn, value = ctx.saved_tensors
    grad_attn, grad_value = _sparse_aggregate_backward_op(attn, value, grad_out,
                                                          ctx.kernel_size)
    return grad_attn, grad_value, None


_sparse_aggregate_op.register_autograd(_sparse_aggregate_grad,
                                       setup_context=_sparse_aggregate_setup)
torch.library.register_autocast('mmoverlock::sparse_aggregate', 'cpu', torch.float32)


def _empty_in_order_of(strides: tuple[int, ...], like: Tensor) -> Tensor:
    """An empty tensor shaped like ``like`` whose dimensions are laid out in memory in the order
    of ``strides`` (largest stride outermost)."""
    order = sorted(range(len(strides)), key=lambda d: -strides[d])
    buffer = like.new_empty([like.shape[d] for d in order])
    return buffer.permute([order.index(d) for d in range(len(order))])


def _aggregate_sparse(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.mmoverlock.sparse_aggregate(attn, value, kernel_size)
    return _SparseAggregate.apply(attn, value, kernel_size)


def _aggregate_unfold(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    """The straightforward route, kept as the benchmark baseline: unfold the values into every
    interior window, replicate-pad the window grid to the map size, weight and sum. Its memory
    grows with ``K*K`` times the values; never use it at scale."""
    b, g, h, w, c = value.shape
    k = kernel_size
    planes = value.permute(0, 1, 4, 2, 3).reshape(b, g * c, h, w)
    windows = F.unfold(planes, k).view(b, g * c * k * k, h - k + 1, w - k + 1)
    windows = F.pad(windows, [k // 2] * 4, mode='replicate').view(b, g, c, k * k, h, w)
    out = (windows * attn.permute(0, 1, 4, 2, 3).unsqueeze(2)).sum(3)
    return out.permute(0, 1, 3, 4, 2)


# ----------------------------------------------------------------------------------------------
# natten backend (optional)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _natten_na2d_av():
    """natten's ``na2d_av`` if natten 0.17.x is importable, else ``None``."""
    try:
        import natten
        from natten.functional import na2d_av
    except Exception:  # noqa: BLE001  (missing, or a build that fails to import)
        return None
    version = tuple(int(p) for p in natten.__version__.split('.')[:2] if p.isdigit())
    if version[:2] != (0, 17):
        from mmengine.logging import print_log
        print_log(f'natten {natten.__version__} is installed but mmoverlock needs natten 0.17.x '
                  '(later releases removed na2d_av); using the PyTorch backend. Install '
                  '"natten==0.17.5" to use natten.', logger='current', level=30)
        return None
    return na2d_av


@functools.lru_cache(maxsize=1)
def _triton_kernels():
    """:mod:`mmoverlock.ops.neighborhood_triton` if Triton is importable, else the exception that
    importing it raised (imported on first use only: Triton is a GPU dependency)."""
    try:
        from . import neighborhood_triton
    except Exception as error:  # noqa: BLE001  (missing, or a build that fails to import)
        return error
    return neighborhood_triton


def _triton_available() -> bool:
    return not isinstance(_triton_kernels(), Exception)


def available_backends() -> list[str]:
    """Names accepted by ``neighborhood_aggregate(..., backend=...)`` on this installation
    (``'triton'`` takes CUDA tensors, CPU ones only under Triton's interpreter)."""
    return (['torch'] + (['natten'] if _natten_na2d_av() is not None else [])
            + (['triton'] if _triton_available() else []))


def _aggregate_natten(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    na2d_av = _natten_na2d_av()
    if na2d_av is None:
        raise RuntimeError('backend="natten" was requested but natten 0.17.x is not importable; '
                           'install it with tools/setup_env.sh or use backend="torch".')
    return na2d_av(attn.contiguous(), value.contiguous(), kernel_size, 1)


def _aggregate_triton(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    kernels = _triton_kernels()
    if isinstance(kernels, Exception):
        raise RuntimeError(f'backend="triton" was requested but Triton is not importable '
                           f'({type(kernels).__name__}: {kernels}); install the triton build that '
                           'matches torch, or use backend="torch".') from kernels
    return kernels.na2d_av_triton(attn, value, kernel_size)


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    backend = backend or os.environ.get(BACKEND_ENV, 'auto')
    if backend == 'auto':
        # On CUDA our Triton kernels, else natten's CUDA kernels (natten's CPU kernels are slower
        # than the PyTorch routes); the PyTorch routes everywhere else.
        if device.type == 'cuda':
            if _triton_available():
                return 'triton'
            if _natten_na2d_av() is not None:
                return 'natten'
        return 'torch'
    if backend not in BACKENDS:
        raise ValueError(f"unknown neighbourhood-aggregation backend {backend!r}: use 'auto', "
                         "'torch' (or one of its routes 'sparse' / 'banded' / 'taps'), 'natten', "
                         "'triton' or 'unfold' (the slow baseline)")
    return backend


def _sparse_applies(value: Tensor) -> bool:
    # MKL's CSR product takes float32 / float64 CPU tensors only (bf16 / fp16 maps, e.g. under
    # autocast, take the other routes)
    return (value.device.type == 'cpu' and value.dtype in (torch.float32, torch.float64)
            and _MKL_AVAILABLE)


#: Read once: dynamo breaks the graph at every ``torch.backends.mkl.is_available()`` call.
_MKL_AVAILABLE = torch.backends.mkl.is_available()


def torch_default_route(value: Tensor, kernel_size: int) -> str:
    """The fixed pure-PyTorch route (no measuring): ``'sparse'`` where it applies, else
    ``'banded'`` for ``W <= BANDED_MAX_WIDTH_RATIO * K`` and ``'taps'`` for wider maps.

    Args:
        value: ``(B, G, H, W, C)`` values.
        kernel_size: The window size ``K``.
    """
    if _sparse_applies(value):
        return 'sparse'
    return 'banded' if value.shape[3] <= BANDED_MAX_WIDTH_RATIO * kernel_size else 'taps'


_TORCH_ROUTES = {'sparse': _aggregate_sparse, 'banded': _aggregate_banded,
                 'taps': _aggregate_taps}


def _route_trial(route: str, attn: Tensor, value: Tensor, kernel_size: int,
                 backward: bool):
    """One run of a route on detached copies of the operands (for measuring): the forward, and
    with ``backward`` also the backward to the operands that want gradients."""
    def run() -> None:
        if not backward:
            _TORCH_ROUTES[route](attn, value, kernel_size)
            return
        with torch.enable_grad():
            a = attn.detach().requires_grad_(attn.requires_grad)
            v = value.detach().requires_grad_(value.requires_grad)
            out = _TORCH_ROUTES[route](a, v, kernel_size)
            out.backward(torch.ones_like(out))
    return run


def _torch_route(attn: Tensor, value: Tensor, kernel_size: int) -> str:
    """The pure-PyTorch route for these operands (see the module docstring): on the CPU the
    applicable route measured fastest (:mod:`mmoverlock.ops.cpu_routes`), elsewhere or with
    measuring off :func:`torch_default_route`."""
    default = torch_default_route(value, kernel_size)
    if value.device.type != 'cpu':
        return default
    backward = torch.is_grad_enabled() and (attn.requires_grad or value.requires_grad)
    banded = default == 'banded' or value.shape[3] <= BANDED_MEASURE_MAX_WIDTH_RATIO * kernel_size
    names = ((['sparse'] if _sparse_applies(value) else []) + (['banded'] if banded else [])
             + ['taps'])
    candidates = {name: _route_trial(name, attn, value, kernel_size, backward) for name in names}
    b, g, h, w, c = value.shape
    autocast = (str(torch.get_autocast_dtype('cpu')).replace('torch.', '')
                if torch.is_autocast_enabled('cpu') else None)
    key = (cpu_routes.size_bucket(b * g), cpu_routes.size_bucket(h), cpu_routes.size_bucket(w),
           c, kernel_size, str(value.dtype).replace('torch.', ''), autocast,
           value.is_contiguous(), 'fwd+bwd' if backward else 'fwd')
    return cpu_routes.choose('neighborhood_aggregate', key, candidates, default)


def neighborhood_aggregate(attn: Tensor, value: Tensor, backend: Optional[str] = None) -> Tensor:
    """Aggregate ``value`` over clamped ``K x K`` windows with per-pixel weights ``attn``.

    Args:
        attn: ``(B, G, H, W, K*K)`` weights, tap ``u * K + v`` (row-major).
        value: ``(B, G, H, W, C)`` values.
        backend: ``'torch'`` (the ``'sparse'``, ``'banded'`` or ``'taps'`` route, see the module
            docstring), ``'triton'`` (CUDA tensors; CPU ones only under ``TRITON_INTERPRET=1``),
            ``'natten'``, ``'unfold'`` (the memory-hungry baseline of the benchmarks) or
            ``'auto'`` (default, or the environment variable ``MMOVERLOCK_NA_BACKEND``): on CUDA
            Triton when importable, else natten when installed; PyTorch otherwise.

    Returns:
        ``(B, G, H, W, C)`` tensor.
    """
    k = _check_shapes(attn, value)
    backend = _resolve_backend(backend, value.device)
    if backend == 'natten':
        return _aggregate_natten(attn, value, k)
    if backend == 'triton':
        return _aggregate_triton(attn, value, k)
    if backend == 'unfold':
        return _aggregate_unfold(attn, value, k)
    if backend == 'torch':
        backend = _torch_route(attn, value, k)
    if backend == 'sparse':
        return _aggregate_sparse(attn, value, k)
    if backend == 'banded':
        return _aggregate_banded(attn, value, k)
    return _aggregate_taps(attn, value, k)


def na2d_av_reference(attn: Tensor, value: Tensor) -> Tensor:
    """Brute-force per-pixel loop of the definition; slow, for tests only."""
    k = _check_shapes(attn, value)
    _, _, height, width, _ = value.shape
    rs, cs = window_starts(height, k).tolist(), window_starts(width, k).tolist()
    out = torch.zeros_like(value)
    for i in range(height):
        for j in range(width):
            window = value[:, :, rs[i]:rs[i] + k, cs[j]:cs[j] + k, :].reshape(
                value.shape[0], value.shape[1], k * k, -1)
            out[:, :, i, j] = torch.einsum('bgt,bgtc->bgc', attn[:, :, i, j], window)
    return out
