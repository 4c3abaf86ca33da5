"""Models and synthetic inputs for the analysis tools (FLOPs, throughput, receptive fields).

Builds a backbone by its registry name (``OverLoCK``, ``GLNet``, mmdet's ``SwinTransformer``, ...),
the ImageNet classifier of an OverLoCK / GLNet arch, or the whole detector / segmentor of a config,
and makes the inputs a model's ``test_step`` or ``mode='tensor'`` forward needs, without any data
set. Weights stay random unless a checkpoint is loaded: the configs' ``init_cfg`` (pretrained
backbones) is never applied.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from torch import Tensor, nn

from .config import load_config
from .errors import UsageError

if TYPE_CHECKING:
    from ..utils.flops import Complexity

__all__ = ['BENCHMARK_MODES', 'CLASSIFIERS', 'REPARAM_METHODS', 'benchmark_config',
           'benchmark_model', 'build_backbone', 'build_config_model', 'convert_for_inference',
           'count_config_complexity', 'count_model_complexity', 'deployed_modules',
           'fuse_conv_bn', 'model_device', 'preprocessed_inputs', 'reparameterize_model',
           'synthetic_batch', 'synthetic_data_samples']

#: Methods that switch a module to its re-parameterised (deploy) form, in order of preference.
REPARAM_METHODS = ('reparameterize', 'switch_to_deploy')


def _classifiers() -> dict[str, type]:
    from ..models.classifiers import GLNetClassifier
    from ..models.classifiers.overlock_timm import OverLoCKClassifier
    return {'OverLoCK': OverLoCKClassifier, 'GLNet': GLNetClassifier}


#: Backbone types that have an ImageNet classifier form (``--classifier``).
CLASSIFIERS = ('OverLoCK', 'GLNet')


def _registry_get(backbone_type: str) -> type:
    """The class registered as ``backbone_type`` in mmdet's or mmseg's ``MODELS``."""
    from ..registry import available_model_registries
    for registry in available_model_registries():
        cls = registry.get(backbone_type)
        if cls is not None:
            return cls
    raise UsageError(f'no backbone {backbone_type!r} in the mmdet / mmseg model registries; '
                     "e.g. 'OverLoCK', 'GLNet', 'SwinTransformer', 'ResNet'")


def build_backbone(backbone_type: str = 'OverLoCK',
                   arch: Union[str, dict, None] = None,
                   classifier: bool = False,
                   deploy: bool = False,
                   device: Union[str, torch.device, None] = None,
                   **kwargs: Any) -> nn.Module:
    """Build a registered backbone (or its ImageNet classifier) in eval mode.

    Args:
        backbone_type: Registry name, e.g. ``'OverLoCK'``, ``'GLNet'``, ``'SwinTransformer'``.
        arch: Passed as ``arch=`` when given (name or dict).
        classifier: Build the ImageNet classifier of ``backbone_type`` (OverLoCK, GLNet) instead.
        deploy: Re-parameterise the model (:func:`reparameterize_model`) after building it.
        device: Build on this device; ``'meta'`` builds instantly, without memory, for counting.
        **kwargs: Further constructor arguments (``out_indices``, ``overview_fusion``, ...).
    """
    if arch is not None:
        kwargs['arch'] = arch
    if classifier:
        classes = _classifiers()
        if backbone_type not in classes:
            raise UsageError(f'--classifier is available for {sorted(classes)}, not '
                             f'{backbone_type!r}')
        cls = classes[backbone_type]
    else:
        cls = _registry_get(backbone_type)
    with torch.device(device or 'cpu'):
        model = cls(**kwargs)
    model.eval()  # some backbones' train() returns None: do not chain
    if deploy:
        reparameterize_model(model)
    return model


def reparameterize_model(model: nn.Module) -> list[str]:
    """Switch every re-parameterisable part of ``model`` to its deploy form, in place.

    Calls the first of :data:`REPARAM_METHODS` found on each outermost module that has one
    (``OverLoCK.reparameterize()`` converts all its blocks). Returns the names of the converted
    modules (empty when the model has nothing to convert).
    """
    converted: list[str] = []
    for name, module in model.named_modules():
        if any(_within(name, parent) for parent in converted):
            continue
        method = next((getattr(module, m) for m in REPARAM_METHODS
                       if callable(getattr(module, m, None))), None)
        if method is not None:
            method()
            converted.append(name)
    return converted


def _within(name: str, parent: str) -> bool:
    return parent == '' or name == parent or name.startswith(parent + '.')


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm into the convolution registered just before it (mmcv's rule).

    mmcv's :func:`mmcv.cnn.fuse_conv_bn` pairs a BN with the last convolution among its siblings,
    which is right for the OpenMMLab modules and for OverLoCK / GLNet (checked by the benchmark,
    which compares the outputs). Re-parameterise first: OverLoCK's training-form blocks need their
    BNs to convert.
    """
    from mmcv.cnn import fuse_conv_bn as mmcv_fuse
    return mmcv_fuse(model)


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')


# ----------------------------------------------------------------------------------------------
# Whole models from configs
# ----------------------------------------------------------------------------------------------
def build_config_model(config: Union[str, Config],
                       cfg_options: Optional[dict] = None,
                       checkpoint: Optional[str] = None,
                       device: Union[str, torch.device] = 'cpu',
                       deploy: bool = False) -> tuple[nn.Module, Config]:
    """Build the detector / segmentor of ``config`` in eval mode on ``device``.

    ``custom_imports`` of the config are imported by mmengine when the file is read; weights are
    random (``init_cfg`` is not applied) unless ``checkpoint`` is given.

    Returns:
        ``(model, cfg)``.
    """
    from .launch import build_model
    cfg = load_config(config, cfg_options) if isinstance(config, str) else config
    if cfg_options and not isinstance(config, str):
        cfg.merge_from_dict(cfg_options)
    model = build_model(cfg)
    if checkpoint is not None:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu', logger='current')
    model.to(device)
    model.eval()
    if deploy:
        converted = reparameterize_model(model)
        MMLogger.get_current_instance().info(
            f're-parameterised: {", ".join(converted) if converted else "nothing to convert"}')
    return model, cfg


def _is_segmentor(model: nn.Module) -> bool:
    try:
        from mmseg.models.segmentors import BaseSegmentor
    except ImportError:
        return False
    return isinstance(model, BaseSegmentor)


def synthetic_data_samples(model: nn.Module, shape: Sequence[int], batch_size: int = 1) -> list:
    """Data samples with the meta information ``predict`` / ``mode='tensor'`` need for images
    of ``shape`` (H, W): ``DetDataSample`` for detectors, ``SegDataSample`` for segmentors."""
    height, width = int(shape[0]), int(shape[1])
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width), scale_factor=(1.0, 1.0), flip=False,
                flip_direction=None, padding_size=[0, 0, 0, 0])
    if _is_segmentor(model):
        from mmseg.structures import SegDataSample as Sample
    else:
        from mmdet.structures import DetDataSample as Sample
    return [Sample(metainfo=dict(meta, img_id=i)) for i in range(batch_size)]


def synthetic_batch(model: nn.Module, shape: Sequence[int], batch_size: int = 1,
                    seed: int = 0) -> dict:
    """A ``test_step`` batch of random uint8 images (3, H, W): ``dict(inputs, data_samples)``;
    the model's data preprocessor normalises, pads and moves them."""
    generator = torch.Generator().manual_seed(seed)
    height, width = int(shape[0]), int(shape[1])
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
              for _ in range(batch_size)]
    return dict(inputs=images, data_samples=synthetic_data_samples(model, shape, batch_size))


def preprocessed_inputs(model: nn.Module, shape: Sequence[int], batch_size: int = 1,
                        seed: int = 0) -> tuple[Tensor, list]:
    """``(inputs, data_samples)`` as the data preprocessor returns them for a synthetic batch
    (normalised, padded as the config says, on the model's device)."""
    data = model.data_preprocessor(synthetic_batch(model, shape, batch_size, seed), False)
    return data['inputs'], data['data_samples']


def deployed_modules(model: nn.Module) -> list[str]:
    """Names of the outermost modules of ``model`` already in their re-parameterised (deploy)
    form: those with one of :data:`REPARAM_METHODS` and ``deploy`` set (e.g. an OverLoCK built
    with ``deploy=True`` or converted by ``reparameterize()``)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(_within(name, parent) for parent in found):
            continue
        if getattr(module, 'deploy', False) is True and any(
                callable(getattr(module, m, None)) for m in REPARAM_METHODS):
            found.append(name)
    return found


def count_model_complexity(model: nn.Module,
                           inputs: Union[Tensor, Sequence[Any], Mapping[str, Any],
                                         Callable[[], Any]],
                           train_form: bool = False,
                           exclude_params: Sequence[str] = ()) -> Complexity:
    """:func:`mmoverlock.utils.flops.count_complexity` of ``model`` in the form it is in, or in its
    training form.

    A model is counted as it runs in eval mode without autograd: a re-parameterised model as its
    single K x K kernels, and so is a training-form OverLoCK, whose DilatedReparamBlocks then merge
    their branches on the fly. ``train_form`` counts the training form as defined instead: every
    branch conv of every DilatedReparamBlock on its own (the large K x K kernel and each small
    dilated ``k x k`` one, ``k * k`` taps each).

    Args:
        model: The model, in eval mode; for ``train_form`` not re-parameterised.
        inputs: As for :func:`~mmoverlock.utils.flops.count_complexity`.
        train_form: Count the training form's branches (see above).
        exclude_params: Parameter-name prefixes not counted (e.g. ``('aux_head.',)``).

    Returns:
        :class:`mmoverlock.utils.flops.Complexity`.

    Raises:
        UsageError: ``train_form`` for a model already in its deploy form.
    """
    from ..models.layers.dilated_reparam import separate_branches
    from ..utils.flops import count_complexity
    if train_form:
        deployed = deployed_modules(model)
        if deployed:
            names = ', '.join(repr(n) if n else 'the whole model' for n in deployed)
            raise UsageError(
                'the training form cannot be counted: already re-parameterised (deploy=True): '
                f'{names}. Build the model without deploy=True and without calling '
                'reparameterize(), or count the deploy form (no --train-form / train_form=False)')
    with separate_branches() if train_form else nullcontext():
        return count_complexity(model, inputs, exclude_params=exclude_params)


def count_config_complexity(model: nn.Module, shape: Sequence[int], batch_size: int = 1,
                            train_form: bool = False) -> Complexity:
    """MACs and parameters of a detector / segmentor's network forward (``mode='tensor'``: no
    post-processing) on one synthetic batch of images of ``shape``.

    The RoI heads of two-stage detectors run on the proposals the (random or loaded) RPN keeps,
    so their share depends on the weights; segmentors' auxiliary heads (training only) are not
    run, their parameters are counted.

    Args:
        model: The detector / segmentor, in eval mode.
        shape: Image size (H, W).
        batch_size: Images in the batch.
        train_form: Count the training form of the re-parameterisable blocks, every branch on
            its own (:func:`count_model_complexity`).

    Returns:
        :class:`mmoverlock.utils.flops.Complexity`.
    """
    inputs, samples = preprocessed_inputs(model, shape, batch_size)
    return count_model_complexity(model, lambda: model(inputs, samples, mode='tensor'),
                                  train_form=train_form)


# ----------------------------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------------------------
BENCHMARK_MODES = ('predict', 'tensor')


def _flat_tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    return []


@torch.no_grad()
def _features(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    return [t.float().clone() for t in _flat_tensors(model.extract_feat(inputs))]


def convert_for_inference(model: nn.Module, inputs: Tensor, deploy: bool = False,
                          fuse: bool = False, tolerance: float = 1e-3) -> dict[str, Any]:
    """Re-parameterise (``deploy``) and/or fold BNs into convs (``fuse``), in place, and check
    that the features (``extract_feat``) of ``inputs`` stay the same.

    Returns:
        ``dict(reparameterized=[module names], fused=bool, max_abs_diff, rel_diff)``, where
        ``rel_diff`` is the largest difference relative to the largest feature magnitude; a
        warning is logged above ``tolerance``.
    """
    before = _features(model, inputs)
    converted = reparameterize_model(model) if deploy else []
    if fuse:
        fuse_conv_bn(model)
    after = _features(model, inputs)
    max_diff = max((float((a - b).abs().max()) for a, b in zip(before, after)), default=0.0)
    scale = max((float(a.abs().max()) for a in before), default=0.0) or 1.0
    report = dict(reparameterized=converted, fused=fuse, max_abs_diff=max_diff,
                  rel_diff=max_diff / scale)
    logger = MMLogger.get_current_instance()
    if deploy and not converted:
        logger.warning('--deploy: the model has no re-parameterisable module')
    if report['rel_diff'] > tolerance:
        logger.warning(f'the converted model differs from the original: max |diff| {max_diff:.3g}'
                       f' ({report["rel_diff"]:.3g} of the largest feature)')
    else:
        logger.info(f'converted model checked: features differ by at most {max_diff:.3g}')
    return report


def benchmark_model(model: nn.Module, shape: Sequence[int] = (800, 1216), batch_size: int = 1,
                    iters: int = 10, warmup: int = 3, mode: str = 'predict',
                    amp: bool = False) -> dict[str, Any]:
    """Time a built detector / segmentor (eval mode) on a fixed synthetic batch.

    Args:
        model: The model, on its device.
        shape: Image size (H, W).
        batch_size: Images per iteration.
        iters, warmup: Timed and untimed iterations.
        mode: ``'predict'``: ``model.test_step`` (data preprocessing, network, post-processing:
            NMS, mask pasting, resizing of the segmentation), i.e. what a test run spends per
            image after loading; ``'tensor'``: the network alone (``mode='tensor'``).
        amp: Run under ``torch.autocast`` with float16 (CUDA only).

    Returns:
        ``dict(timing=Timing, memory=..., ...)``.
    """
    from ..utils.benchmark import peak_memory, time_callable
    if mode not in BENCHMARK_MODES:
        raise UsageError(f'mode must be one of {BENCHMARK_MODES}, got {mode!r}')
    device = model_device(model)
    if amp and device.type != 'cuda':
        raise UsageError('--amp needs the model on a CUDA device (float16 autocast); run with '
                         '--device cuda, or without --amp on CPU')
    model.eval()
    if mode == 'predict':
        batch = synthetic_batch(model, shape, batch_size)

        def step() -> Any:
            return model.test_step(batch)
    else:
        inputs, samples = preprocessed_inputs(model, shape, batch_size)

        def step() -> Any:
            return model(inputs, samples, mode='tensor')

    def run() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            step()

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_callable(run, iters=iters, warmup=warmup, batch_size=batch_size, device=device)
    return dict(shape=tuple(int(s) for s in shape), mode=mode, amp=amp, device=str(device),
                threads=torch.get_num_threads(), timing=timing, memory=peak_memory(device))


def benchmark_config(config: Union[str, Config], shape: Sequence[int] = (800, 1216),
                     batch_size: int = 1, iters: int = 10, warmup: int = 3,
                     mode: str = 'predict', deploy: bool = False, fuse: bool = False,
                     amp: bool = False, device: Union[str, torch.device] = 'cpu',
                     checkpoint: Optional[str] = None,
                     cfg_options: Optional[dict] = None) -> dict[str, Any]:
    """Build the model of ``config`` and time it (:func:`benchmark_model`).

    ``deploy`` re-parameterises the model (OverLoCK's DilatedReparamBlocks), ``fuse`` folds
    BatchNorms into the preceding convs (mmcv's ``fuse_conv_bn``); both are checked against the
    unconverted model's features (``result['conversion']``).

    Returns:
        The :func:`benchmark_model` result plus ``config``, ``deploy``, ``fuse``, ``conversion``
        and ``params``.
    """
    model, cfg = build_config_model(config, cfg_options, checkpoint, device)
    conversion = None
    if deploy or fuse:
        inputs, _ = preprocessed_inputs(model, shape, batch_size)
        conversion = convert_for_inference(model, inputs, deploy=deploy, fuse=fuse)
    result = benchmark_model(model, shape, batch_size, iters, warmup, mode, amp)
    name = config if isinstance(config, str) else cfg.filename
    result.update(config=name, deploy=deploy, fuse=fuse, conversion=conversion,
                  params=sum(p.numel() for p in model.parameters()))
    return result
