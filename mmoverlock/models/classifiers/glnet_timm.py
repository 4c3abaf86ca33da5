"""GLNet ImageNet classifiers as timm models ``glnet_{stl,stl_paramslot,4g,9g,16g}``.

The state dict equals the authors' released one (``head.*`` and the final ``norm.*`` included), so
their checkpoints load directly::

    model = timm.create_model('glnet_4g', pretrained=True,
                              pretrained_cfg_overlay=dict(file='glnet_4g.pth'))

(timm takes the weights from ``model_ema`` or ``model`` in the file.) No download URL is
registered: the authors host their checkpoints themselves.
"""
from __future__ import annotations

from typing import Optional, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..backbones.glnet import GLNet, build_downsample_norm

__all__ = ['GLNetClassifier']


class GLNetClassifier(GLNet):
    """GLNet with the ImageNet head: ``norm`` (BN), global average pooling, ``head`` (Linear).

    Args:
        arch: Arch name or dict, as for :class:`~mmoverlock.models.backbones.GLNet`.
        num_classes: Number of classes; 0 leaves ``head`` an identity.
        in_chans: Input channels (must be 3, as in the released models).
        drop_rate: Dropout before ``head``.
        drop_path_rate: Stochastic depth rate, linearly spaced over all blocks.
        global_pool: ``'avg'`` (the only pooling of the released models).
        with_cp: Gradient checkpointing, as for the backbone.
    """

    def __init__(self,
                 arch: Union[str, dict] = '4g',
                 num_classes: int = 1000,
                 in_chans: int = 3,
                 drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0,
                 global_pool: str = 'avg',
                 with_cp: Union[bool, list] = False) -> None:
        if in_chans != 3:
            raise ValueError(f'GLNet takes 3 input channels, got in_chans={in_chans}')
        if global_pool != 'avg':
            raise ValueError(f"GLNet only supports global_pool='avg', got {global_pool!r}")
        super().__init__(arch, out_indices=(3,), drop_path_rate=drop_path_rate, with_cp=with_cp,
                         with_out_norms=False)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.out_channels[3]
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i, c in enumerate(self.out_channels)]
        self.norm = build_downsample_norm(self.arch_settings['downsample_norm'],
                                          self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self._init_fresh()

    def get_classifier(self) -> nn.Module:
        """The final ``Linear`` (timm convention)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace ``head`` by a freshly initialised one for ``num_classes`` classes."""
        if global_pool not in (None, 'avg'):
            raise ValueError(f"GLNet only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map (B, D3, H/32, W/32), before ``norm``."""
        return self.forward_stages(x)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``norm``, average pooling, dropout and (unless ``pre_logits``) ``head``."""
        x = self.norm(x).mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for images ``x``."""
        return self.forward_head(self.forward_features(x))


def _unwrap_checkpoint(state: dict, model: nn.Module) -> dict:
    """timm ``pretrained_filter_fn``: take the weights from the authors' checkpoint layout."""
    for key in ('model_ema', 'model', 'state_dict'):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def _cfg(**kwargs) -> dict:
    return dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.9, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, classifier='head', **kwargs)


default_cfgs = generate_default_cfgs({
    'glnet_stl': _cfg(first_conv='downsample_layers.0.0'),
    'glnet_stl_paramslot': _cfg(first_conv='downsample_layers.0.0'),
    'glnet_4g': _cfg(first_conv='downsample_layers.0.1'),
    'glnet_9g': _cfg(first_conv='downsample_layers.0.1'),
    'glnet_16g': _cfg(first_conv='downsample_layers.0.1'),
})


def _create(variant: str, arch: str, pretrained: bool, **kwargs) -> GLNetClassifier:
    return build_model_with_cfg(GLNetClassifier, variant, pretrained, arch=arch,
                                pretrained_filter_fn=_unwrap_checkpoint, **kwargs)


@register_model
def glnet_stl(pretrained: bool = False, **kwargs) -> GLNetClassifier:
    """GLNet-STL (30M parameters, 4.4 GFLOPs, 82.5% ImageNet top-1)."""
    return _create('glnet_stl', 'stl', pretrained, **kwargs)


@register_model
def glnet_stl_paramslot(pretrained: bool = False, **kwargs) -> GLNetClassifier:
    """GLNet-STL with learned initial slots (30M, 4.4 GFLOPs, 82.1%)."""
    return _create('glnet_stl_paramslot', 'stl_paramslot', pretrained, **kwargs)


@register_model
def glnet_4g(pretrained: bool = False, **kwargs) -> GLNetClassifier:
    """GLNet-4G (27M parameters, 4.5 GFLOPs, 83.7%)."""
    return _create('glnet_4g', '4g', pretrained, **kwargs)


@register_model
def glnet_9g(pretrained: bool = False, **kwargs) -> GLNetClassifier:
    """GLNet-9G (60M parameters, 9.7 GFLOPs, 84.5%)."""
    return _create('glnet_9g', '9g', pretrained, **kwargs)


@register_model
def glnet_16g(pretrained: bool = False, **kwargs) -> GLNetClassifier:
    """GLNet-16G (106M parameters, 16.7 GFLOPs, 85.0%; weights from the EMA model)."""
    return _create('glnet_16g', '16g', pretrained, **kwargs)
