"""GLNet (Zhu, Wang, Zhang & Lau, NeurIPS 2024) as an OpenMMLab backbone.

Weight-compatible with the authors' ImageNet checkpoints (GLNet-STL, -STL-ParamSlot, -4G, -9G,
-16G) and numerically equal to their classifier's stages (see shared/spec/glnet.md). The output
norms ``out_norms`` are ours: the authors released no dense-prediction code.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ...registry import register_model
from ..layers.basic import GELU
from ..layers.glnet_blocks import SLOT_INITS, GLNetStage, build_glnet_block
from ..utils.image_batch import check_image_batch
from ..utils.pretrained import (
    STATE_DICT_KEYS,
    drop_keys,
    load_and_report,
    read_state_dict,
    unwrap_state_dict,
)
from .base import DenseBackbone

#: Keys of the ImageNet classifier that the backbone does not have.
CLASSIFIER_PREFIXES = ('head.', 'norm.')
#: Settings every arch dict must give.
REQUIRED_ARCH_KEYS = ('depth', 'embed_dim', 'mlp_ratios', 'mixing_modes')
#: Optional settings of an arch dict and their defaults.
ARCH_DEFAULTS = dict(head_dim=32, local_dw_ks=5, num_slots=64, slot_init='ada_avgpool', cpe_ks=3,
                     downsample_style='ovlp', transition_layout='proj.norm', mlp_dw=True,
                     layerscale=0.0, downsample_norm='bn')
BLOCK_MODES = ('glmix', 'mha_nchw', 'mha')
DOWNSAMPLE_STYLES = ('ovlp', 'nonovlp')
TRANSITION_LAYOUTS = ('proj.norm', 'norm.proj')
#: Norms of the stem / downsampling layers (and of the classifier's final ``norm``).
DOWNSAMPLE_NORMS = ('bn', 'ln')


def build_downsample_norm(kind: str, channels: int) -> nn.Module:
    """``BatchNorm2d`` (``'bn'``, the released models) or ``LayerNorm2d`` eps 1e-6 (``'ln'``).

    Args:
        kind: ``'bn'`` or ``'ln'``.
        channels: Number of channels.
    """
    if kind == 'bn':
        return nn.BatchNorm2d(channels)
    if kind == 'ln':
        return LayerNorm2d(channels, eps=1e-6)
    raise ValueError(f'downsample_norm must be one of {DOWNSAMPLE_NORMS}, got {kind!r}')


#: Archs whose released checkpoint keeps its weights in ``model_ema`` (the others: in ``model``).
EMA_RELEASES = ('16g',)


def checkpoint_state_keys(arch_name: Optional[str]) -> tuple[str, ...]:
    """Checkpoint entries holding a GLNet's weights, in order of preference.

    The authors' release keeps the weights under ``model``, for GLNet-16G under ``model_ema``; a
    file holding both loads that one. ``state_dict`` (mmengine checkpoints, ours) comes first.

    Args:
        arch_name: Lower-case arch name, or None for a custom arch dict.
    """
    if arch_name in EMA_RELEASES:
        return ('state_dict', 'model_ema', 'model', 'module')
    return STATE_DICT_KEYS


def select_checkpoint_state(ckpt: object, arch_name: Optional[str],
                            source: str = 'checkpoint') -> dict:
    """The weights of a loaded GLNet checkpoint by :func:`checkpoint_state_keys` (the rule of
    both the backbone's and the timm classifier's loading); logs which entry was taken.

    Args:
        ckpt: The loaded checkpoint.
        arch_name: Lower-case arch name, or None for a custom arch dict.
        source: Name of the checkpoint, for the log.
    """
    return unwrap_state_dict(ckpt, checkpoint_state_keys(arch_name), source=source)


class LoadResult(NamedTuple):
    """What :meth:`GLNet.load_pretrained` did with a checkpoint's keys."""

    missing: list
    unexpected: list
    ignored: list


def _stl(**extra) -> dict:
    return dict(depth=[2, 2, 6, 2], embed_dim=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4],
                mixing_modes=['glmix', 'glmix', 'glmix', 'mha'], cpe_ks=0, mlp_dw=False,
                downsample_style='nonovlp', transition_layout='norm.proj', **extra)


def _g(embed_dim: list, **extra) -> dict:
    return dict(depth=[4, 4, 18, 4], embed_dim=embed_dim, mlp_ratios=[3, 3, 3, 3],
                mixing_modes=['glmix', 'glmix', 'glmix.mha_nchw', 'mha_nchw'], cpe_ks=3,
                mlp_dw=True, downsample_style='ovlp', transition_layout='proj.norm', **extra)


@register_model
class GLNet(DenseBackbone):
    """GLNet backbone for dense prediction: four outputs at strides 4, 8, 16, 32.

    ``out_channels`` equals the arch's ``embed_dim`` (e.g. ``[64, 128, 256, 512]`` for ``'4g'``).
    Each returned stage output passes through its own ``LayerNorm2d`` (``out_norms[str(i)]``),
    new parameters that the ImageNet checkpoints do not hold.

    Args:
        arch: ``'stl' | 'stl_paramslot' | '4g' | '9g' | '16g'`` or a dict with keys
            ``depth, embed_dim, mlp_ratios, mixing_modes`` and optionally ``head_dim (32),
            local_dw_ks (5), num_slots (64), slot_init ('ada_avgpool' | 'param'), cpe_ks (3),
            downsample_style ('ovlp' | 'nonovlp'), transition_layout ('proj.norm' | 'norm.proj'),
            mlp_dw (True), layerscale (0: off), downsample_norm ('bn' | 'ln')``. A stage's
            mixing is ``'glmix'``, ``'mha_nchw'``, ``'mha'`` (tokens; not combinable with the
            others inside a stage) or a ``'.'``-joined cycle such as ``'glmix.mha_nchw'`` (even
            blocks GLMix, odd ones attention). The released models use BatchNorm2d in the stem
            and downsampling layers; ``downsample_norm='ln'`` swaps in channel LayerNorms (eps
            1e-6), as in the small numerical reference configuration
            (shared/reference/glnet_tiny_reference.pt, whose arch dict does not say so).
        out_indices: Which of the four stage outputs to return.
        frozen_stages: Number of leading stages (0-4) to freeze (downsampling layers, blocks and
            output norm); -1 or 0: none.
        norm_eval: Keep BatchNorm layers in eval mode during training (LayerNorms unaffected).
        drop_path_rate: Stochastic depth rate, linearly spaced over all blocks (the authors used
            0.1 / 0.15 / 0.3 / 0.4 on ImageNet for stl / 4g / 9g / 16g).
        with_cp: Gradient checkpointing: a bool for every block, or four ints giving the number
            of leading blocks checkpointed in each stage.
        with_out_norms: Add the output norms (dense prediction); the ImageNet classifier has none.
        init_cfg: mmengine's init_cfg (a dict or a list of dicts; see
            :meth:`~mmoverlock.models.backbones.base.DenseBackbone.init_weights`): the weights
            are first initialised as the authors do, then by the given mmengine initialisers,
            last ``dict(type='Pretrained', checkpoint=..., prefix=None)`` loads the authors'
            ImageNet checkpoint (weights under ``model``, for 16g under ``model_ema``, see
            :func:`checkpoint_state_keys`) or one of ours.
        pretrained: Deprecated, for mmseg's ``EncoderDecoder``, which passes
            ``model.pretrained`` here. A checkpoint path is loaded as
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` (with a warning; giving
            ``init_cfg`` too is an error). A model-zoo name (``open-mmlab://...``,
            ``torchvision://...``: another network, such as the ``open-mmlab://resnet50_v1c``
            of stock mmseg base configs) is ignored with a warning.
    """

    arch_zoo = {
        'stl': _stl(),
        'stl_paramslot': _stl(slot_init='param'),
        '4g': _g([64, 128, 256, 512]),
        '9g': _g([96, 192, 384, 768]),
        '16g': _g([128, 256, 512, 1024], layerscale=1e-4),
    }
    def __init__(self,
                 arch: Union[str, dict] = '4g',
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.0,
                 with_cp: Union[bool, Sequence[int]] = False,
                 with_out_norms: bool = True,
                 init_cfg: Union[dict, list, None] = None,
                 pretrained: Optional[str] = None) -> None:
        init_cfg = self.merge_pretrained_arg(pretrained, init_cfg, type(self).__name__)
        super().__init__(init_cfg=init_cfg)
        self.arch_name = arch.lower() if isinstance(arch, str) else None
        self.arch_settings = self.resolve_arch(arch)
        a = self.arch_settings
        dims, depth = a['embed_dim'], a['depth']
        self.out_channels = list(dims)
        self.out_indices = self.check_out_indices(out_indices)
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages must be in [-1, 4], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_out_norms = with_out_norms
        self.cp_counts = self.checkpoint_counts(with_cp, depth, [f'stage {i}' for i in range(4)])

        self.downsample_layers = nn.ModuleList(
            [self._stem(dims[0], a['downsample_style'], a['downsample_norm'])]
            + [self._transition(dims[i - 1], dims[i], a['downsample_style'],
                                a['transition_layout'], a['downsample_norm'])
               for i in range(1, 4)])
        rates = torch.linspace(0, drop_path_rate, sum(depth), device='cpu').tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            modes = self.block_modes(a['mixing_modes'][i], depth[i])
            start = sum(depth[:i])
            self.stages.append(GLNetStage(
                [build_glnet_block(mode, dims[i], dims[i] // a['head_dim'], a['mlp_ratios'][i],
                                   rates[start + j], a['layerscale'], a['cpe_ks'],
                                   a['local_dw_ks'], a['num_slots'], a['slot_init'], a['mlp_dw'])
                 for j, mode in enumerate(modes)],
                tokens=bool(modes) and modes[0] == 'mha'))
        if with_out_norms:
            self.out_norms = nn.ModuleDict(
                {str(i): LayerNorm2d(dims[i], eps=1e-6) for i in self.out_indices})
        self._init_fresh()
        self._freeze_stages()

    # ------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------
    @classmethod
    def resolve_arch(cls, arch: Union[str, dict]) -> dict:
        """The complete settings of ``arch`` (a name in ``arch_zoo`` or a dict), validated."""
        if isinstance(arch, str):
            key = arch.lower()
            if key not in cls.arch_zoo:
                raise ValueError(f'unknown GLNet arch {arch!r}; choose one of '
                                 f'{list(cls.arch_zoo)} or pass a dict with keys '
                                 f'{list(REQUIRED_ARCH_KEYS)} (optional: {list(ARCH_DEFAULTS)})')
            arch = cls.arch_zoo[key]
        elif not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        missing = [k for k in REQUIRED_ARCH_KEYS if k not in arch]
        unknown = sorted(set(arch) - set(REQUIRED_ARCH_KEYS) - set(ARCH_DEFAULTS))
        if missing or unknown:
            raise ValueError(f'custom GLNet arch: missing keys {missing}, unknown keys {unknown}; '
                             f'required {list(REQUIRED_ARCH_KEYS)}, optional '
                             f'{list(ARCH_DEFAULTS)}')
        a = {**ARCH_DEFAULTS, **arch}
        ratios = a['mlp_ratios']
        a['mlp_ratios'] = [ratios] * 4 if isinstance(ratios, (int, float)) else list(ratios)
        for key in ('depth', 'embed_dim', 'mlp_ratios', 'mixing_modes'):
            a[key] = list(a[key])
            if len(a[key]) != 4:
                raise ValueError(f'GLNet arch: {key} needs 4 values, got {a[key]}')
        for i, (dim, n) in enumerate(zip(a['embed_dim'], a['depth'])):
            if dim % a['head_dim']:
                raise ValueError(f'GLNet arch: embed_dim[{i}] = {dim} is not a multiple of '
                                 f"head_dim {a['head_dim']}")
            cls.block_modes(a['mixing_modes'][i], n)
        choices = dict(slot_init=SLOT_INITS, downsample_style=DOWNSAMPLE_STYLES,
                       transition_layout=TRANSITION_LAYOUTS, downsample_norm=DOWNSAMPLE_NORMS)
        for key, valid in choices.items():
            if a[key] not in valid:
                raise ValueError(f'GLNet arch: {key} must be one of {valid}, got {a[key]!r}')
        a['layerscale'] = float(a['layerscale'] or 0.0)
        return a

    @staticmethod
    def block_modes(mixing: str, depth: int) -> list[str]:
        """Per-block mixing of a stage: ``'glmix.mha_nchw'`` cycles through its parts."""
        parts = mixing.split('.')
        bad = [p for p in parts if p not in BLOCK_MODES]
        if bad:
            raise ValueError(f'unknown GLNet mixing {mixing!r}: use {BLOCK_MODES} or a '
                             "'.'-joined cycle of them such as 'glmix.mha_nchw'")
        modes = [parts[j % len(parts)] for j in range(depth)]
        if 'mha' in modes and set(modes) != {'mha'}:
            raise ValueError(f"GLNet mixing {mixing!r}: 'mha' blocks work on tokens and cannot "
                             'share a stage with NCHW blocks; use mha_nchw')
        return modes

    @staticmethod
    def _stem(dim: int, style: str, norm: str) -> nn.Sequential:
        if style == 'nonovlp':
            return nn.Sequential(nn.Conv2d(3, dim, 4, 4), build_downsample_norm(norm, dim))
        return nn.Sequential(
            nn.Identity(),
            nn.Conv2d(3, dim // 2, 3, 2, 1), build_downsample_norm(norm, dim // 2), GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1), build_downsample_norm(norm, dim))

    @staticmethod
    def _transition(in_dim: int, out_dim: int, style: str, layout: str,
                    norm: str) -> nn.Sequential:
        conv = (nn.Conv2d(in_dim, out_dim, 2, 2) if style == 'nonovlp'
                else nn.Conv2d(in_dim, out_dim, 3, 2, 1))
        if layout == 'norm.proj':
            return nn.Sequential(build_downsample_norm(norm, in_dim), conv)
        return nn.Sequential(conv, build_downsample_norm(norm, out_dim))

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------
    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        count = self.cp_counts[i] if self.training and torch.is_grad_enabled() else 0

        def run(j: int, block: nn.Module, t: Tensor) -> Tensor:
            if j < count:
                return cp.checkpoint(block, t, use_reentrant=False)
            return block(t)

        return self.stages[i](self.downsample_layers[i](x), run)

    def forward_stages(self, x: Tensor, last_stage: int = 3) -> list[Tensor]:
        """The raw NCHW outputs of stages ``0..last_stage`` (before the output norms)."""
        outs = []
        for i in range(last_stage + 1):
            x = self._run_stage(i, x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Return the (normalised) outputs of the stages in ``out_indices`` for images ``x``."""
        check_image_batch(x, 'GLNet')
        outs = self.forward_stages(x, max(self.out_indices))
        if self.with_out_norms:
            return tuple(self.out_norms[str(i)](outs[i]) for i in self.out_indices)
        return tuple(outs[i] for i in self.out_indices)

    # ------------------------------------------------------------------------------------------
    # Training-mode behaviour
    # ------------------------------------------------------------------------------------------
    def _stage_modules(self, stage: int) -> list[nn.Module]:
        modules = [self.downsample_layers[stage], self.stages[stage]]
        if self.with_out_norms and str(stage) in self.out_norms:
            modules.append(self.out_norms[str(stage)])
        return modules

    # ------------------------------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_fresh(self) -> None:
        """The authors' initialisation: truncated-normal Linears, unit LayerNorms, default convs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> LoadResult:
        """Load the authors' ImageNet checkpoint (or one of ours) into this backbone.

        The classifier's ``head.*`` and final ``norm.*`` are ignored, the output norms are
        reported as newly initialised, and a checkpoint of another arch is refused with an
        explanation.

        Args:
            checkpoint: Path or URL of the checkpoint (weights under ``state_dict``, ``model``,
                ``model_ema`` or at the top level; see :func:`checkpoint_state_keys`).
            prefix: Keep only keys under this prefix (e.g. ``'backbone.'``), stripped.

        Returns:
            The missing, unexpected and ignored keys.
        """
        state = read_state_dict(checkpoint, prefix=prefix,
                                state_keys=checkpoint_state_keys(self.arch_name))
        state, ignored = drop_keys(state, CLASSIFIER_PREFIXES)
        self.check_compatible(state, source=str(checkpoint))
        mine = set(self.state_dict())
        unused = [k for k in state if k.startswith('out_norms.') and k not in mine]
        state = OrderedDict((k, v) for k, v in state.items() if k not in unused)
        if unused:
            MMLogger.get_current_instance().info(
                f'GLNet: skipped output norms of stages not returned here: {sorted(unused)}')
        missing, unexpected = load_and_report(self, state, str(checkpoint), ignored)
        return LoadResult(missing, unexpected, ignored)

    def check_compatible(self, state: dict, source: str = 'checkpoint') -> None:
        """Raise a clear error if ``state`` holds another GLNet arch (or no GLNet at all)."""
        found = self.arch_of_state_dict(state)
        if not found:
            raise ValueError(f"{source} does not look like a GLNet backbone (no "
                             "'stages.0.blocks.0.norm1.weight'); if its keys carry a prefix "
                             "such as 'backbone.', set init_cfg.prefix")
        mine = self.arch_of_state_dict(self.state_dict())
        diffs = [k for k in found if found[k] != mine.get(k)]
        if not diffs:
            return
        detail = '; '.join(f'{k}: checkpoint {found[k]} vs model {mine.get(k)}' for k in diffs)
        guess = [name for name in self.arch_zoo if self._summary_of(name) == found]
        hint = (f"It matches arch='{guess[0]}'; build the backbone with that arch."
                if guess else 'Build the backbone with an arch dict matching the checkpoint.')
        model_arch = self.arch_name or 'custom dict'
        raise ValueError(f'arch mismatch: {source} holds a different GLNet arch than this '
                         f"backbone (arch='{model_arch}'): {detail}. {hint}")

    @classmethod
    def _summary_of(cls, name: str) -> dict:
        with torch.device('meta'):
            model = GLNet(name, with_out_norms=False)  # also for subclasses (the classifier)
        return cls.arch_of_state_dict(model.state_dict())

    @staticmethod
    def arch_of_state_dict(state: dict) -> dict:
        """Arch settings that can be read off a GLNet state dict's keys and shapes."""
        if 'stages.0.blocks.0.norm1.weight' not in state:
            return {}
        found: OrderedDict[str, object] = OrderedDict()
        if 'downsample_layers.0.0.weight' in state:
            found['downsample_style'] = 'nonovlp'
        elif 'downsample_layers.0.1.weight' in state:
            found['downsample_style'] = 'ovlp'
        if 'downsample_layers.1.0.weight' in state:
            conv_first = state['downsample_layers.1.0.weight'].dim() == 4
            found['transition_layout'] = 'proj.norm' if conv_first else 'norm.proj'
        blocks = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.')
        per_stage: dict = {}
        for key in state:
            m = blocks.match(key)
            if m:
                per_stage.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        found['depth'] = [max(per_stage.get(i, {-1})) + 1 for i in range(4)]
        found['embed_dim'] = [state[f'stages.{i}.blocks.0.norm1.weight'].shape[0]
                              if f'stages.{i}.blocks.0.norm1.weight' in state else 0
                              for i in range(4)]

        def mode(prefix: str) -> str:
            if prefix + 'relation_mha.in_proj_weight' in state:
                return 'glmix'
            weight = state.get(prefix + 'mlp.0.weight')
            return 'mha_nchw' if weight is not None and weight.dim() == 4 else 'mha'

        modes = []
        for i, n in enumerate(found['depth']):
            stage = [mode(f'stages.{i}.blocks.{j}.') for j in range(n)]
            if len(set(stage)) == 1:
                modes.append(stage[0])
            elif stage == [('glmix', 'mha_nchw')[j % 2] for j in range(n)]:
                modes.append('glmix.mha_nchw')
            else:
                modes.append(','.join(stage))
        found['mixing_modes'] = modes
        found['mlp_ratios'] = [
            state[f'stages.{i}.blocks.0.mlp.0.weight'].shape[0] / found['embed_dim'][i]
            if f'stages.{i}.blocks.0.mlp.0.weight' in state else 0 for i in range(4)]
        suffixes = {k.split('.', 4)[-1] for k in state if blocks.match(k)}
        found['cpe_ks'] = next((state[k].shape[-1] for k in state
                                if k.endswith('.pos_conv.weight')), 0)
        found['mlp_dw'] = 'mlp.1.weight' in suffixes
        found['layerscale'] = 'ls1.gamma' in suffixes
        found['downsample_norm'] = ('bn' if any(k.startswith('downsample_layers.')
                                                and k.endswith('.running_mean') for k in state)
                                    else 'ln')
        if 'slot_scale' in suffixes:
            found['slot_init'] = 'param' if 'init_slots' in suffixes else 'ada_avgpool'
        return found


__all__ = ['GLNet', 'LoadResult', 'build_downsample_norm', 'checkpoint_state_keys',
           'select_checkpoint_state']
