"""OverLoCK (Lou & Yu, CVPR 2025) as an OpenMMLab backbone.

Weight-compatible with the authors' ImageNet, COCO and ADE20K checkpoints and numerically equal to
their code (see shared/spec/overlock.md).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import register_model
from ..layers.basic import GELU, LayerScale, PointwiseConv2d
from ..layers.dilated_reparam import DilatedReparamBlock
from ..layers.overlock_blocks import DynamicConvBlock, RepConvBlock
from ..utils.image_batch import check_image_batch
from ..utils.pretrained import drop_keys, load_and_report, read_state_dict
from ..utils.recompute import checkpoint_module
from .base import DenseBackbone

#: Block lists in forward (and drop-path) order; ``with_cp`` counts follow it too.
BLOCK_LISTS = ('blocks1', 'blocks2', 'blocks3', 'blocks4', 'sub_blocks3', 'sub_blocks4')
#: Modules that produce each of the four outputs (for ``frozen_stages``).
STAGE_MODULES = (
    ('patch_embed1', 'blocks1', 'extra_norm.0'),
    ('patch_embed2', 'blocks2', 'extra_norm.1'),
    ('patch_embed3', 'blocks3', 'patch_embed4', 'blocks4', 'high_level_proj', 'sub_blocks3',
     'extra_norm.2'),
    ('patch_embedx', 'sub_blocks4', 'extra_norm.3', 'extra_norm.4', 'h_proj'),
)
CLASSIFIER_PREFIXES = ('head.', 'aux_head.')
ARCH_KEYS = {'depth', 'sub_depth', 'embed_dim', 'kernel_size', 'sub_num_heads', 'mlp_ratio',
             'sub_mlp_ratio'}


def _bn_conv(in_ch: int, out_ch: int, stride: int = 2) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch)]


def drop_path_rates(max_rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``max_rate`` over ``num_blocks`` blocks."""
    if num_blocks <= 1:
        return [0.0] * num_blocks
    return [max_rate * i / (num_blocks - 1) for i in range(num_blocks)]


class FocusDownsample(nn.Module):
    """Downsampling of the Focus-Net's two streams between stages 3 and 4."""

    def __init__(self, dim: int, out_dim: int, ctx_dim: int) -> None:
        super().__init__()
        self.x_proj = nn.Sequential(*_bn_conv(dim, out_dim))
        self.h_proj = nn.Sequential(*_bn_conv(ctx_dim, ctx_dim))

    def forward(self, x: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


@register_model
class OverLoCK(DenseBackbone):
    """OverLoCK backbone for dense prediction (Base-Net, Overview-Net and Focus-Net).

    Outputs four maps at strides 4, 8, 16, 32 with ``out_channels`` =
    ``[D0, D1, D2 + c, D3 + c]`` (c = D3 // 4), e.g. ``[64, 128, 384, 640]`` for ``'t'``.

    Args:
        arch: ``'xt' | 't' | 's' | 'b'`` (or ``'x-tiny' | 'tiny' | 'small' | 'base'``), or a dict
            with keys ``depth, sub_depth, embed_dim, kernel_size, sub_num_heads, mlp_ratio,
            sub_mlp_ratio``.
        overview_fusion: True gives the authors' detection form (the Overview-Net context is added
            to the last output through ``extra_norm[4]`` and ``h_proj``), False their segmentation
            form.
        out_indices: Which of the four outputs to return.
        frozen_stages: Number of leading stages (0-3) to freeze, stem included; -1 or 0: none.
            Stage 2 comprises Base-Net stage 3, the Overview-Net and the first Focus-Net stage.
        norm_eval: Keep BatchNorm layers in eval mode during training (LayerNorms are unaffected).
        drop_path_rate: Stochastic depth rate, linearly spaced over all blocks.
        with_cp: Gradient checkpointing: a bool for every block, or six ints giving the number of
            leading blocks checkpointed in ``blocks1, blocks2, blocks3, blocks4, sub_blocks3,
            sub_blocks4``. Checkpointed blocks keep only their input for backward.
        selective_cp: In training, keep only the outputs of dense convolutions and matrix
            products for backward (not those of 1x1 convs that widen a narrow map, see
            :func:`~mmoverlock.models.utils.recompute.save_dense_products`) and recompute the
            cheap operators (depthwise convolutions, norms, activations) of the blocks not
            covered by ``with_cp``: ``True`` in every block list, ``False`` in none, or the
            names of the block lists where it applies (a subset of ``blocks1, blocks2,
            blocks3, blocks4, sub_blocks3, sub_blocks4``). Where ``blocks1`` is recomputed
            (selectively or with ``with_cp``) the stem is recomputed whole. Less than half the
            training memory at a cost in time; BatchNorm statistics are updated once. The
            blocks at 1/16 and 1/32 scale (``blocks4``, ``sub_blocks3``, ``sub_blocks4``) hold
            little memory for the time their recomputation takes: leaving them out trades
            some memory for speed (figures in the README, "Speed and memory").
        deploy: Build the re-parameterised form (for ``*_reparam.pth`` checkpoints).
        with_out_norms: Add the output LayerNorms ``extra_norm`` (dense prediction). The ImageNet
            classifier has none.
        channels_last: Run the network on channels-last (NHWC-strided) maps; outputs are returned
            in the ordinary contiguous layout. PyTorch's CPU depthwise convolutions with large
            kernels are an order of magnitude faster in this layout (see ``benchmarks/``); the
            parameters and their layout are unchanged.
        init_cfg: mmengine's init_cfg (a dict or a list of dicts; see
            :meth:`~mmoverlock.models.backbones.base.DenseBackbone.init_weights`). The weights
            are first initialised as the authors do (truncated-normal std 0.02 convs with zero
            bias, unit norms, LayerScales at their init value), then by the given mmengine
            initialisers, last ``dict(type='Pretrained', checkpoint=..., prefix=...)`` loads
            released weights (what a checkpoint lacks, e.g. ``h_proj``/``extra_norm`` of an
            ImageNet one, keeps the initialisation before it). A checkpoint of another arch or
            form is refused: an ADE20K (segmentation-form) checkpoint needs
            ``overview_fusion=False``, a COCO (detection-form) one ``overview_fusion=True``.
        pretrained: Deprecated, for mmseg's ``EncoderDecoder``, which passes
            ``model.pretrained`` here. A checkpoint path is loaded as
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` (with a warning; giving
            ``init_cfg`` too is an error). A model-zoo name (``open-mmlab://...``,
            ``torchvision://...``: another network, such as the ``open-mmlab://resnet50_v1c``
            of stock mmseg base configs) is ignored with a warning.
    """

    arch_zoo = {
        **dict.fromkeys(['xt', 'x-tiny'], dict(
            depth=[2, 2, 3, 2], sub_depth=[6, 2], embed_dim=[56, 112, 256, 336],
            kernel_size=[17, 15, 13, 7], sub_num_heads=[4, 6], mlp_ratio=[4, 4, 4, 4],
            sub_mlp_ratio=[3, 3])),
        **dict.fromkeys(['t', 'tiny'], dict(
            depth=[4, 4, 6, 2], sub_depth=[12, 2], embed_dim=[64, 128, 256, 512],
            kernel_size=[17, 15, 13, 7], sub_num_heads=[4, 8], mlp_ratio=[4, 4, 4, 4],
            sub_mlp_ratio=[3, 3])),
        **dict.fromkeys(['s', 'small'], dict(
            depth=[6, 6, 8, 3], sub_depth=[16, 3], embed_dim=[64, 128, 320, 512],
            kernel_size=[17, 15, 13, 7], sub_num_heads=[8, 16], mlp_ratio=[4, 4, 4, 4],
            sub_mlp_ratio=[3, 3])),
        **dict.fromkeys(['b', 'base'], dict(
            depth=[8, 8, 10, 4], sub_depth=[20, 4], embed_dim=[80, 160, 384, 576],
            kernel_size=[17, 15, 13, 7], sub_num_heads=[6, 9], mlp_ratio=[4, 4, 4, 4],
            sub_mlp_ratio=[3, 3])),
    }
    #: Per-stage LayerScale init of the blocks (None: no LayerScale).
    ls_init_value = (None, None, 1.0, 1.0)

    def __init__(self,
                 arch: Union[str, dict] = 't',
                 overview_fusion: bool = True,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.0,
                 with_cp: Union[bool, Sequence[int]] = False,
                 selective_cp: Union[bool, Sequence[str]] = True,
                 deploy: bool = False,
                 with_out_norms: bool = True,
                 channels_last: bool = True,
                 init_cfg: Union[dict, list, None] = None,
                 pretrained: Optional[str] = None) -> None:
        init_cfg = self.merge_pretrained_arg(pretrained, init_cfg, type(self).__name__)
        super().__init__(init_cfg=init_cfg)
        self.channels_last = channels_last
        self.arch_settings = self.resolve_arch(arch)
        a = self.arch_settings
        dims = list(a['embed_dim'])
        ctx_dim = dims[3] // 4
        self.ctx_dim = ctx_dim
        self.overview_fusion = overview_fusion and with_out_norms
        self.with_out_norms = with_out_norms
        self.out_channels = [dims[0], dims[1], dims[2] + ctx_dim, dims[3] + ctx_dim]
        self.out_indices = self.check_out_indices(out_indices)
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages must be in [-1, 4], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.selective_cp = self.check_selective_cp(selective_cp)
        self.deploy = deploy

        depth, sub_depth = list(a['depth']), list(a['sub_depth'])
        counts = depth + sub_depth
        self.cp_counts = self.checkpoint_counts(with_cp, counts, BLOCK_LISTS)
        rates = drop_path_rates(drop_path_rate, sum(counts))
        starts = [sum(counts[:i]) for i in range(len(counts))]

        # Modules are registered in the order of the authors' state dicts.
        self.patch_embed1 = nn.Sequential(
            nn.Conv2d(3, dims[0] // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(dims[0] // 2),
            GELU(),
            nn.Conv2d(dims[0] // 2, dims[0] // 2, 3, 1, 1, bias=False),
            nn.BatchNorm2d(dims[0] // 2), GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1, bias=False), nn.BatchNorm2d(dims[0]),
            GELU(),
            nn.Conv2d(dims[0], dims[0], 3, 1, 1, bias=False), nn.BatchNorm2d(dims[0]))
        for i in range(1, 4):
            self.add_module(f'patch_embed{i + 1}', nn.Sequential(*_bn_conv(dims[i - 1], dims[i])))
        self.high_level_proj = PointwiseConv2d(dims[3], ctx_dim)
        self.patch_embedx = FocusDownsample(dims[2], dims[3], ctx_dim)
        for i in range(4):
            self.add_module(f'blocks{i + 1}', nn.ModuleList(
                RepConvBlock(dims[i], a['kernel_size'][i], a['mlp_ratio'][i],
                             self.ls_init_value[i], rates[starts[i] + j], deploy=deploy)
                for j in range(depth[i])))
        for s, stage in enumerate((2, 3)):
            n = sub_depth[s]
            self.add_module(f'sub_blocks{stage + 1}', nn.ModuleList(
                DynamicConvBlock(dims[stage], ctx_dim, a['kernel_size'][stage],
                                 a['sub_num_heads'][s], a['sub_mlp_ratio'][s],
                                 self.ls_init_value[stage], rates[starts[4 + s] + j],
                                 is_first=(s == 0 and j == 0), is_last=(s == 1 and j == n - 1),
                                 deploy=deploy)
                for j in range(n)))
        if self.overview_fusion:
            self.h_proj = nn.Sequential(PointwiseConv2d(dims[3], self.out_channels[3]),
                                        LayerScale(self.out_channels[3], 1e-5))
        if with_out_norms:
            widths = self.out_channels + ([dims[3]] if self.overview_fusion else [])
            self.extra_norm = nn.ModuleList(LayerNorm2d(w, eps=1e-6) for w in widths)
            # The norms of maps not returned are kept (checkpoints hold them) but not used, so
            # frozen: DDP would otherwise stop at unused parameters (e.g. out_indices=(1, 2, 3)).
            # extra_norm[1] always runs: its output feeds stage 3.
            for i in {0, 2, 3} - set(self.out_indices):
                self.extra_norm[i].requires_grad_(False)
        self._freeze_stages()

    # ------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------
    @classmethod
    def resolve_arch(cls, arch: Union[str, dict]) -> dict:
        """The settings of ``arch`` (a name in ``arch_zoo`` or a complete dict)."""
        if isinstance(arch, str):
            key = arch.lower()
            if key not in cls.arch_zoo:
                raise ValueError(f'unknown OverLoCK arch {arch!r}; choose one of '
                                 f'{sorted(cls.arch_zoo)} or pass a dict with keys '
                                 f'{sorted(ARCH_KEYS)}')
            return {k: list(v) for k, v in cls.arch_zoo[key].items()}
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        missing, extra = ARCH_KEYS - set(arch), set(arch) - ARCH_KEYS
        if missing or extra:
            raise ValueError(f'custom OverLoCK arch: missing keys {sorted(missing)}, unknown keys '
                             f'{sorted(extra)}; expected exactly {sorted(ARCH_KEYS)}')
        lengths = dict(depth=4, embed_dim=4, kernel_size=4, mlp_ratio=4, sub_depth=2,
                       sub_num_heads=2, sub_mlp_ratio=2)
        for key, n in lengths.items():
            if len(arch[key]) != n:
                raise ValueError(f'custom OverLoCK arch: {key} needs {n} values, got {arch[key]}')
        return {k: list(v) for k, v in arch.items()}

    @staticmethod
    def check_selective_cp(selective_cp: Union[bool, Sequence[str]]) -> Union[bool, tuple]:
        """``selective_cp`` as a bool or a tuple of block-list names; unknown names refused."""
        if isinstance(selective_cp, bool):
            return selective_cp
        if isinstance(selective_cp, str) or not isinstance(selective_cp, Sequence):
            raise TypeError('selective_cp must be a bool or a sequence of block-list names '
                            f'out of {list(BLOCK_LISTS)}, got {selective_cp!r}')
        unknown = [name for name in selective_cp if name not in BLOCK_LISTS]
        if unknown:
            raise ValueError(f'selective_cp: unknown block lists {unknown}; choose from '
                             f'{list(BLOCK_LISTS)}')
        return tuple(selective_cp)

    def recomputes_selectively(self, name: str) -> bool:
        """Whether the blocks of block list ``name`` run under selective recomputation in
        training (those not covered by ``with_cp``)."""
        if isinstance(self.selective_cp, bool):
            return self.selective_cp
        return name in self.selective_cp

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------
    def _call(self, name: str, index: int, block: nn.Module, *args: Tensor):
        if self.training and torch.is_grad_enabled():
            if index < self.cp_counts[BLOCK_LISTS.index(name)]:
                return checkpoint_module(block, *args)
            if self.recomputes_selectively(name):
                return checkpoint_module(block, *args, selective=True)
        return block(*args)

    def _run_stem(self, x: Tensor) -> Tensor:
        # The stem's maps are the network's largest (1/2 and 1/4 scale) and its backward runs
        # last, so all it saves is alive at the training step's peak; recomputing it costs ~1% of
        # the step (OverLoCK-XT, 2x3x512x512, CPU: peak RSS 2.01 -> 1.85 GB in the benchmark runs
        # before and after it was added).
        recompute = self.recomputes_selectively('blocks1') or any(self.cp_counts)
        if (recompute and self.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in self.patch_embed1.parameters())):
            return checkpoint_module(self.patch_embed1, x)
        return self.patch_embed1(x)

    def _run_blocks(self, name: str, x: Tensor) -> Tensor:
        for j, block in enumerate(getattr(self, name)):
            x = self._call(name, j, block, x)
        return x

    def _run_focus(self, name: str, x: Tensor, h: Tensor,
                   h0: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        for j, block in enumerate(getattr(self, name)):
            x, h = self._call(name, j, block, x, h, h0)
        return x, h

    def forward_features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The four raw stage outputs (before ``extra_norm``) and the Overview-Net context."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self._run_blocks('blocks1', self._run_stem(x))
        outs = [x]
        x = self._run_blocks('blocks2', self.patch_embed2(x))
        outs.append(x)
        if self.with_out_norms:
            # The authors' dense-prediction model feeds the *normalised* stage-2 map onwards
            # (only this one); the classifier has no output norms.
            x = outs[1] = self.extra_norm[1](x)
        x = self._run_blocks('blocks3', self.patch_embed3(x))
        ctx = self._run_blocks('blocks4', self.patch_embed4(x))
        h0 = self.high_level_proj(ctx)
        h0_up = F.interpolate(h0, size=x.shape[-2:], mode='bilinear', align_corners=False)
        x, h = self._run_focus('sub_blocks3', x, h0_up, h0_up)
        outs.append(torch.cat([x, h], dim=1))
        x, h = self.patch_embedx(x, h)
        outs.append(self._run_focus('sub_blocks4', x, h, h0)[0])
        return outs, ctx

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        check_image_batch(x, 'OverLoCK')
        outs, ctx = self.forward_features(x)
        if self.with_out_norms:
            outs = [outs[i] if i == 1 or i not in self.out_indices else self.extra_norm[i](o)
                    for i, o in enumerate(outs)]
            if self.overview_fusion and 3 in self.out_indices:
                outs[3] = outs[3] + self.h_proj(self.extra_norm[4](ctx))
        return tuple(outs[i].contiguous() for i in self.out_indices)

    # ------------------------------------------------------------------------------------------
    # Training-mode behaviour
    # ------------------------------------------------------------------------------------------
    def _stage_modules(self, stage: int) -> list[nn.Module]:
        modules = []
        for path in STAGE_MODULES[stage]:
            name, _, index = path.partition('.')
            module = getattr(self, name, None)
            if module is not None and index:
                module = module[int(index)] if int(index) < len(module) else None
            if module is not None:
                modules.append(module)
        return modules

    # ------------------------------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_fresh(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (_BatchNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def load_pretrained(self, checkpoint: str,
                        prefix: Optional[str] = None) -> tuple[list[str], list[str]]:
        """Load the authors' ImageNet / COCO / ADE20K checkpoint (or ours) into this backbone.

        Classifier heads are ignored, the output norms and ``h_proj`` (absent from ImageNet
        checkpoints) are reported as newly initialised (they keep their current values; through
        :meth:`init_weights` that is the authors' initialisation), and a checkpoint of another
        arch or form (training vs re-parameterised, detection vs segmentation) is refused with an
        explanation.

        Args:
            checkpoint: Path or URL of the checkpoint.
            prefix: Keep only keys under this prefix (e.g. ``'backbone.'``), stripped.

        Returns:
            The missing and unexpected keys (after dropping the classifier heads).
        """
        state = read_state_dict(checkpoint, prefix=prefix)
        state, ignored = drop_keys(state, CLASSIFIER_PREFIXES)
        self.check_compatible(state, source=checkpoint)
        if not self.with_out_norms:
            # The classifier form has no output norms: a dense checkpoint's are not used.
            state, _ = drop_keys(state, ('h_proj.', 'extra_norm.'))
        return load_and_report(self, state, checkpoint, ignored)

    @staticmethod
    def form_of_state_dict(state: dict) -> str:
        """``'detection'`` (``h_proj`` / ``extra_norm.4`` present), ``'segmentation'`` (output
        norms without those) or ``'classification'`` (no output norms: the ImageNet release)."""
        if any(k.startswith(('h_proj.', 'extra_norm.4.')) for k in state):
            return 'detection'
        if any(k.startswith('extra_norm.') for k in state):
            return 'segmentation'
        return 'classification'

    def check_compatible(self, state: dict, source: str = 'checkpoint') -> None:
        """Raise a clear error if ``state`` belongs to another arch or form of OverLoCK."""
        found = self.arch_of_state_dict(state)
        if not found:
            raise ValueError(f'{source} does not look like an OverLoCK backbone (no '
                             "'patch_embed1.0.weight'); if its keys carry a prefix such as "
                             "'backbone.', set init_cfg.prefix")
        mine = {k: self.arch_settings[k] for k in found}
        if found != mine:
            guess = [name for name, s in self.arch_zoo.items() if len(name) <= 2 and all(
                s[k] == v for k, v in found.items())]
            diffs = '; '.join(f'{k}: checkpoint {found[k]} vs model {mine[k]}'
                              for k in found if found[k] != mine[k])
            raise ValueError(
                f'{source} holds a different OverLoCK arch ({diffs}). '
                + (f"It matches arch='{guess[0]}'; build the backbone with that arch."
                   if guess else 'Build the backbone with an arch dict matching the checkpoint.'))
        reparam = any(k.endswith('lk_origin.bias') for k in state)
        if reparam and not self.deploy:
            raise ValueError(f'{source} is a re-parameterised (deploy) checkpoint; build the '
                             'backbone with deploy=True to load it.')
        if not reparam and self.deploy and any('origin_bn' in k for k in state):
            raise ValueError(f'{source} holds the training form; build the backbone with '
                             'deploy=False, load it, then call reparameterize().')
        form = self.form_of_state_dict(state)
        mine = 'detection' if self.overview_fusion else 'segmentation'
        if self.with_out_norms and form not in ('classification', mine):
            fits = form == 'detection'
            effect = ('its h_proj and extra_norm.4 would be dropped' if fits else
                      'h_proj and extra_norm.4 would stay untrained')
            raise ValueError(
                f'{source} holds the {form} form of OverLoCK (overview_fusion={fits}), this '
                f'backbone is the {mine} form (overview_fusion={self.overview_fusion}): {effect}. '
                f'It matches overview_fusion={fits}; build the backbone with that to load it.')

    @staticmethod
    def arch_of_state_dict(state: dict) -> dict:
        """Arch settings that can be read off a state dict's keys and shapes."""
        if 'patch_embed1.0.weight' not in state:
            return {}
        dims = [state['patch_embed1.9.weight'].shape[0]] + [
            state[f'patch_embed{i}.0.weight'].shape[0] for i in (2, 3, 4)]

        def count(name: str) -> int:
            pattern = re.compile(rf'^{name}\.(\d+)\.')
            idx = {int(m.group(1)) for k in state if (m := pattern.match(k))}
            return max(idx) + 1 if idx else 0

        kernels = [state[f'blocks{i}.0.proj.1.lk_origin.weight'].shape[-1] for i in range(1, 5)
                   if f'blocks{i}.0.proj.1.lk_origin.weight' in state]
        found = dict(embed_dim=dims, depth=[count(f'blocks{i}') for i in range(1, 5)],
                     sub_depth=[count('sub_blocks3'), count('sub_blocks4')])
        if len(kernels) == 4:
            found['kernel_size'] = kernels
        if 'sub_blocks3.0.rpb1' in state and 'sub_blocks4.0.rpb1' in state:
            found['sub_num_heads'] = [state[f'sub_blocks{i}.0.rpb1'].shape[0] // 2 for i in (3, 4)]
        return found

    def reparameterize(self) -> OverLoCK:
        """Convert every DilatedReparamBlock to its single-conv deploy form, in place."""
        for module in self.modules():
            if isinstance(module, DilatedReparamBlock):
                module.reparameterize()
        self.deploy = True
        return self


__all__ = ['OverLoCK']
