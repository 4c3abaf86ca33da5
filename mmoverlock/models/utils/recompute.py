"""Activation recomputation for training: full (``with_cp``) and selective (the default).

Selective recomputation keeps, for the backward pass, only the outputs of the expensive operators
(dense convolutions and matrix products) and recomputes the cheap ones (depthwise convolutions,
norms, activations, element-wise arithmetic) from them. For OverLoCK this removes most of the
activation memory (every re-parameterisable branch and every element-wise intermediate of the 4x
wide MLPs) for a modest amount of extra compute.

Both modes run a block's forward a second time during backward. BatchNorm layers in training mode
would then update their running statistics twice; :func:`frozen_bn_stats` keeps the second run
from touching them, so checkpointed and plain training produce identical statistics.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ...ops import neighborhood  # noqa: F401  (defines mmoverlock::sparse_aggregate)

_aten = torch.ops.aten
# convolution ops (the oneDNN one is what mmoverlock.ops.pointwise_conv calls) -> index of `groups`
_CONVS = {_aten.convolution.default: 8, _aten.mkldnn_convolution.default: 6}
# matrix products, dense and sparse (the CPU route of the ContMix aggregation is a CSR product;
# under torch.compile it is the one operator mmoverlock::sparse_aggregate)
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
            _aten._sparse_addmm.default, torch.ops.mmoverlock.sparse_aggregate.default}
#: A widening 1x1 conv's output is kept when recomputing it costs at least this many
#: multiply-adds (its input channels) per element kept.
WIDENING_KEEP_MIN_CHANNELS = 256


def save_dense_products(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy: save dense conv / matmul outputs, recompute everything else.

    Depthwise (grouped) convolutions are recomputed: they are cheap per output and OverLoCK has
    many of them (each re-parameterisable block has up to eight parallel branches). So are 1x1
    convolutions that widen a narrow map (the MLPs' first conv in Base-Net stages 1-2): their
    output is ``mlp_ratio`` times the size of their input and costs only ``C_in`` (< 256)
    multiply-adds per element to recompute. Measured on OverLoCK-T / -XT, 2x3x512x512, CPU, one
    thread, one-off: recomputing every widening 1x1 lowered the step's peak memory by 12% / 4%;
    keeping those with >= 256 input channels (stages 3-4) made the step ~0.13 s (2%) faster for
    +0.09 GB (XT), keeping the narrow ones as well gained nothing more.
    """
    if op in _CONVS:
        weight, groups = args[1], args[_CONVS[op]]
        out_ch, in_ch = weight.shape[:2]
        cheap_widening_1x1 = (weight.shape[-2:] == (1, 1) and out_ch > in_ch
                              and in_ch < WIDENING_KEEP_MIN_CHANNELS)
        if groups == 1 and not cheap_widening_1x1:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in _MATMULS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Run BatchNorm layers of ``module`` without updating their running statistics."""
    saved = []
    for bn in module.modules():
        if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats:
            saved.append((bn, bn.momentum, bn.num_batches_tracked.clone()))
            # momentum 0 keeps running_mean/var; a cumulative average (momentum None) is held by
            # restoring the counter below, and its 1/n factor is irrelevant with momentum 0.
            bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


def _contexts(module: nn.Module, selective: bool) -> tuple[Any, Any]:
    recompute_guard = frozen_bn_stats(module)
    if not selective:
        return contextlib.nullcontext(), recompute_guard
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(save_dense_products)
    return forward_ctx, _entered_together(recompute_guard, recompute_ctx)


@contextlib.contextmanager
def _entered_together(*managers: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


def checkpoint_module(module: nn.Module, *args: Any, selective: bool = False) -> Any:
    """Call ``module(*args)`` under full or selective activation checkpointing.

    Under ``torch.compile`` the recomputation is planned on the traced graph, where BatchNorm's
    running-statistics updates are outputs of the forward graph (never run again), and torch
    accepts as ``context_fn`` only the dispatch modes of selective checkpointing itself: so
    there the checkpoint runs without :func:`frozen_bn_stats`.
    """
    if torch.compiler.is_compiling():
        if not selective:
            return cp.checkpoint(module, *args, use_reentrant=False)
        context_fn: Callable = functools.partial(create_selective_checkpoint_contexts,
                                                 save_dense_products)
        return cp.checkpoint(module, *args, use_reentrant=False, context_fn=context_fn)
    context_fn = functools.partial(_contexts, module, selective)
    return cp.checkpoint(module, *args, use_reentrant=False, context_fn=context_fn)
