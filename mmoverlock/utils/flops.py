"""Parameters and multiply-accumulates (MACs) of a model, counted op by op during a forward pass.

What is counted (one multiply-add = one MAC, the unit of the OverLoCK and GLNet papers' "FLOPs";
biases, normalisation, pooling, resampling and element-wise ops are not counted):

=============== ==================================================================================
category        operators
=============== ==================================================================================
``conv``        every convolution as defined: ``N * prod(kernel shape) * prod(output spatial
                size)`` (output elements x C_in / groups x kernel area; a dilated kernel counts
                its ``k * k`` taps); transposed: input size
``matmul``      ``mm``, ``addmm``, ``bmm``, ``baddbmm`` (so ``nn.Linear``, ``@``/``matmul`` and
                ``einsum``, which decompose into them) and fused scaled-dot-product attention
                (``B * heads * L * S * (E + Ev)``). ContMix's affinity ``q^T k`` lands here
                (its ``weight_proj``, a 1x1 convolution over the affinities, under ``conv``).
``aggregation`` the neighbourhood aggregation :func:`mmoverlock.ops.neighborhood_aggregate`:
                ``B * G * H * W * K * K * C`` for weights ``(B, G, H, W, K*K)`` and values
                ``(B, G, H, W, C)``, whatever backend (ours, natten, unfold) computes it
=============== ==================================================================================

Why not ``mmengine.analysis.FlopAnalyzer`` (fvcore's jit-trace counter)? Tracing turns tensor sizes
into tensors, and the Python shape logic of the model (the aggregation op's argument checks,
ContMix's resize rule) then fails or is frozen into the trace. The counter here is the same idea
(per-operator handles) on PyTorch's dispatcher instead (a ``TorchDispatchMode``): the model runs as
usual, on real tensors or on the ``meta`` device (no compute, no memory: a whole OverLoCK-B at
224 x 224 is counted in about a second). Python-level functions that stand for one operator (the
aggregation op, whose internals are loops of gathers) are counted through *function handles*: for
the duration of the count the function is replaced, in every ``mmoverlock`` module that refers to
it, by a wrapper that counts its MACs from its arguments and hides its inner operators from the
counter (so an implementation built on ``bmm`` or ``einsum`` is not counted twice).

Convolutions are counted as defined on every device: while counting, mmoverlock's CPU routes
(:func:`mmoverlock.ops.depthwise_conv.same_conv` may run an 11x11 / 13x13 depthwise kernel
zero-embedded in a 15x15 one or a dilated kernel on a map padded beforehand, and times its routes
the first time it sees a shape) are switched off (:func:`mmoverlock.ops.depthwise_conv.as_defined`),
so a 13x13 kernel counts 169 taps on the CPU as on the ``meta`` device, once per call. A
training-form OverLoCK counted in eval mode merges each DilatedReparamBlock's branches into its
K x K deploy kernel on the fly and is counted as that one kernel;
:func:`mmoverlock.apis.analysis.count_model_complexity` with ``train_form=True``
(``get_flops.py --train-form``) counts every branch.

Extending: :func:`register_op_handle` (a dispatcher operator, e.g. a ``torch.library`` custom op)
and :func:`register_function_handle` (a Python function, by qualified name).

The published OverLoCK figures are reproduced (``tests/test_flops.py``) by ``conv + matmul`` MACs
(:meth:`Complexity.paper`) of the re-parameterised (deploy) classifier at 224 x 224 and its
parameters without ``aux_head`` (unused at inference); the aggregation op adds about 1 % on top.
See ``tools/analysis/get_flops.py`` for the numbers and the evidence.
"""
from __future__ import annotations

import functools
import importlib
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops.depthwise_conv import as_defined

__all__ = ['CATEGORIES', 'PAPER_CATEGORIES', 'Complexity', 'MacCounter', 'count_complexity',
           'count_parameters', 'format_count', 'neighborhood_macs', 'register_function_handle',
           'register_op_handle']

#: Every category of MACs, in table order.
CATEGORIES = ('conv', 'matmul', 'aggregation')
#: The categories the OverLoCK and GLNet papers count (fvcore's defaults for these models: the
#: aggregation op, natten's ``na2d_av`` in the authors' code, is not seen by fvcore).
PAPER_CATEGORIES = ('conv', 'matmul')

#: ``handle(args, kwargs, output) -> MACs`` of one operator call.
Handle = Callable[[tuple, dict, Any], int]


# ----------------------------------------------------------------------------------------------
# Operator handles (dispatcher level)
# ----------------------------------------------------------------------------------------------
def _conv_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    x, weight = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get('transposed', False))
    spatial = x.shape[2:] if transposed else out.shape[2:]
    return x.shape[0] * math.prod(weight.shape) * math.prod(spatial)


def _mkldnn_conv_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    # (input, weight, bias, padding, stride, dilation, groups): never transposed
    return args[0].shape[0] * math.prod(args[1].shape) * math.prod(out.shape[2:])


def _mm_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    a, b = args[0], args[1]
    return math.prod(a.shape) * b.shape[-1]


def _addmm_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    a, b = args[1], args[2]
    return math.prod(a.shape) * b.shape[-1]


def _sdpa_macs(args: tuple, kwargs: dict, out: Any) -> int:
    q, k, v = args[0], args[1], args[2]
    # q (..., L, E), k (..., S, E), v (..., S, Ev): q k^T and attn v
    return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


_OP_HANDLES: dict[str, tuple[str, Handle]] = {
    'aten.convolution': ('conv', _conv_macs),
    # what mmoverlock.ops.pointwise_conv2d calls on the CPU
    'aten.mkldnn_convolution': ('conv', _mkldnn_conv_macs),
    'aten.mm': ('matmul', _mm_macs),
    'aten.bmm': ('matmul', _mm_macs),
    'aten.addmm': ('matmul', _addmm_macs),
    'aten._addmm_activation': ('matmul', _addmm_macs),
    'aten.baddbmm': ('matmul', _addmm_macs),
    'aten._scaled_dot_product_flash_attention_for_cpu': ('matmul', _sdpa_macs),
    'aten._scaled_dot_product_flash_attention': ('matmul', _sdpa_macs),
    'aten._scaled_dot_product_efficient_attention': ('matmul', _sdpa_macs),
    'aten._scaled_dot_product_cudnn_attention': ('matmul', _sdpa_macs),
    'aten._scaled_dot_product_fused_attention_overrideable': ('matmul', _sdpa_macs),
}


def register_op_handle(op: str, category: str, handle: Handle) -> None:
    """Count the dispatcher operator ``op`` (its overload packet, e.g. ``'mylib.my_op'`` for
    ``torch.ops.mylib.my_op``) in ``category`` with ``handle(args, kwargs, output) -> MACs``."""
    _OP_HANDLES[op] = (category, handle)


# ----------------------------------------------------------------------------------------------
# Function handles (Python level)
# ----------------------------------------------------------------------------------------------
def neighborhood_macs(attn: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> int:
    """MACs of ``neighborhood_aggregate(attn (B, G, H, W, K*K), value (B, G, H, W, C))``:
    ``B * G * H * W * K*K * C``."""
    return attn.numel() * value.shape[-1]


#: qualified name -> (category, ``handle(*args, **kwargs) -> MACs``)
_FUNCTION_HANDLES: dict[str, tuple[str, Callable[..., int]]] = {
    'mmoverlock.ops.neighborhood.neighborhood_aggregate': ('aggregation', neighborhood_macs),
}
#: Packages whose modules are searched for references to counted functions.
PATCHED_PACKAGES = ('mmoverlock',)


def register_function_handle(qualname: str, category: str, handle: Callable[..., int]) -> None:
    """Count every call of the Python function ``qualname`` (``'package.module.function'``) as
    one operator of ``category`` with ``handle(*args, **kwargs) -> MACs`` (the function's own
    arguments); the operators it runs inside are not counted."""
    _FUNCTION_HANDLES[qualname] = (category, handle)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
@dataclass
class Complexity:
    """What :func:`count_complexity` found.

    Attributes:
        macs: ``{module name: Counter(category -> MACs)}``, inclusive of submodules; ``''`` is the
            whole model (including ops run outside any submodule).
        operators: ``Counter(operator -> MACs)`` over the whole model, e.g. ``convolution``,
            ``addmm``, ``neighborhood_aggregate``.
        params: ``{module name: parameters}``, inclusive; ``''`` is the whole model (less the
            excluded prefixes).
        excluded_params: Parameters left out through ``exclude_params``.
        calls: ``Counter(operator -> number of calls)`` of the counted operators.
        order: Module names in registration order (for tables).
    """

    macs: dict[str, Counter] = field(default_factory=dict)
    operators: Counter = field(default_factory=Counter)
    params: dict[str, int] = field(default_factory=dict)
    excluded_params: int = 0
    calls: Counter = field(default_factory=Counter)
    order: list[str] = field(default_factory=list)

    def total(self, module: str = '', categories: Iterable[str] = CATEGORIES) -> int:
        """MACs of ``module`` (``''``: the model) summed over ``categories``."""
        counts = self.macs.get(module, Counter())
        return int(sum(counts[c] for c in categories))

    def paper(self, module: str = '') -> int:
        """MACs as the OverLoCK / GLNet papers count them (``PAPER_CATEGORIES``)."""
        return self.total(module, PAPER_CATEGORIES)

    def category(self, name: str, module: str = '') -> int:
        """MACs of one category."""
        return int(self.macs.get(module, Counter())[name])

    @property
    def num_params(self) -> int:
        """Parameters of the model (less the excluded prefixes)."""
        return self.params.get('', 0)

    def children(self, module: str = '') -> list[str]:
        """Names of the direct submodules of ``module`` that hold MACs or parameters."""
        depth = module.count('.') + 1 if module else 0
        prefix = module + '.' if module else ''
        names = set(self.macs) | set(self.params)
        rank = {name: i for i, name in enumerate(self.order)}
        return sorted((n for n in names if n.startswith(prefix) and n and n.count('.') == depth),
                      key=lambda n: (rank.get(n, len(rank)), n))


def format_count(value: float, unit: str = 'G', digits: int = 3) -> str:
    """``5.6431e9 -> '5.643'`` for unit ``'G'`` (``'M'``, ``'K'`` and ``''`` also accepted)."""
    scale = {'G': 1e9, 'M': 1e6, 'K': 1e3, '': 1.0}[unit]
    return f'{value / scale:.{digits}f}'


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------
class MacCounter(TorchDispatchMode):
    """Dispatch mode that counts MACs per operator and per (innermost) module.

    Use :func:`count_complexity`; or, by hand::

        with MacCounter(model) as counter:
            model(x)
        counter.inclusive()  # MACs per module

    While it is active, mmoverlock's depthwise convolutions run (and are counted) as defined,
    without their CPU detours (:func:`mmoverlock.ops.depthwise_conv.as_defined`).

    Args:
        model: Module whose submodules the ops are attributed to (optional).
    """

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.model = model
        self.own: dict[str, Counter] = {}
        self.operators: Counter = Counter()
        self.calls: Counter = Counter()
        self._stack: list[str] = []
        self._hidden = 0
        self._hooks: list = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._contexts = ExitStack()

    # -- bookkeeping ---------------------------------------------------------------------------
    def add(self, category: str, operator: str, macs: int) -> None:
        """Record ``macs`` of ``operator`` in ``category`` for the current module."""
        scope = self._stack[-1] if self._stack else ''
        self.own.setdefault(scope, Counter())[category] += int(macs)
        self.operators[operator] += int(macs)
        self.calls[operator] += 1

    @contextmanager
    def hidden(self) -> Iterator[None]:
        """Operators run inside this context are not counted."""
        self._hidden += 1
        try:
            yield
        finally:
            self._hidden -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._hidden:
            name = str(func.overloadpacket)
            entry = _OP_HANDLES.get(name)
            if entry is not None:
                category, handle = entry
                self.add(category, name.split('.', 1)[-1], handle(args, kwargs, out))
        return out

    # -- module attribution --------------------------------------------------------------------
    def _install_hooks(self) -> None:
        if self.model is None:
            return
        for name, module in self.model.named_modules():
            self._hooks.append(module.register_forward_pre_hook(
                functools.partial(self._enter, name)))
            self._hooks.append(module.register_forward_hook(
                functools.partial(self._leave, name), always_call=True))

    def _enter(self, name: str, module: nn.Module, args: tuple) -> None:
        self._stack.append(name)

    def _leave(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self._stack and self._stack[-1] == name:
            self._stack.pop()

    # -- function handles ----------------------------------------------------------------------
    def _wrap(self, qualname: str, original: Callable, category: str,
              handle: Callable[..., int]) -> Callable:
        operator = qualname.rsplit('.', 1)[-1]

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._hidden:
                return original(*args, **kwargs)
            with self.hidden():
                out = original(*args, **kwargs)
            self.add(category, operator, handle(*args, **kwargs))
            return out

        return counted

    def _install_function_handles(self) -> None:
        for qualname, (category, handle) in _FUNCTION_HANDLES.items():
            module_name, _, attr = qualname.rpartition('.')
            try:
                original = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError):
                continue
            wrapper = self._wrap(qualname, original, category, handle)
            for mod_name, mod in list(sys.modules.items()):
                if mod is None or not any(mod_name == p or mod_name.startswith(p + '.')
                                          for p in PATCHED_PACKAGES):
                    continue
                for key, value in list(vars(mod).items()):
                    if value is original:
                        self._patches.append((mod, key, value))
                        setattr(mod, key, wrapper)

    def _remove_all(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for mod, key, value in reversed(self._patches):
            setattr(mod, key, value)
        self._patches.clear()
        self._stack.clear()
        self._contexts.close()

    def __enter__(self) -> MacCounter:
        self._install_hooks()
        self._install_function_handles()
        # mmoverlock's CPU detours off (zero-embedded / pre-padded depthwise kernels): the
        # convolutions run, and are counted, as defined
        self._contexts.enter_context(as_defined())
        try:
            return super().__enter__()
        except BaseException:
            self._remove_all()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._remove_all()

    # -- results -------------------------------------------------------------------------------
    def inclusive(self) -> dict[str, Counter]:
        """MACs per module including submodules (``''`` = everything)."""
        totals: dict[str, Counter] = {'': Counter()}
        for scope, counts in self.own.items():
            parts = scope.split('.') if scope else []
            for i in range(len(parts) + 1):
                totals.setdefault('.'.join(parts[:i]), Counter()).update(counts)
        return totals


def count_parameters(model: nn.Module,
                     exclude: Sequence[str] = ()) -> tuple[dict[str, int], int]:
    """Parameters per module (inclusive; ``''`` = whole model) and the number excluded.

    Args:
        model: The model.
        exclude: Name prefixes (e.g. ``'aux_head.'``) whose parameters are not counted.
    """
    per_module: dict[str, int] = {'': 0}
    excluded = 0
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in exclude):
            excluded += param.numel()
            continue
        parts = name.split('.')[:-1]
        for i in range(len(parts) + 1):
            key = '.'.join(parts[:i])
            per_module[key] = per_module.get(key, 0) + param.numel()
    return per_module, excluded


def count_complexity(model: nn.Module,
                     inputs: Union[Tensor, Sequence[Any], Mapping[str, Any], Callable[[], Any]],
                     exclude_params: Sequence[str] = ()) -> Complexity:
    """Count the parameters of ``model`` and the MACs of one forward pass without gradients.

    Args:
        model: The model, in the mode to count (normally ``eval()``).
        inputs: A tensor, a sequence of positional arguments, a mapping of keyword arguments, or
            a callable that runs the forward pass itself (e.g. ``lambda: model(x, samples,
            mode='tensor')``). Tensors on the ``meta`` device count without computing.
        exclude_params: Parameter-name prefixes not counted (e.g. ``('aux_head.',)``).

    Returns:
        The :class:`Complexity`.
    """
    if callable(inputs) and not isinstance(inputs, (Tensor, nn.Module)):
        run = inputs
    elif isinstance(inputs, Tensor):
        def run() -> Any:
            return model(inputs)
    elif isinstance(inputs, Mapping):
        def run() -> Any:
            return model(**inputs)
    else:
        def run() -> Any:
            return model(*inputs)
    with torch.no_grad(), MacCounter(model) as counter:
        run()
    params, excluded = count_parameters(model, exclude_params)
    return Complexity(macs=counter.inclusive(), operators=counter.operators, params=params,
                      excluded_params=excluded, calls=counter.calls,
                      order=[name for name, _ in model.named_modules()])
