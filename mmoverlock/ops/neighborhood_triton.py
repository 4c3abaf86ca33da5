"""Triton kernels of the clamped-window neighbourhood aggregation (``backend='triton'``).

The op is the one of :mod:`mmoverlock.ops.neighborhood` (natten 0.17's ``na2d_av``): for a kernel
``K`` on an ``H x W`` map, with the window start ``s(i) = clamp(i - K // 2, 0, H - K)``,

    out[b, g, i, j, c] = sum_{u, v} attn[b, g, i, j, u * K + v] * value[b, g, s(i) + u, s(j) + v, c]

Three kernels, none with atomics, each program owning the block of the output it writes. All
three work on ``(pixels, channels)`` tiles: ``BLOCK_P`` consecutive pixels of one (image, group)
in row-major order over ``H * W`` (so blocks run across rows without idle lanes) x ``BLOCK_C``
channels, a pixel's channels in one thread or a few neighbouring threads (read with 16-byte vector
loads where the channel stride is 1 and the other strides and the channel count are multiples of
16, as in the model's views). They accumulate in registers, tap after tap, and reduce across
threads only where the math sums over channels (the weight gradient):

- forward: a program owns a ``[BLOCK_P, BLOCK_C]`` output tile and walks the ``K*K`` taps (the
  window rows in a loop, the ``K`` taps of a row unrolled so that their loads are independent),
  each tap loading the ``[BLOCK_P]`` weights of that tap and the ``[BLOCK_P, BLOCK_C]`` values at
  ``(s(y) + u, s(x) + v)`` and adding ``a[:, None] * v`` to the accumulator. The weights (``K*K``
  per pixel, most of the bytes: 10x the values for OverLoCK's K = 13 and 16 channels per group) are
  read one tap at a time per pixel, a pixel's taps lying in a few cache lines that the successive
  taps reuse; the values are a gather that the caches serve (every value is read by ``K*K``
  windows).
- weight gradient: ``dattn[p, t] = sum_c dout[p, c] * value[window(p, t), c]``. The
  ``[BLOCK_P, BLOCK_C]`` output-gradient tile is loaded once (once per window row and channel chunk
  when the channels exceed ``BLOCK_C``); per tap a ``[BLOCK_P, BLOCK_C]`` value tile is multiplied
  with it and summed over the channels only (within a thread and a few neighbouring lanes). The
  sums of a window row are gathered into ``[BLOCK_P, BLOCK_T]`` tiles of ``BLOCK_T`` consecutive
  taps (8, or ``K`` rounded up to a power of two when smaller) and each tile is stored whole, so a
  warp writes runs of consecutive taps rather than one element per pixel, each in its own sector.
- value gradient: the transpose of the forward (a scatter in its terms) written as a gather: for
  each value position ``(y, x)`` the pixels whose windows contain it form a rectangle
  ``[i_lo(y), i_hi(y)] x [j_lo(x), j_hi(x)]`` (``s`` is monotone), ``K`` long in the interior and up
  to ``K + K // 2`` at the borders where the clamped windows pile up; each such pixel ``(i, j)``
  contributes ``attn[i, j, (y - s(i)) * K + (x - s(j))] * dout[i, j]``. A program owns a
  ``[BLOCK_P, BLOCK_C]`` tile of value positions x channels and walks the largest rectangle of its
  block, rows in a loop, columns in unrolled runs of ``BLOCK_J = K // 2 + 1`` (a lane outside its
  own position's rectangle is masked), each step a ``[BLOCK_P]`` weight gather and a
  ``[BLOCK_P, BLOCK_C]`` output-gradient load added to the accumulator.

Operands may have any strides (OverLoCK passes channel-contiguous views of channels-last maps; the
kernels read them in place, fastest when the channel stride is 1) and float32, bfloat16, float16 or
float64 elements; sums are accumulated in float32 (float64 for float64 operands) and results are
written in the operands' dtype (the promoted dtype when attn and value differ, like ``attn *
value``). The output and the value gradient are laid out in the memory order of the values, so a
channels-last caller gets channels-last rows back.

On CUDA tensors the kernels are compiled by Triton; on CPU tensors they run only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which the CPU tests use.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ['na2d_av_triton', 'triton_interpreted']

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: Tile sizes. ``BLOCK_C``: the channels rounded up to a power of two, at most ``_MAX_BLOCK_C``;
#: ``BLOCK_P``: enough pixels for one 16-byte vector of channels a thread of a ``_NUM_WARPS``-warp
#: program (64 pixels for 16 bfloat16 channels, 32 for float32), within ``[_MIN_BLOCK_P,
#: _MAX_BLOCK_P]``; ``BLOCK_T`` (weight gradient): at most ``_MAX_BLOCK_T`` taps a stored tile.
#: Chosen from ptxas's resource report for sm_90 (Triton 3.8; K = 5, 7, 13, 17, 16 and 32
#: channels, float32 and bfloat16, the model's channels-last views: 32-71 registers a thread, no
#: spills, the value and output-gradient tiles read with 16-byte vector loads). Not yet timed on a
#: GPU.
_MAX_BLOCK_C = 32
_MIN_BLOCK_P = 16
_MAX_BLOCK_P = 128
_MAX_BLOCK_T = 8
_NUM_WARPS = 4


@triton.jit
def _window_start(i, length, K: tl.constexpr):
    return tl.minimum(tl.maximum(i - K // 2, 0), length - K)


@triton.jit
def _program_coordinates(n_pblk, n_cblk, G):
    """Decode the flat program id: channel blocks fastest, then pixel blocks, then (b, g)."""
    pid = tl.program_id(0)
    cblk = pid % n_cblk
    rest = pid // n_cblk
    pblk = rest % n_pblk
    bg = rest // n_pblk
    return (bg // G).to(tl.int64), (bg % G).to(tl.int64), pblk, cblk


@triton.jit
def _na_forward_kernel(
        attn_ptr, value_ptr, out_ptr, G, H, W, C, n_pblk, n_cblk,
        sa_b, sa_g, sa_h, sa_w, sa_t, sv_b, sv_g, sv_h, sv_w, sv_c,
        so_b, so_g, so_h, so_w, so_c,
        K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    b, g, pblk, cblk = _program_coordinates(n_pblk, n_cblk, G)
    attn_ptr += b * sa_b + g * sa_g
    value_ptr += b * sv_b + g * sv_g
    out_ptr += b * so_b + g * so_g

    p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    y = p // W
    x = p % W
    c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = p_mask[:, None] & (c < C)[None, :]
    # each pixel's weights (tap 0) and the first value of its window (tap (0, 0))
    a_pix = attn_ptr + y * sa_h + x * sa_w
    v_win = value_ptr + (_window_start(y, H, K) * sv_h + _window_start(x, W, K) * sv_w)[:, None] \
        + (c * sv_c)[None, :]

    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for u in range(K):
        a_row = a_pix + u * K * sa_t
        v_row = v_win + u * sv_h
        for v in tl.static_range(K):  # K independent load pairs per window row
            a = tl.load(a_row + v * sa_t, mask=p_mask, other=0.0)
            val = tl.load(v_row + v * sv_w, mask=mask, other=0.0)
            acc += a.to(ACC)[:, None] * val.to(ACC)
    out = out_ptr + (y * so_h + x * so_w)[:, None] + (c * so_c)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tap_dots(taps, gr, v_first, mask, sv_w, N: tl.constexpr, BLOCK_T: tl.constexpr,
              ADD: tl.constexpr, ACC: tl.constexpr):
    """``taps[:, v] (+)= sum_c gr[:, c] * value[r, x0 + v, c]`` for the first ``N`` of the
    ``BLOCK_T`` taps of a segment (``v_first``: the ``(pixels, channels)`` pointers to
    ``value[r, x0, c]``); ``ADD``: add to ``taps`` (a further channel chunk) rather than fill them.
    """
    tap = tl.arange(0, BLOCK_T)[None, :]
    for v in tl.static_range(BLOCK_T):
        if v < N:
            val = tl.load(v_first + v * sv_w, mask=mask, other=0.0)
            dot = tl.sum(gr * val.to(ACC), axis=1)[:, None]  # over the channels only
            if ADD:
                dot += taps
            taps = tl.where(tap == v, dot, taps)
    return taps


@triton.jit
def _na_attn_grad_kernel(
        grad_ptr, value_ptr, dattn_ptr, G, H, W, C, n_pblk,
        sg_b, sg_g, sg_h, sg_w, sg_c, sv_b, sv_g, sv_h, sv_w, sv_c,
        sd_b, sd_g, sd_h, sd_w, sd_t,
        K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        ONE_CHUNK: tl.constexpr, ACC: tl.constexpr):
    b, g, pblk, _ = _program_coordinates(n_pblk, 1, G)
    grad_ptr += b * sg_b + g * sg_g
    value_ptr += b * sv_b + g * sv_g
    dattn_ptr += b * sd_b + g * sd_g

    p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    y = p // W
    x = p % W
    c = tl.arange(0, BLOCK_C)
    g_pix = grad_ptr + (y * sg_h + x * sg_w)[:, None]
    v_win = value_ptr + (_window_start(y, H, K) * sv_h + _window_start(x, W, K) * sv_w)[:, None]
    tap = tl.arange(0, BLOCK_T)
    d_pix = dattn_ptr + (y * sd_h + x * sd_w)[:, None] + (tap * sd_t)[None, :]
    if ONE_CHUNK:  # all channels in one tile: read the output gradient once
        mask = p_mask[:, None] & (c < C)[None, :]
        gr = tl.load(g_pix + (c * sg_c)[None, :], mask=mask, other=0.0).to(ACC)
        v_win += (c * sv_c)[None, :]

    for u in range(K):  # window rows
        for v0 in tl.static_range(0, K, BLOCK_T):  # segments of BLOCK_T taps, each stored whole
            taps = tl.zeros([BLOCK_P, BLOCK_T], dtype=ACC)
            v_first = v_win + u * sv_h + v0 * sv_w
            if ONE_CHUNK:
                taps = _tap_dots(taps, gr, v_first, mask, sv_w, K - v0, BLOCK_T, False, ACC)
            else:
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + c
                    mask = p_mask[:, None] & (cc < C)[None, :]
                    gr = tl.load(g_pix + (cc * sg_c)[None, :], mask=mask, other=0.0).to(ACC)
                    taps = _tap_dots(taps, gr, v_first + (cc * sv_c)[None, :], mask, sv_w,
                                     K - v0, BLOCK_T, True, ACC)
            tl.store(d_pix + (u * K + v0) * sd_t, taps.to(dattn_ptr.dtype.element_ty),
                     mask=p_mask[:, None] & (tap < K - v0)[None, :])


@triton.jit
def _na_value_grad_kernel(
        attn_ptr, grad_ptr, dvalue_ptr, G, H, W, C, n_pblk, n_cblk,
        sa_b, sa_g, sa_h, sa_w, sa_t, sg_b, sg_g, sg_h, sg_w, sg_c,
        sd_b, sd_g, sd_h, sd_w, sd_c,
        K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
        ACC: tl.constexpr):
    b, g, pblk, cblk = _program_coordinates(n_pblk, n_cblk, G)
    attn_ptr += b * sa_b + g * sa_g
    grad_ptr += b * sg_b + g * sg_g
    dvalue_ptr += b * sd_b + g * sd_g

    # value positions (y, x) of this block
    p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    y = p // W
    x = p % W
    c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = (c < C)[None, :]
    g_ch = grad_ptr + (c * sg_c)[None, :]
    # pixels i whose window [s(i), s(i) + K) holds y: s(i) in [y - K + 1, y]
    i_lo = tl.where(y - K + 1 <= 0, 0, y - K + 1 + K // 2)
    i_hi = tl.where(y >= H - K, H - 1, y + K // 2)
    j_lo = tl.where(x - K + 1 <= 0, 0, x - K + 1 + K // 2)
    j_hi = tl.where(x >= W - K, W - 1, x + K // 2)
    n_i = tl.max(tl.where(p_mask, i_hi - i_lo + 1, 0), axis=0)
    n_j = tl.max(tl.where(p_mask, j_hi - j_lo + 1, 0), axis=0)

    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for di in range(0, n_i):  # rectangle rows
        i = i_lo + di
        i_mask = p_mask & (i <= i_hi)
        a_row = attn_ptr + i * sa_h + (y - _window_start(i, H, K)) * K * sa_t
        g_row = g_ch + (i * sg_h)[:, None]
        for dj0 in range(0, n_j, BLOCK_J):  # rectangle columns, BLOCK_J at a time
            for dj in tl.static_range(BLOCK_J):
                j = j_lo + dj0 + dj
                m = i_mask & (j <= j_hi)
                a = tl.load(a_row + j * sa_w + (x - _window_start(j, W, K)) * sa_t, mask=m,
                            other=0.0)
                gr = tl.load(g_row + (j * sg_w)[:, None], mask=m[:, None] & c_mask, other=0.0)
                acc += a.to(ACC)[:, None] * gr.to(ACC)
    out = dvalue_ptr + (y * sd_h + x * sd_w)[:, None] + (c * sd_c)[None, :]
    tl.store(out, acc.to(dvalue_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def triton_interpreted() -> bool:
    """Whether this module's kernels run on Triton's interpreter (``TRITON_INTERPRET=1`` was set
    when the module was imported) rather than compiled for a GPU."""
    return type(_na_forward_kernel).__name__ == 'InterpretedFunction'


def _check_operands(attn: Tensor, value: Tensor) -> None:
    if attn.device != value.device:
        raise ValueError(f'attn is on {attn.device} but value on {value.device}; move both to '
                         'the same device')
    for name, t in (('attn', attn), ('value', value)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"backend='triton' takes float32, bfloat16, float16 or float64 "
                            f'tensors, got {name} of dtype {t.dtype}')
        if not _plane_fits_int32(t):
            raise ValueError(f'{name} spans 2**31 or more elements within one (image, group) '
                             'plane; the Triton kernels index a plane with 32-bit offsets. Use '
                             "smaller maps or backend='torch'")
    device = value.device.type
    if device == 'cpu':
        if not triton_interpreted():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors; on CPU tensors it runs only under Triton's "
                'interpreter, enabled by setting TRITON_INTERPRET=1 in the environment before '
                "mmoverlock's Triton kernels are first imported (for tests). Use "
                "backend='torch' (the CPU default) for CPU tensors.")
    elif device != 'cuda':
        raise RuntimeError(f"backend='triton' runs on CUDA tensors, got a {device} tensor; use "
                           "backend='torch'")


def _plane_fits_int32(t: Tensor) -> bool:
    """Whether every offset within one (image, group) plane fits the kernels' 32-bit arithmetic
    (the (image, group) offset itself is 64-bit)."""
    return sum((n - 1) * s for n, s in zip(t.shape[2:], t.stride()[2:])) < 2**31


def _acc_dtype(*tensors: Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _empty_in_order_of(like: Tensor, dtype: torch.dtype) -> Tensor:
    """An empty tensor shaped like ``like`` whose dimensions lie in memory in the order of
    ``like``'s strides (largest outermost; ties keep the logical order)."""
    strides = like.stride()
    order = sorted(range(like.dim()), key=lambda d: -strides[d])
    buffer = like.new_empty([like.shape[d] for d in order], dtype=dtype)
    return buffer.permute([order.index(d) for d in range(like.dim())])


def _programs(batch_groups: int, pixels: int, block_p: int, channels: int, block_c: int):
    n_pblk = triton.cdiv(pixels, block_p)
    n_cblk = triton.cdiv(channels, block_c)
    return n_pblk, n_cblk, (batch_groups * n_pblk * n_cblk,)


def _pixel_channel_tile(channels: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)`` of the ``(pixels, channels)`` tiles: about one 16-byte vector of
    channels a thread."""
    block_c = min(triton.next_power_of_2(channels), _MAX_BLOCK_C)
    vector = 16 // dtype.itemsize
    block_p = _NUM_WARPS * 32 * vector // block_c
    return max(_MIN_BLOCK_P, min(_MAX_BLOCK_P, block_p)), block_c


def _device_guard(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device's current stream)."""
    return torch.cuda.device(t.device) if t.device.type == 'cuda' else contextlib.nullcontext()


def _forward(attn: Tensor, value: Tensor, k: int) -> Tensor:
    b, g, h, w, c = value.shape
    out = _empty_in_order_of(value, torch.promote_types(attn.dtype, value.dtype))
    block_p, block_c = _pixel_channel_tile(c, value.dtype)
    n_pblk, n_cblk, grid = _programs(b * g, h * w, block_p, c, block_c)
    with _device_guard(value):
        _na_forward_kernel[grid](
            attn, value, out, g, h, w, c, n_pblk, n_cblk,
            *attn.stride(), *value.stride(), *out.stride(),
            K=k, BLOCK_P=block_p, BLOCK_C=block_c,
            ACC=_acc_dtype(attn, value), num_warps=_NUM_WARPS)
    return out


def _attn_grad(grad: Tensor, attn: Tensor, value: Tensor, k: int) -> Tensor:
    b, g, h, w, c = value.shape
    dattn = _empty_in_order_of(attn, attn.dtype)
    block_p, block_c = _pixel_channel_tile(c, value.dtype)
    n_pblk, _, grid = _programs(b * g, h * w, block_p, 1, 1)
    with _device_guard(value):
        _na_attn_grad_kernel[grid](
            grad, value, dattn, g, h, w, c, n_pblk,
            *grad.stride(), *value.stride(), *dattn.stride(),
            K=k, BLOCK_P=block_p, BLOCK_T=min(triton.next_power_of_2(k), _MAX_BLOCK_T),
            BLOCK_C=block_c,
            ONE_CHUNK=c <= block_c, ACC=_acc_dtype(grad, value), num_warps=_NUM_WARPS)
    return dattn


def _value_grad(grad: Tensor, attn: Tensor, value: Tensor, k: int) -> Tensor:
    b, g, h, w, c = value.shape
    dvalue = _empty_in_order_of(value, value.dtype)
    block_p, block_c = _pixel_channel_tile(c, grad.dtype)
    n_pblk, n_cblk, grid = _programs(b * g, h * w, block_p, c, block_c)
    with _device_guard(value):
        _na_value_grad_kernel[grid](
            attn, grad, dvalue, g, h, w, c, n_pblk, n_cblk,
            *attn.stride(), *grad.stride(), *dvalue.stride(),
            K=k, BLOCK_P=block_p, BLOCK_J=k // 2 + 1, BLOCK_C=block_c,
            ACC=_acc_dtype(grad, attn), num_warps=_NUM_WARPS)
    return dvalue


class _TritonAggregate(torch.autograd.Function):
    """Forward and both gradients by the Triton kernels; keeps only attn and value."""

    @staticmethod
    def forward(ctx, attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
        ctx.save_for_backward(attn, value)
        ctx.kernel_size = kernel_size
        return _forward(attn, value, kernel_size)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        attn, value = ctx.saved_tensors
        k = ctx.kernel_size
        if not _plane_fits_int32(grad_out):  # a strided view of something huge: compact it
            grad_out = grad_out.contiguous()
        need_attn, need_value = ctx.needs_input_grad[:2]
        grad_attn = _attn_grad(grad_out, attn, value, k) if need_attn else None
        grad_value = _value_grad(grad_out, attn, value, k) if need_value else None
        return grad_attn, grad_value, None


def na2d_av_triton(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    """Neighbourhood aggregation by the Triton kernels (differentiable in both operands).

    Shapes are checked by the caller (:func:`mmoverlock.ops.neighborhood_aggregate`).

    Args:
        attn: ``(B, G, H, W, K*K)`` weights, any strides.
        value: ``(B, G, H, W, C)`` values, any strides, on the device of ``attn``.
        kernel_size: ``K`` (odd, at most ``min(H, W)``).

    Returns:
        ``(B, G, H, W, C)`` tensor of the promoted dtype of ``attn`` and ``value``, laid out in
        ``value``'s memory order.
    """
    _check_operands(attn, value)
    if attn.numel() == 0 or value.numel() == 0:
        out_dtype = torch.promote_types(attn.dtype, value.dtype)
        return (attn.sum(-1, keepdim=True) * value).to(out_dtype)  # empty; keeps autograd
    return _TritonAggregate.apply(attn, value, kernel_size)
