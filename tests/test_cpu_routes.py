"""Routes chosen by measurement on the CPU (mmoverlock.ops.cpu_routes) and the depthwise ops'
routes: every route gives the definition's result, the fixed mode takes the defaults, the
measuring mode takes the fastest and measures each key once."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from backbone_testing import spy_on_conv2d

from mmoverlock.ops import (
    cpu_routes,
    depthwise_conv,
    na2d_av_reference,
    neighborhood_aggregate,
    pointwise_conv,
    pointwise_conv2d,
)
from mmoverlock.ops.depthwise_conv import (
    _same_conv_routes,
    depthwise_weight_grad,
    same_conv,
    same_conv_default_route,
    weight_grad_default_route,
)


@pytest.fixture(autouse=True)
def fresh_routes(monkeypatch):
    """Every test starts without remembered choices or a cache file, in the measuring mode."""
    monkeypatch.delenv(cpu_routes.CACHE_ENV, raising=False)
    cpu_routes.clear_routes()
    with cpu_routes.routes_mode('measure'):
        yield
    cpu_routes.clear_routes()


def _weight_grad_by_definition(x, grad, k, d):
    pad = d * (k - 1) // 2
    xp = F.pad(x, [pad] * 4)
    h, w = x.shape[-2:]
    out = torch.zeros(x.shape[1], 1, k, k, dtype=x.dtype)
    for u in range(k):
        for v in range(k):
            out[:, 0, u, v] = (xp[:, :, d * u:d * u + h, d * v:d * v + w] * grad).sum((0, 2, 3))
    return out


CASES = [(3, 1), (3, 2), (3, 7), (5, 4), (7, 1), (9, 2), (11, 1), (13, 1), (17, 1)]


@pytest.mark.parametrize('kernel_size,dilation', CASES)
@pytest.mark.parametrize('channels_last', [True, False], ids=['cl', 'cf'])
def test_every_same_conv_route_is_the_convolution(kernel_size, dilation, channels_last) -> None:
    torch.manual_seed(kernel_size * 10 + dilation)
    x = torch.randn(2, 4, 23, 19, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(4, 1, kernel_size, kernel_size, dtype=torch.float64), None
    pad = dilation * (kernel_size - 1) // 2
    expected = F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=4)
    routes = _same_conv_routes(x, weight, bias, dilation)
    assert same_conv_default_route(kernel_size, dilation) in routes
    assert ('prepad' in routes) == (pad > 0)
    assert ('embed' in routes) == (dilation == 1 and kernel_size in depthwise_conv.EMBED_KERNEL)
    for name, route in routes.items():
        torch.testing.assert_close(route(), expected, atol=1e-12, rtol=1e-12, msg=name)
    torch.testing.assert_close(same_conv(x, weight, bias, dilation), expected, atol=1e-12,
                               rtol=1e-12)


#: (kernel, dilation, route): the FFT route exists for undilated kernels of 7 and more only.
GRAD_CASES = [(k, d, r) for k, d in CASES for r in ('native', 'grouped', 'fft')
              if r != 'fft' or (d == 1 and k >= 7)]


@pytest.mark.parametrize('kernel_size,dilation,route', GRAD_CASES)
def test_every_weight_grad_route_is_the_definition(kernel_size, dilation, route,
                                                   monkeypatch) -> None:
    torch.manual_seed(1)
    x, grad = (torch.randn(2, 3, 21, 19, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    weight = torch.randn(3, 1, kernel_size, kernel_size, dtype=torch.float64)
    chosen = []

    def force(op, key, candidates, default):
        chosen.append(sorted(candidates))
        return route

    monkeypatch.setattr(cpu_routes, 'choose', force)
    got = depthwise_weight_grad(x, grad, weight, dilation)
    expected = _weight_grad_by_definition(x, grad, kernel_size, dilation)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert route in chosen[0]


def test_fixed_mode_takes_the_defaults_without_measuring(monkeypatch) -> None:
    calls = spy_on_conv2d(monkeypatch, depthwise_conv)
    x = torch.randn(1, 4, 20, 22).contiguous(memory_format=torch.channels_last)
    with cpu_routes.routes_mode('fixed'):
        for k, d, expected in ((9, 2, ((36, 38), 9, 0)),     # dilated: padded beforehand
                               (13, 1, ((20, 22), 15, 7)),   # embedded in 15x15
                               (7, 1, ((20, 22), 7, 3))):    # as it is
            calls.clear()
            same_conv(x, torch.randn(4, 1, k, k), None, d)
            assert calls == [expected]
    assert cpu_routes.route_stats()['measured'] == 0
    assert weight_grad_default_route(3, 1, 10) == 'native'
    assert weight_grad_default_route(17, 1, 10 ** 6) == 'fft'
    assert weight_grad_default_route(17, 1, 10) == 'grouped'
    assert weight_grad_default_route(3, 2, 10 ** 6) == 'grouped'


def test_measuring_takes_the_fastest_once_per_key(monkeypatch) -> None:
    timings = {'direct': 3.0, 'prepad': 1.0}
    measured = []

    def fake_measure(candidates, repeats=2):
        measured.append(sorted(candidates))
        return {name: timings[name] for name in candidates}

    monkeypatch.setattr(cpu_routes, 'measure', fake_measure)
    x = torch.randn(1, 4, 20, 22)
    weight = torch.randn(4, 1, 3, 3)
    key = depthwise_conv.route_key(x, weight, 2, False)
    routes = _same_conv_routes(x, weight, None, 2)
    assert cpu_routes.choose('same_conv', key, routes, 'direct') == 'prepad'
    assert cpu_routes.choose('same_conv', key, routes, 'direct') == 'prepad'
    assert measured == [['direct', 'prepad']]  # measured once
    # a map of similar size shares the choice; another size bucket is measured anew
    assert depthwise_conv.route_key(torch.randn(1, 4, 21, 22), weight, 2, False) == key
    other = depthwise_conv.route_key(torch.randn(1, 4, 80, 88), weight, 2, False)
    timings.update(direct=0.5)
    assert cpu_routes.choose('same_conv', other, routes, 'prepad') == 'direct'
    assert len(measured) == 2
    stats = cpu_routes.route_stats()
    assert stats['measured'] == 2 and stats['seconds'] >= 0


def test_no_measuring_when_deterministic_or_counting(monkeypatch) -> None:
    monkeypatch.setattr(cpu_routes, 'measure', lambda *a, **k: pytest.fail('measured'))
    routes = {'a': lambda: None, 'b': lambda: None}
    torch.use_deterministic_algorithms(True)
    try:
        assert cpu_routes.choose('op', (1,), routes, 'b') == 'b'
    finally:
        torch.use_deterministic_algorithms(False)
    with depthwise_conv.as_defined():
        assert cpu_routes.choose('op', (1,), routes, 'b') == 'b'


def test_real_measurement_chooses_a_candidate() -> None:
    x = torch.randn(1, 8, 24, 24).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 1, 5, 5)
    out = same_conv(x, weight, None, 2)
    torch.testing.assert_close(out, F.conv2d(x, weight, padding=4, dilation=2, groups=8))
    stats = cpu_routes.route_stats()
    assert stats['measured'] == 1
    (key, route), = stats['choices'].items()
    assert route in ('direct', 'prepad') and key.startswith('same_conv')
    assert set(stats['timings'][key]) == {'direct', 'prepad'}


def test_disk_cache_keeps_choices_per_machine(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / 'routes.json'
    monkeypatch.setenv(cpu_routes.CACHE_ENV, str(cache))
    monkeypatch.setattr(cpu_routes, 'measure', lambda c, repeats=2: {'a': 2.0, 'b': 1.0})
    routes = {'a': lambda: None, 'b': lambda: None}
    assert cpu_routes.choose('op', (7,), routes, 'a') == 'b'
    data = json.loads(cache.read_text())
    assert list(data) == [cpu_routes.machine_key()]
    assert list(data[cpu_routes.machine_key()].values()) == ['b']
    # a new process (here: forgotten choices) reads the file instead of measuring
    cpu_routes.clear_routes()
    monkeypatch.setattr(cpu_routes, 'measure', lambda *a, **k: pytest.fail('measured'))
    assert cpu_routes.choose('op', (7,), routes, 'a') == 'b'
    key = cpu_routes.machine_key()
    assert torch.backends.cpu.get_cpu_capability() in key and torch.__version__ in key


def test_bad_settings_are_refused(monkeypatch) -> None:
    with pytest.raises(ValueError, match='one of'):
        cpu_routes.set_mode('fastest')
    monkeypatch.setenv(cpu_routes.MODE_ENV, 'sometimes')
    monkeypatch.setitem(cpu_routes._state, 'mode', None)
    with pytest.raises(ValueError, match='MMOVERLOCK_CPU_ROUTES'):
        cpu_routes.get_mode()
    monkeypatch.setitem(cpu_routes._state, 'mode', 'measure')
    with pytest.raises(ValueError, match='default route'):
        cpu_routes.choose('op', (1,), {'a': lambda: None}, 'b')


# ----------------------------------------------------------------------------------------------
# 1x1 convolutions (mmoverlock.ops.pointwise_conv): forward / input-gradient and weight-gradient
# routes
# ----------------------------------------------------------------------------------------------
def _pointwise_inputs(layout: str, in_ch: int = 6, out_ch: int = 10):
    gen = torch.Generator().manual_seed(in_ch * out_ch)
    full = torch.randn(2, in_ch + 3, 7, 9, generator=gen)
    if layout == 'cf':
        x = full[:, :in_ch].contiguous()
    elif layout == 'cl':
        x = full[:, :in_ch].contiguous(memory_format=torch.channels_last)
    else:  # a channel slice of a channels-last map, as OverLoCK's dynamic blocks pass
        x = full.contiguous(memory_format=torch.channels_last)[:, 2:2 + in_ch]
    return x, torch.randn(out_ch, in_ch, 1, 1, generator=gen), torch.randn(out_ch, generator=gen)


def _pointwise_by_definition(x, weight, bias):
    out = torch.einsum('bchw,oc->bohw', x.double(), weight.double()[:, :, 0, 0])
    return out if bias is None else out + bias.double()[:, None, None]


@pytest.mark.parametrize('layout', ['cf', 'cl', 'slice'])
@pytest.mark.parametrize('with_bias', [False, True])
def test_every_pointwise_route_is_the_convolution(layout, with_bias) -> None:
    x, weight, bias = _pointwise_inputs(layout)
    bias = bias if with_bias else None
    assert pointwise_conv.pointwise_route_key(x, weight, bias)[3] == layout.replace(
        'slice', 'strided')
    expected = _pointwise_by_definition(x, weight, bias)
    routes = pointwise_conv._conv1x1_routes(x, weight, bias)
    assert set(routes) == {'onednn', 'aten'} and pointwise_conv.FORWARD_DEFAULT_ROUTE in routes
    for name, route in routes.items():
        torch.testing.assert_close(route().double(), expected, atol=1e-5, rtol=1e-5, msg=name)
    for mode in cpu_routes.MODES:
        with cpu_routes.routes_mode(mode):
            torch.testing.assert_close(pointwise_conv.conv1x1_routed(x, weight, bias).double(),
                                       expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('in_ch,out_ch', [(5, 12), (12, 5)])  # both shapes of the oneDNN product
def test_every_pointwise_weight_grad_route_is_the_definition(in_ch, out_ch) -> None:
    gen = torch.Generator().manual_seed(in_ch)
    grad_rows, x_rows = torch.randn(300, out_ch, generator=gen), torch.randn(300, in_ch,
                                                                             generator=gen)
    expected = torch.einsum('no,nc->oc', grad_rows.double(), x_rows.double())
    routes = pointwise_conv._weight_grad_routes(grad_rows, x_rows)
    assert set(routes) == {'onednn', 'mm'}
    assert pointwise_conv.WEIGHT_GRAD_DEFAULT_ROUTE in routes
    for name, route in routes.items():
        got = route()
        assert got.shape == (out_ch, in_ch)
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5, msg=name)


@pytest.mark.parametrize('forward_route', ['onednn', 'aten'])
@pytest.mark.parametrize('grad_route', ['onednn', 'mm'])
def test_pointwise_conv_with_every_route_pair(forward_route, grad_route, monkeypatch) -> None:
    """The autograd function, forced onto each pair of routes, against float64 autograd of the
    definition (forward, input, weight and bias gradients)."""
    asked = {}

    def force(op, key, candidates, default):
        asked[op] = sorted(candidates)
        return forward_route if op == 'pointwise_conv' else grad_route

    monkeypatch.setattr(cpu_routes, 'choose', force)
    x, weight, bias = _pointwise_inputs('cl')
    grad = torch.randn(2, 10, 7, 9, generator=torch.Generator().manual_seed(5))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = pointwise_conv2d(*leaves)
    out.backward(grad)
    ref = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = _pointwise_by_definition(*ref)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-5)
    assert asked == {'pointwise_conv': ['aten', 'onednn'],
                     'pointwise_weight_grad': ['mm', 'onednn']}


def test_pointwise_routes_are_measured_once_per_key_and_fixed_when_asked(monkeypatch) -> None:
    calls = []
    onednn = pointwise_conv._onednn_conv1x1

    def spy(*args):
        calls.append('onednn')
        return onednn(*args)

    monkeypatch.setattr(pointwise_conv, '_onednn_conv1x1', spy)
    table = {'onednn': 2.0, 'aten': 1.0}
    monkeypatch.setattr(cpu_routes, 'measure',
                        lambda candidates, repeats=2: {n: table[n] for n in candidates})
    x, weight, bias = _pointwise_inputs('cl')
    with torch.no_grad():
        pointwise_conv2d(x, weight, bias)
        pointwise_conv2d(x, weight, bias)
    stats = cpu_routes.route_stats()
    assert stats['measured'] == 1 and list(stats['choices'].values()) == ['aten']
    assert calls == []  # the (fake) measuring ran nothing, the chosen route is aten's
    # fixed: the default (oneDNN) without measuring
    cpu_routes.clear_routes()
    monkeypatch.setattr(cpu_routes, 'measure', lambda *a, **k: pytest.fail('measured'))
    with cpu_routes.routes_mode('fixed'), torch.no_grad():
        pointwise_conv2d(x, weight, bias)
    assert calls == ['onednn'] and pointwise_conv.FORWARD_DEFAULT_ROUTE == 'onednn'


# ----------------------------------------------------------------------------------------------
# Neighbourhood aggregation (mmoverlock.ops.neighborhood, backend='torch' on the CPU)
# ----------------------------------------------------------------------------------------------
def _aggregation_inputs(dtype, width=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(2, 2, 9, width, 25, generator=gen, dtype=torch.float64).softmax(-1)
    value = torch.randn(2, 2, 9, width, 3, generator=gen, dtype=torch.float64)
    return attn.to(dtype), value.to(dtype)


@pytest.mark.parametrize('route', ['sparse', 'banded', 'taps'])
def test_every_aggregation_route_is_the_definition(route, monkeypatch) -> None:
    """Each route, forced through the measuring hook, against the per-pixel definition: output
    and both gradients, in float64."""
    asked = []

    def force(op, key, candidates, default):
        asked.append((op, sorted(candidates), key[-1]))
        return route

    monkeypatch.setattr(cpu_routes, 'choose', force)
    attn, value = _aggregation_inputs(torch.float64)
    leaves = [attn.clone().requires_grad_(), value.clone().requires_grad_()]
    out = neighborhood_aggregate(*leaves, backend='torch')
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [attn.clone().requires_grad_(), value.clone().requires_grad_()]
    expected = na2d_av_reference(*ref)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=1e-12)
    assert asked == [('neighborhood_aggregate', ['banded', 'sparse', 'taps'], 'fwd+bwd')]


def test_aggregation_candidates_follow_the_dtype(monkeypatch) -> None:
    asked = []

    def force(op, key, candidates, default):
        asked.append((sorted(candidates), default))
        return default

    monkeypatch.setattr(cpu_routes, 'choose', force)
    for width in (11, 26, 51):  # K = 5: W <= 5 K: banded by default; beyond 10 K no candidate
        attn, value = _aggregation_inputs(torch.bfloat16, width)
        out = neighborhood_aggregate(attn, value, backend='torch')
        expected = na2d_av_reference(attn.float(), value.float())
        torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    # MKL's CSR product has no bfloat16: sparse is no candidate
    assert asked == [(['banded', 'taps'], 'banded'), (['banded', 'taps'], 'taps'),
                     (['taps'], 'taps')]
    asked.clear()
    attn, value = _aggregation_inputs(torch.float32, 51)
    neighborhood_aggregate(attn, value, backend='torch')
    assert asked == [(['sparse', 'taps'], 'sparse')]


def test_aggregation_measures_forward_and_training_apart() -> None:
    attn, value = _aggregation_inputs(torch.float32)
    expected = na2d_av_reference(attn, value)
    with torch.no_grad():
        out = neighborhood_aggregate(attn, value, backend='torch')
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    leaves = [attn.clone().requires_grad_(), value.clone().requires_grad_()]
    out = neighborhood_aggregate(*leaves, backend='torch')
    # the measuring ran forward + backward on copies: nothing reached the caller's leaves
    assert leaves[0].grad is None and leaves[1].grad is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    stats = cpu_routes.route_stats()
    keys = sorted(stats['choices'])
    assert stats['measured'] == 2 and all(k.startswith('neighborhood_aggregate') for k in keys)
    assert any("'fwd'" in k for k in keys) and any("'fwd+bwd'" in k for k in keys)
    for key in keys:
        assert set(stats['timings'][key]) == {'sparse', 'banded', 'taps'}
    # the same call again is not measured again
    neighborhood_aggregate(*leaves, backend='torch')
    assert cpu_routes.route_stats()['measured'] == 2


def test_tools_keep_route_choices_in_a_cache_file(tmp_path: Path, monkeypatch) -> None:
    """tools/*.py (run_main) keep the measured choices in ~/.cache/mmoverlock unless the
    environment names another file, and restore the environment for in-process callers."""
    from helpers import load_tool
    load_tool('train')  # puts tools/ on sys.path
    import _cli
    monkeypatch.setenv('HOME', str(tmp_path))
    seen = []
    monkeypatch.setattr(cpu_routes, 'measure', lambda c, repeats=2: {'a': 2.0, 'b': 1.0})
    _cli.run_main(lambda: seen.append(
        (os.environ.get(cpu_routes.CACHE_ENV),
         cpu_routes.choose('op', (3,), {'a': lambda: None, 'b': lambda: None}, 'a'))))
    expected = tmp_path / '.cache' / 'mmoverlock' / 'cpu_routes.json'
    assert seen == [(str(expected), 'b')]
    assert list(json.loads(expected.read_text())[cpu_routes.machine_key()].values()) == ['b']
    assert cpu_routes.CACHE_ENV not in os.environ
