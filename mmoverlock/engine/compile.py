"""``torch.compile`` of the backbone for a training run (``tools/train.py --compile``).

mmengine's own switch (``cfg.compile``) compiles the model's whole ``train_step``, optimizer step
included, which dynamo in torch 2.14 fails to trace (``InternalTorchDynamoError`` in its optimizer
variable). :class:`CompileBackboneHook` compiles what the time goes into instead: the backbone's
``forward``, in place (``nn.Module.compile``: parameter names and checkpoints are unchanged),
before the run starts. Heads and the optimizer run eagerly.
"""
from __future__ import annotations

from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

__all__ = ['CompileBackboneHook']


@HOOKS.register_module()
class CompileBackboneHook(Hook):
    """Compile ``model.backbone`` (or the model, if it has none) with ``torch.compile``.

    Args:
        backend: A ``torch.compile`` backend (``'inductor'``, ``'aot_eager'``, ...).
        mode: inductor's mode, or None for torch's default.
        dynamic: ``torch.compile``'s ``dynamic`` (None: torch's default).
    """

    priority = 'VERY_HIGH'

    def __init__(self, backend: str = 'inductor', mode: Optional[str] = None,
                 dynamic: Optional[bool] = None) -> None:
        self.options = dict(backend=backend)
        if mode is not None:
            self.options['mode'] = mode
        if dynamic is not None:
            self.options['dynamic'] = dynamic

    def before_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        target = getattr(model, 'backbone', model)
        target.compile(**self.options)
        runner.logger.info(f'torch.compile of {type(target).__name__}.forward with '
                           f'{self.options}')
