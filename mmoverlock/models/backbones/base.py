"""What the dense-prediction backbones of mmoverlock share: output selection, freezing, BN eval
mode, checkpointing counts and ``init_cfg`` handling (in the manner of mmdet's Swin / mmpretrain's
ConvNeXt)."""
from __future__ import annotations

from typing import Any, Sequence, Union

from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class DenseBackbone(BaseModule):
    """Base of :class:`OverLoCK` and :class:`GLNet`.

    Subclasses set ``out_indices``, ``frozen_stages`` and ``norm_eval`` and implement
    ``_stage_modules(stage)`` (the modules that compute output ``stage``), ``_init_fresh()`` (the
    authors' initialisation) and ``load_pretrained(checkpoint, prefix)``.
    """

    num_outputs = 4

    @classmethod
    def check_out_indices(cls, out_indices: Union[int, Sequence[int]]) -> tuple[int, ...]:
        """Normalise ``out_indices`` (negative indices allowed) and reject invalid ones."""
        n = cls.num_outputs
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        out = tuple(i % n if -n <= i < 0 else i for i in out_indices)
        if not out or any(i not in range(n) for i in out):
            raise ValueError(f'out_indices must be a non-empty subset of 0..{n - 1}, '
                             f'got {out_indices}')
        return out

    @staticmethod
    def checkpoint_counts(with_cp: Union[bool, Sequence[int]], depths: Sequence[int],
                          names: Sequence[str]) -> list[int]:
        """Per block list, how many leading blocks use gradient checkpointing."""
        if isinstance(with_cp, bool):
            return list(depths) if with_cp else [0] * len(depths)
        counts = list(with_cp)
        if len(counts) != len(depths) or any(not 0 <= n <= d for n, d in zip(counts, depths)):
            raise ValueError(f'with_cp must be a bool or {len(depths)} block counts (for '
                             f'{", ".join(names)}) each within {list(depths)}, got {with_cp}')
        return counts

    def _stage_modules(self, stage: int) -> list[nn.Module]:
        raise NotImplementedError

    def _init_fresh(self) -> None:
        raise NotImplementedError

    def load_pretrained(self, checkpoint: str, prefix: Any = None) -> Any:
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        for stage in range(max(self.frozen_stages, 0)):
            for module in self._stage_modules(stage):
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> DenseBackbone:
        """Set the training mode, keeping frozen stages (and BNs under ``norm_eval``) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint if it is ``Pretrained``, else initialise afresh.

        BaseModule.init_weights is not called: the authors' initialisation covers every
        parameter, and it would only add a per-parameter report to the log.
        """
        cfg = self.init_cfg if isinstance(self.init_cfg, dict) else None
        if cfg is not None and cfg.get('type') == 'Pretrained':
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
        else:
            self._init_fresh()
        self._is_init = True
