"""Stop a training run at the first non-finite input image or loss, before it spoils the model.

One NaN pixel in a batch goes through the forward pass, where every BatchNorm layer folds it
into its running mean and variance (they are updated in the forward, in training mode); the loss
is NaN too, so the backward pass and the optimizer step write NaN into the weights. Every later
prediction is NaN, and the checkpoints saved after it carry the damage.

mmengine 0.10.7 has no check for this; mmdet's ``CheckInvalidLossHook`` asserts a finite loss in
``after_train_iter`` (every 50 iterations by default), after the forward has updated BatchNorm
and after the optimizer step. :class:`FiniteTrainingHook` checks earlier, through two forward
hooks on the (unwrapped) model, which run inside ``train_step`` for ``mode='loss'`` calls:

* before the forward: the batch as the data preprocessor made it (one ``isfinite().all()``);
* after the forward: the losses, before ``parse_losses``, backward and the optimizer step (one
  ``isfinite()`` of their sum).

Either raises :class:`NonFiniteTrainingError` naming the iteration, the image (index in the batch
and file) or the loss, and the fix. ``tools/train.py`` adds the hook to every run.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['FiniteTrainingHook', 'NonFiniteTrainingError']


class NonFiniteTrainingError(FloatingPointError):
    """A training step met NaN or inf in its input images or its losses."""


def _image_tensors(inputs: Any) -> list[Tensor]:
    """The floating-point image tensors of a model's ``inputs`` (a batch tensor or a list)."""
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [t for t in items if isinstance(t, Tensor) and t.is_floating_point()]


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    if len(tensors) == 1:
        return bool(torch.isfinite(tensors[0]).all())
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _image_name(data_samples: Any, index: int) -> str:
    """The file of image ``index`` from its data sample's metainfo (or '' when unknown)."""
    if isinstance(data_samples, (list, tuple)) and index < len(data_samples):
        meta = getattr(data_samples[index], 'metainfo', None) or {}
        return str(meta.get('img_path') or meta.get('filename') or '')
    return ''


def _loss_terms(losses: dict) -> dict[str, Tensor]:
    """The terms ``parse_losses`` adds up (keys containing 'loss'), each as one tensor."""
    terms = {}
    for name, value in losses.items():
        if 'loss' not in name:
            continue
        if isinstance(value, Tensor):
            terms[name] = value.detach().float().sum()
        elif isinstance(value, (list, tuple)) and value and all(
                isinstance(v, Tensor) for v in value):
            terms[name] = sum(v.detach().float().sum() for v in value)
    return terms


def _non_finite_buffers(model: nn.Module) -> int:
    """How many BatchNorm running statistics of ``model`` hold NaN or inf."""
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.running_mean is not None:
            count += int(not bool(torch.isfinite(module.running_mean).all()))
            count += int(not bool(torch.isfinite(module.running_var).all()))
    return count


@HOOKS.register_module()
class FiniteTrainingHook(Hook):
    """Raise :class:`NonFiniteTrainingError` at the first training step whose input images (after
    the data preprocessor) or losses hold NaN or inf, before BatchNorm statistics or weights
    change.

    Costs one device synchronisation of a single boolean for the inputs and one for the losses
    per iteration.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._handles: list = []
        self._iter = 0
        self._max_iters: Optional[int] = None

    # -------------------------------------------------------------------------------------------
    # mmengine hook points
    # -------------------------------------------------------------------------------------------
    def before_train(self, runner: Any) -> None:
        """Attach the checks to the model (inside a DDP wrapper: to the wrapped model)."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self._handles = [
            model.register_forward_pre_hook(self._check_inputs, with_kwargs=True),
            model.register_forward_hook(self._check_losses, with_kwargs=True),
        ]

    def before_train_iter(self, runner: Any, batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        """Remember the (1-based, as logged) iteration for the messages."""
        self._iter = runner.iter + 1
        self._max_iters = runner.max_iters

    def after_train(self, runner: Any) -> None:
        """Detach the checks (validation and testing after training are not checked)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -------------------------------------------------------------------------------------------
    # Checks
    # -------------------------------------------------------------------------------------------
    @staticmethod
    def _mode(args: tuple, kwargs: dict) -> Any:
        return kwargs.get('mode', args[2] if len(args) > 2 else None)

    def _where(self) -> str:
        total = f' of {self._max_iters}' if self._max_iters else ''
        return f'training iteration {self._iter}{total}'

    def _check_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._mode(args, kwargs) != 'loss':
            return
        inputs = kwargs['inputs'] if 'inputs' in kwargs else (args[0] if args else None)
        images = _image_tensors(inputs)
        if not images or _all_finite(images):
            return
        samples = kwargs.get('data_samples', args[1] if len(args) > 1 else None)
        raise NonFiniteTrainingError(self._input_message(images, samples))

    def _input_message(self, images: list[Tensor], samples: Any) -> str:
        if len(images) == 1:  # one (N, C, H, W) batch
            per_image = [images[0][i] for i in range(images[0].shape[0])]
        else:
            per_image = images
        bad = [(i, int((~torch.isfinite(t)).sum())) for i, t in enumerate(per_image)
               if not bool(torch.isfinite(t).all())]
        described = []
        for index, count in bad[:3]:
            name = _image_name(samples, index)
            described.append(f'image {index} of the batch' + (f' ({name})' if name else '')
                             + f' holds {count} NaN/inf value{"s" if count > 1 else ""}')
        more = f' and {len(bad) - 3} more images' if len(bad) > 3 else ''
        everyone = len(bad) == len(per_image) and len(per_image) > 1
        return (f'{self._where()}: {"; ".join(described)}{more} after the data preprocessor. '
                'The step was stopped before the forward pass: the weights and BatchNorm '
                'statistics are unchanged. Fix or remove that image, or the pipeline step that '
                'makes non-finite values (a float image holding NaN, a division by zero)'
                + ('; as every image is affected, check model.data_preprocessor (mean / std: '
                   'std must not be 0)' if everyone else '') + '.')

    def _check_losses(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._mode(args, kwargs) != 'loss' or not isinstance(output, dict):
            return
        terms = _loss_terms(output)
        if not terms or bool(torch.isfinite(sum(terms.values())).all()):
            return
        values = ', '.join(f'{k}={float(v):.4g}' for k, v in terms.items())
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v))]
        spoiled = _non_finite_buffers(module)
        state = ('this forward pass already left NaN/inf in '
                 f'{spoiled} BatchNorm running statistics of the model in memory (the checkpoints '
                 'on disk are unaffected)' if spoiled else
                 'the weights and BatchNorm statistics are still finite')
        raise NonFiniteTrainingError(
            f'{self._where()}: {", ".join(bad)} is not finite ({values}) although the input '
            f'images are finite: training diverged. The optimizer step was not taken and {state}. '
            'Lower the learning rate (optim_wrapper.optimizer.lr) or clip the gradients '
            '(optim_wrapper.clip_grad=dict(max_norm=...)), then resume from the last checkpoint '
            '(tools/train.py --resume).')
