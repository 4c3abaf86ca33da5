"""OverLoCK ImageNet classifiers, registered as timm models ``overlock_{xt,t,s,b}``.

The classifier is the backbone without output norms plus the authors' two heads: ``head`` on the
Focus-Net output and ``aux_head`` on the Overview-Net context (for the auxiliary training loss).
``timm.create_model('overlock_t', checkpoint_path=...)`` loads the authors' ImageNet checkpoints.
``features_only=True`` (with ``out_indices``, default all four) gives the four stage outputs
(strides 4, 8, 16, 32; widths ``[D0, D1, D2 + c, D3 + c]``) through timm's feature getter and
:meth:`OverLoCKClassifier.forward_intermediates`.
"""
from __future__ import annotations

from typing import Any, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model as register_timm_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ..backbones.overlock import OverLoCK
from .glnet_timm import feature_cfg_of

HEAD_WIDTH = 1024  # the hidden width of the authors' classification head


class OverLoCKClassifier(OverLoCK):
    """OverLoCK with the ImageNet heads; parameter names equal the released checkpoints.

    Args:
        arch: As for :class:`OverLoCK`.
        num_classes: Number of classes of both heads.
        drop_rate: Dropout before the last projection of ``head``.
        in_chans: Input channels (must be 3, as in the released models; timm passes it).
        **kwargs: Forwarded to :class:`OverLoCK` (``drop_path_rate``, ``deploy``, ...).
    """

    def __init__(self, arch: Union[str, dict] = 't', num_classes: int = 1000,
                 drop_rate: float = 0.0, in_chans: int = 3, **kwargs: Any) -> None:
        if in_chans != 3:
            raise ValueError(f'OverLoCK takes 3 input channels, got in_chans={in_chans}')
        kwargs.setdefault('with_out_norms', False)
        super().__init__(arch=arch, overview_fusion=False, **kwargs)
        dims = self.arch_settings['embed_dim']
        self.num_classes = num_classes
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2 ** i, module=m) for i, (c, m) in enumerate(
                zip(self.out_channels, ('blocks1', 'blocks2', 'sub_blocks3', 'sub_blocks4')))]
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

    def forward_intermediates(self, x: Tensor, indices: Union[int, list, tuple, None] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False
                              ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """timm's intermediate-feature API: the raw stage outputs in ``indices`` (those of
        :meth:`forward_features`, contiguous NCHW).

        Args:
            x: Images.
            indices: Output indices (negative from the end), the last n if an int, all if None.
            norm: Must be False: the classifier has no final norm.
            stop_early: Accepted for timm's API; the whole network always runs (the Overview-Net
                context reaches the Focus-Net stages, outputs 2 and 3).
            output_fmt: ``'NCHW'`` (the only layout).
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (final features, i.e. the last stage output, intermediates).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"OverLoCK features are NCHW, got output_fmt={output_fmt!r}")
        if norm:
            raise ValueError('OverLoCK has no final norm to apply to the features (norm=True)')
        take, _ = feature_take_indices(len(self.feature_info), indices)
        outs, _ = self.forward_features(x)
        feats = [outs[i].contiguous() for i in take]
        return feats if intermediates_only else (outs[-1].contiguous(), feats)

    def prune_intermediate_layers(self, indices: Union[int, list, tuple] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Remove the heads if ``prune_head`` (timm's feature getter calls it); every stage is
        kept (see :meth:`forward_intermediates`), and there is no final norm to prune.

        Args:
            indices: Outputs to keep, as for :meth:`forward_intermediates`.
            prune_norm: Nothing to prune (no final norm).
            prune_head: Replace ``head`` and ``aux_head`` by identities.

        Returns:
            The absolute indices kept.
        """
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.head = nn.Identity()
            self.aux_head = nn.Identity()
            self.num_classes = 0
        return take


def _cfg(**kwargs: Any) -> dict:
    return dict(url='', num_classes=1000, input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv='patch_embed1.0', classifier='head',
                **kwargs)


default_cfgs = generate_default_cfgs({f'overlock_{a}': _cfg() for a in ('xt', 't', 's', 'b')})


def _create(variant: str, arch: str, pretrained: bool = False,
            **kwargs: Any) -> OverLoCKClassifier:
    if pretrained:
        raise ValueError('mmoverlock cannot download weights; build with pretrained=False and '
                         "pass checkpoint_path='overlock_..._in1k_224.pth' to timm.create_model")
    return build_model_with_cfg(OverLoCKClassifier, variant, False, arch=arch,
                                feature_cfg=feature_cfg_of(kwargs), **kwargs)


@register_timm_model
def overlock_xt(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-XT (16M params, 2.6G FLOPs, 82.7% ImageNet-1K top-1)."""
    return _create('overlock_xt', 'xt', pretrained, **kwargs)


@register_timm_model
def overlock_t(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-T (33M params, 5.5G FLOPs, 84.2% ImageNet-1K top-1)."""
    return _create('overlock_t', 't', pretrained, **kwargs)


@register_timm_model
def overlock_s(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-S (56M params, 9.7G FLOPs, 84.8% ImageNet-1K top-1)."""
    return _create('overlock_s', 's', pretrained, **kwargs)


@register_timm_model
def overlock_b(pretrained: bool = False, **kwargs: Any) -> OverLoCKClassifier:
    """OverLoCK-B (95M params, 16.7G FLOPs, 85.1% ImageNet-1K top-1)."""
    return _create('overlock_b', 'b', pretrained, **kwargs)
