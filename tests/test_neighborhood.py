"""The clamped-window neighbourhood aggregation and its relative position bias."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmoverlock.ops import (
    available_backends,
    cpu_routes,
    na2d_av_reference,
    neighborhood,
    neighborhood_aggregate,
    relative_position_bias,
    window_starts,
)
from mmoverlock.ops.neighborhood import BANDED_MAX_WIDTH_RATIO


def inputs(b: int, g: int, h: int, w: int, c: int, k: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(b, g, h, w, k * k, generator=gen, dtype=dtype).softmax(-1)
    value = torch.randn(b, g, h, w, c, generator=gen, dtype=dtype)
    return attn, value


def test_window_starts_are_clamped_inwards() -> None:
    assert window_starts(7, 3).tolist() == [0, 0, 1, 2, 3, 4, 4]
    assert window_starts(5, 5).tolist() == [0, 0, 0, 0, 0]
    assert window_starts(9, 5).tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 4]


def test_corner_pixel_uses_the_shifted_window_not_padding() -> None:
    # value = 1 everywhere; attn puts all weight on tap (0, 0). At pixel (0, 0) the window is
    # shifted inwards, so tap (0, 0) is pixel (0, 0) itself: a zero-padded window would give 0.
    attn = torch.zeros(1, 1, 6, 6, 9)
    attn[..., 0] = 1
    value = torch.arange(36.0).view(1, 1, 6, 6, 1)
    out = neighborhood_aggregate(attn, value, backend='torch')
    assert out[0, 0, 0, 0, 0] == value[0, 0, 0, 0, 0]
    assert out[0, 0, 3, 3, 0] == value[0, 0, 2, 2, 0]  # interior: centred window
    assert out[0, 0, 5, 5, 0] == value[0, 0, 3, 3, 0]  # far corner: window starts at H - K


ROUTES = ['sparse', 'banded', 'taps']  # the routes of backend='torch'


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('h, w, k', [(5, 5, 5), (7, 12, 5), (13, 9, 7), (8, 8, 3), (14, 18, 13)])
def test_matches_brute_force_loop(h: int, w: int, k: int, route: str) -> None:
    attn, value = inputs(2, 3, h, w, 4, k)
    out = neighborhood_aggregate(attn, value, backend=route)
    assert torch.allclose(out, na2d_av_reference(attn, value), atol=1e-5)


def test_torch_backend_picks_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    # the fixed routes (without measuring; the measured ones: tests/test_cpu_routes.py)
    monkeypatch.setattr(cpu_routes, 'get_mode', lambda: 'fixed')
    attn, value = inputs(1, 2, 9, 9, 2, 3)
    attn.requires_grad_(True)
    # on the CPU with MKL: the sparse product
    assert torch.backends.mkl.is_available()
    out = neighborhood_aggregate(attn, value, backend='torch')
    assert '_SparseAggregate' in type(out.grad_fn).__name__
    # elsewhere banded while W <= BANDED_MAX_WIDTH_RATIO * K, the tap loop beyond
    monkeypatch.setattr(torch.backends.mkl, 'is_available', lambda: False)
    monkeypatch.setattr(neighborhood, '_MKL_AVAILABLE', False)  # read once at import
    k = 3
    narrow = inputs(1, 2, 9, BANDED_MAX_WIDTH_RATIO * k, 2, k)
    wide = inputs(1, 2, 9, BANDED_MAX_WIDTH_RATIO * k + 1, 2, k)
    for (attn, value), route in ((narrow, 'banded'), (wide, 'taps')):
        attn.requires_grad_(True)
        out = neighborhood_aggregate(attn, value, backend='torch')
        assert ('_NeighborhoodAggregate' in type(out.grad_fn).__name__) is (route == 'taps')
        assert torch.allclose(out, neighborhood_aggregate(attn, value, backend=route))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_torch_backend_handles_half_precision(dtype: torch.dtype) -> None:
    # MKL's CSR product has no bf16 / fp16 kernels: such maps take another route
    attn, value = inputs(1, 2, 9, 10, 4, 5)
    attn, value = attn.to(dtype).requires_grad_(True), value.to(dtype).requires_grad_(True)
    out = neighborhood_aggregate(attn, value, backend='torch')
    out.float().sum().backward()
    assert out.dtype == dtype and attn.grad is not None and value.grad is not None
    expected = na2d_av_reference(attn.detach().float(), value.detach().float())
    assert torch.allclose(out.float(), expected, atol=3e-2)


def test_sparse_route_gradient_of_one_input_only() -> None:
    attn, value = inputs(2, 2, 7, 8, 3, 5, dtype=torch.float64)
    grad = torch.randn(2, 2, 7, 8, 3, dtype=torch.float64)
    for needs in ((True, False), (False, True)):
        a, v = attn.clone().requires_grad_(needs[0]), value.clone().requires_grad_(needs[1])
        ref_a, ref_v = attn.clone().requires_grad_(needs[0]), value.clone().requires_grad_(needs[1])
        neighborhood_aggregate(a, v, backend='sparse').backward(grad)
        na2d_av_reference(ref_a, ref_v).backward(grad)
        for ours, ref in ((a, ref_a), (v, ref_v)):
            assert (ours.grad is None) is (ref.grad is None)
            if ref.grad is not None:
                assert torch.allclose(ours.grad, ref.grad, atol=1e-10)


def test_sparse_route_is_silent() -> None:
    # PyTorch warns once per process that CSR tensors are "in beta" and about invariant checks;
    # users see neither (a fresh process: the warnings are once per process)
    code = ('import torch\n'
            'from mmoverlock.ops import neighborhood_aggregate\n'
            'a = torch.rand(1, 1, 6, 6, 9, requires_grad=True)\n'
            'v = torch.rand(1, 1, 6, 6, 2, requires_grad=True)\n'
            'neighborhood_aggregate(a, v, backend="sparse").sum().backward()\n')
    result = subprocess.run([sys.executable, '-W', 'error', '-c', code], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == '', result.stderr


def test_unfold_baseline_agrees() -> None:
    attn, value = inputs(2, 2, 11, 14, 3, 7)
    expected = neighborhood_aggregate(attn, value, backend='torch')
    assert torch.allclose(neighborhood_aggregate(attn, value, backend='unfold'), expected,
                          atol=1e-5)


@pytest.mark.parametrize('route', ROUTES)
def test_gradients_match_brute_force_loop(route: str) -> None:
    attn, value = inputs(1, 2, 9, 11, 3, 5, dtype=torch.float64)
    attn.requires_grad_(True)
    value.requires_grad_(True)
    grad = torch.randn(1, 2, 9, 11, 3, dtype=torch.float64)
    ours = torch.autograd.grad(neighborhood_aggregate(attn, value, backend=route),
                               (attn, value), grad)
    ref = torch.autograd.grad(na2d_av_reference(attn, value), (attn, value), grad)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize('route', ROUTES)
def test_gradcheck_float64(route: str) -> None:
    attn, value = inputs(1, 2, 6, 7, 2, 3, dtype=torch.float64)
    attn.requires_grad_(True)
    value.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, v: neighborhood_aggregate(a, v, backend=route), (attn, value))


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('h, w, k', [(9, 10, 5), (14, 18, 13), (7, 7, 7)])
def test_agrees_with_natten(h: int, w: int, k: int, route: str) -> None:
    from natten.functional import na2d_av  # part of the pinned stack (tools/setup_env.sh)
    assert 'natten' in available_backends()
    attn, value = inputs(2, 2, h, w, 8, k)
    ours = neighborhood_aggregate(attn, value, backend=route)
    assert torch.allclose(ours, na2d_av(attn, value, k, 1), atol=1e-5)
    assert torch.allclose(neighborhood_aggregate(attn, value, backend='natten'), ours, atol=1e-5)


def test_relative_position_bias_agrees_with_natten() -> None:
    from natten.functional import na2d_qk
    k, h, w = 5, 9, 11
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1)
    zeros = torch.zeros(1, 3, h, w, 4)
    expected = na2d_qk(zeros, torch.randn(1, 3, h, w, 4), k, 1, rpb=rpb)[0]
    assert torch.equal(relative_position_bias(rpb, h, w), expected)


def test_relative_position_bias_definition() -> None:
    k, h, w = 3, 5, 4
    rpb = torch.randn(2, 2 * k - 1, 2 * k - 1)
    bias = relative_position_bias(rpb, h, w)
    rs, cs = window_starts(h, k), window_starts(w, k)
    for i in range(h):
        for j in range(w):
            for u in range(k):
                for v in range(k):
                    expected = rpb[:, rs[i] + u - i + k - 1, cs[j] + v - j + k - 1]
                    assert torch.equal(bias[:, i, j, u * k + v], expected)


def test_index_tensors_are_built_once_per_device() -> None:
    """The gather indices are copied to a device once, not per call (a copy to a GPU blocks the
    host); 'meta' stands in for a GPU here."""
    first = neighborhood.window_index(9, 3, 'meta')
    assert first.device.type == 'meta' and first.shape == (3, 9)
    assert neighborhood.window_index(9, 3, torch.device('meta')) is first
    assert neighborhood.bias_index(9, 3, 'meta') is neighborhood.bias_index(9, 3, 'meta')
    assert torch.equal(neighborhood.window_index(9, 3), neighborhood.window_index(9, 3, 'cpu'))
    rpb = torch.randn(2, 5, 5, device='meta')
    assert relative_position_bias(rpb, 6, 7).shape == (2, 6, 7, 9)
    calls = neighborhood._index_on.cache_info().misses
    relative_position_bias(rpb, 6, 7)
    assert neighborhood._index_on.cache_info().misses == calls


def test_clear_errors_for_impossible_inputs() -> None:
    attn, value = inputs(1, 1, 4, 9, 2, 5)
    with pytest.raises(ValueError, match='at least as large as the kernel.*side of 4'):
        neighborhood_aggregate(attn, value)
    attn, value = inputs(1, 1, 6, 6, 2, 3)
    with pytest.raises(ValueError, match='must agree'):
        neighborhood_aggregate(attn, value[:, :, :5])
    with pytest.raises(ValueError, match='K\\*K'):
        neighborhood_aggregate(attn[..., :8], value)
    with pytest.raises(ValueError, match='unknown neighbourhood-aggregation backend'):
        neighborhood_aggregate(attn, value, backend='cuda-magic')


@pytest.mark.parametrize('route', ['taps', 'sparse'])
def test_route_does_not_materialise_unfolded_values(route: str) -> None:
    # The tap loop and the sparse product keep only their inputs (or a same-sized copy) for
    # backward, far below the K*K-times larger unfolded tensor. Measured through the allocations
    # autograd keeps.
    attn, value = inputs(1, 2, 32, 32, 16, 13)
    attn.requires_grad_(True)
    value.requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        neighborhood_aggregate(attn, value, backend=route)
    assert sum(saved) <= attn.numel() + value.numel()


@pytest.mark.parametrize('limit', [2**31, 50])
def test_block_diagonal_pattern_of_the_sparse_route(monkeypatch: pytest.MonkeyPatch,
                                                    limit: int) -> None:
    from mmoverlock.ops import neighborhood
    monkeypatch.setattr(neighborhood, 'INT32_INDEX_LIMIT', limit)
    neighborhood._block_diagonal_pattern_cpu.cache_clear()
    h, w, k, blocks = 4, 5, 3, 3
    crow, col = neighborhood._block_diagonal_pattern_cpu(h, w, k, blocks)
    assert crow.dtype == col.dtype == (torch.int32 if limit == 2**31 else torch.int64)
    pixels = h * w
    one_crow, one_col, *_ = neighborhood._sparse_pattern_cpu(h, w, k)
    one = torch.sparse_csr_tensor(one_crow, one_col, torch.ones(one_col.numel()),
                                  size=(pixels, pixels), check_invariants=True).to_dense()
    whole = torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()),
                                    size=(blocks * pixels, blocks * pixels),
                                    check_invariants=True).to_dense()
    assert torch.equal(whole, torch.block_diag(*[one] * blocks))
    # built once per shape
    assert neighborhood._block_diagonal_pattern_cpu(h, w, k, blocks)[1] is col
    neighborhood._block_diagonal_pattern_cpu.cache_clear()
