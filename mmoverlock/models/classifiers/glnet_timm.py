"""GLNet ImageNet classifiers as timm models ``glnet_{stl,stl_paramslot,4g,9g,16g}``.

The state dict equals the authors' released one (``head.*`` and the final ``norm.*`` included), so
their checkpoints load directly::

    model = timm.create_model('glnet_4g', pretrained=True,
                              pretrained_cfg_overlay=dict(file='glnet_4g.pth'))

The weights are taken from the file's ``model`` entry (``model_ema`` for GLNet-16G), the same rule
as the backbone's (:func:`~mmoverlock.models.backbones.glnet.checkpoint_state_keys`), and the
arch is checked. (timm's generic ``checkpoint_path=`` loader prefers ``model_ema`` in any file.)
No download URL is registered: the authors host their checkpoints themselves.

``features_only=True`` (with ``out_indices``, default all four) gives the four stage outputs
(strides 4, 8, 16, 32) through timm's feature getter and :meth:`GLNetClassifier.
forward_intermediates`.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from mmengine.logging import MMLogger
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ..backbones.glnet import (
    CLASSIFIER_PREFIXES,
    GLNet,
    LoadResult,
    build_downsample_norm,
    checkpoint_state_keys,
    select_checkpoint_state,
)
from ..utils.pretrained import drop_keys, read_state_dict

__all__ = ['GLNetClassifier']

#: Number of stage outputs.
NUM_STAGES = 4


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

    def forward_intermediates(self, x: Tensor, indices: Union[int, list, tuple, None] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False
                              ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """timm's intermediate-feature API: the (NCHW) outputs of the stages in ``indices``.

        Args:
            x: Images.
            indices: Stage indices (negative from the end), the last n stages if an int, all if
                None.
            norm: Apply the final ``norm`` to the last stage's output if it is taken.
            stop_early: Run no stage after the last one taken.
            output_fmt: ``'NCHW'`` (the only layout).
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (final features, intermediates).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"GLNet features are NCHW, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early or intermediates_only else len(self.stages) - 1
        outs = self.forward_stages(x, last)
        feats = [self.norm(outs[i]) if norm and i == NUM_STAGES - 1 else outs[i] for i in take]
        return feats if intermediates_only else (outs[-1], feats)

    def prune_intermediate_layers(self, indices: Union[int, list, tuple] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop what the stage outputs ``indices`` do not need (timm's feature getter calls it).

        Args:
            indices: Stage outputs to keep, as for :meth:`forward_intermediates`.
            prune_norm: Replace the final ``norm`` by an identity.
            prune_head: Remove the classifier head.

        Returns:
            The absolute indices kept.
        """
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if prune_norm or max_index < NUM_STAGES - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> LoadResult:
        """Load the authors' ImageNet checkpoint into the classifier (timm's ``custom_load``).

        The weights come from the entry :func:`checkpoint_state_keys` names (logged), the arch is
        checked, and all keys must match; ``head.*`` is dropped (and logged) when its number of
        classes differs from ``num_classes``.

        Args:
            checkpoint: Path or URL of the checkpoint.
            prefix: Keep only keys under this prefix, stripped.

        Returns:
            The missing (``head.*`` when dropped), unexpected (none) and dropped keys.
        """
        state = read_state_dict(checkpoint, prefix=prefix,
                                state_keys=checkpoint_state_keys(self.arch_name))
        self.check_compatible(drop_keys(state, CLASSIFIER_PREFIXES)[0], source=str(checkpoint))
        dropped: list = []
        head = state.get('head.weight')
        if head is not None and head.shape[0] != self.num_classes:
            state, dropped = drop_keys(state, ('head.',))
            MMLogger.get_current_instance().info(
                f'GLNetClassifier: {checkpoint} has {head.shape[0]} classes, the model '
                f'{self.num_classes}: head not loaded')
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not (dropped and k.startswith('head.'))]
        if missing or result.unexpected_keys:
            raise ValueError(f'{checkpoint} does not fit GLNetClassifier: missing keys '
                             f'{missing}, unexpected keys {result.unexpected_keys}')
        return LoadResult(list(result.missing_keys), [], dropped)


def _unwrap_checkpoint(state: dict, model: GLNetClassifier) -> dict:
    """timm ``pretrained_filter_fn``: the weights of a checkpoint given as a dict, by the rule of
    :func:`~mmoverlock.models.backbones.glnet.checkpoint_state_keys` for ``model``'s arch."""
    return select_checkpoint_state(state, getattr(model, 'arch_name', None),
                                   source=f'{type(model).__name__} (timm)')


def _cfg(**kwargs) -> dict:
    return dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.9, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, classifier='head', custom_load=True, **kwargs)


default_cfgs = generate_default_cfgs({
    'glnet_stl': _cfg(first_conv='downsample_layers.0.0'),
    'glnet_stl_paramslot': _cfg(first_conv='downsample_layers.0.0'),
    'glnet_4g': _cfg(first_conv='downsample_layers.0.1'),
    'glnet_9g': _cfg(first_conv='downsample_layers.0.1'),
    'glnet_16g': _cfg(first_conv='downsample_layers.0.1'),
})


def feature_cfg_of(kwargs: dict, default: Any = NUM_STAGES) -> dict:
    """timm ``feature_cfg`` for ``features_only`` (the feature getter, ``out_indices`` popped from
    ``kwargs``); ``out_indices`` without ``features_only`` is an error.

    Args:
        kwargs: The keyword arguments of ``timm.create_model`` (modified in place).
        default: ``out_indices`` when not given (an int n: the last n stages).
    """
    if 'out_indices' in kwargs and not kwargs.get('features_only', False):
        raise ValueError('out_indices selects the outputs of a features_only=True model; pass '
                         'features_only=True too')
    return dict(out_indices=kwargs.pop('out_indices', default), feature_cls='getter')


def _create(variant: str, arch: str, pretrained: bool, **kwargs) -> GLNetClassifier:
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if overlay.get('file') or overlay.get('url'):
        # timm resets custom_load for a weight source given here; every GLNet weight file has
        # the authors' layout, which GLNetClassifier.load_pretrained reads (entry rule, checks).
        overlay.setdefault('custom_load', True)
    return build_model_with_cfg(GLNetClassifier, variant, pretrained, arch=arch,
                                pretrained_cfg_overlay=overlay,
                                pretrained_filter_fn=_unwrap_checkpoint,
                                feature_cfg=feature_cfg_of(kwargs), **kwargs)


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
