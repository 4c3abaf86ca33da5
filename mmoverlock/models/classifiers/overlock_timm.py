"""OverLoCK ImageNet classifiers, registered as timm models ``overlock_{xt,t,s,b}``.

The classifier is the backbone without output norms plus the authors' two heads: ``head`` on the
Focus-Net output and ``aux_head`` on the Overview-Net context (for the auxiliary training loss).
``timm.create_model('overlock_t', checkpoint_path=...)`` loads the authors' ImageNet checkpoints.
"""
from __future__ import annotations

from typing import Any, Union

from timm.models import register_model as register_timm_model
from torch import Tensor, nn

from ..backbones.overlock import OverLoCK

HEAD_WIDTH = 1024  # the hidden width of the authors' classification head


class OverLoCKClassifier(OverLoCK):
    """OverLoCK with the ImageNet heads; parameter names equal the released checkpoints.

    Args:
        arch: As for :class:`OverLoCK`.
        num_classes: Number of classes of both heads.
        drop_rate: Dropout before the last projection of ``head``.
        **kwargs: Forwarded to :class:`OverLoCK` (``drop_path_rate``, ``deploy``, ...).
    """

    def __init__(self, arch: Union[str, dict] = 't', num_classes: int = 1000,
                 drop_rate: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault('with_out_norms', False)
        super().__init__(arch=arch, overview_fusion=False, **kwargs)
        dims = self.arch_settings['embed_dim']
        self.num_classes = num_classes
        self.aux_head = nn.Sequential(
            nn.BatchNorm2d(dims[3]),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dims[3], num_classes, 1))
        self.head = nn.Sequential(
            nn.Conv2d(self.out_channels[3], HEAD_WIDTH, 1, bias=False),
            nn.BatchNorm2d(HEAD_WIDTH),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Sequential(nn.Dropout(drop_rate), nn.Conv2d(HEAD_WIDTH, num_classes, 1))
            if drop_rate > 0 else nn.Conv2d(HEAD_WIDTH, num_classes, 1))
        if not self.init_cfg:
            self._init_fresh()

    def forward(self, x: Tensor) -> Union[Tensor, dict[str, Tensor]]:
        """Logits; in training mode a dict with the ``main`` and ``aux`` logits."""
        feats, ctx = self.forward_features(x)
        logits = self.head(feats[3]).flatten(1)
        if self.training:
            return dict(main=logits, aux=self.aux_head(ctx).flatten(1))
        return logits


def _create(arch: str, pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    if pretrained:
        raise ValueError('mmoverlock cannot download weights; build with pretrained=False and '
                         "pass checkpoint_path='overlock_..._in1k_224.pth' to timm.create_model")
    for timm_only in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(timm_only, None)
    return OverLoCKClassifier(arch=arch, **kwargs)


@register_timm_model
def overlock_xt(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-XT (16M params, 2.6G FLOPs, 82.7% ImageNet-1K top-1)."""
    return _create('xt', pretrained, **kwargs)


@register_timm_model
def overlock_t(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-T (33M params, 5.5G FLOPs, 84.2% ImageNet-1K top-1)."""
    return _create('t', pretrained, **kwargs)


@register_timm_model
def overlock_s(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-S (56M params, 9.7G FLOPs, 84.8% ImageNet-1K top-1)."""
    return _create('s', pretrained, **kwargs)


@register_timm_model
def overlock_b(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-B (95M params, 16.7G FLOPs, 85.1% ImageNet-1K top-1)."""
    return _create('b', pretrained, **kwargs)
