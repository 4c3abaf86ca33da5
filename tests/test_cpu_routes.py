"""Routes chosen by measurement on the CPU (mmoverlock.ops.cpu_routes) and the depthwise ops'
routes: every route gives the definition's result, the fixed mode takes the defaults, the
measuring mode takes the fastest and measures each key once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmoverlock.ops import cpu_routes, depthwise_conv
from mmoverlock.ops.depthwise_conv import (
    _same_conv_routes,
    depthwise_weight_grad,
    same_conv,
    same_conv_default_route,
    weight_grad_default_route,
)


@pytest.fixture(autouse=True)
def fresh_routes():
    """Every test starts without remembered choices, in the measuring mode."""
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
    calls = []
    conv2d = F.conv2d

    def spy(inp, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
        calls.append((tuple(inp.shape[-2:]), w.shape[-1], padding))
        return conv2d(inp, w, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(depthwise_conv.F, 'conv2d', spy)
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
