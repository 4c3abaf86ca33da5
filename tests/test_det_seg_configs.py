"""Every config of configs/ loads and builds with matching widths; the OverLoCK configs follow the
authors' recipes; a forward + loss runs at full size."""
from __future__ import annotations

import copy
import functools
import os.path as osp

import pytest
import torch
from helpers import ALL_CONFIGS, REPO

from mmoverlock.apis import build_model, check_model_config, load_config

pytestmark = pytest.mark.usefixtures('single_thread')

ARCH_WIDTHS = {'xt': [56, 112, 340, 420], 't': [64, 128, 384, 640], 's': [64, 128, 448, 640],
               'b': [80, 160, 528, 720]}
DET_DROP_PATH = {'xt': 0.1, 't': 0.2, 's': 0.4, 'b': 0.6}
SEG_DROP_PATH = {'xt': 0.1, 't': 0.2, 's': 0.3, 'b': 0.5}
EXPECTED = (
    [f'configs/detection/maskrcnn_overlock_{a}_{s}.py' for a in ARCH_WIDTHS for s in ('1x', '3x')]
    + [f'configs/detection/cascade_maskrcnn_overlock_{a}_3x.py' for a in ('t', 's', 'b')]
    + [f'configs/segmentation/upernet_overlock_{a}_160k_ade20k.py' for a in ARCH_WIDTHS]
    + ['configs/detection/maskrcnn_overlock_xt_demo.py',
       'configs/segmentation/upernet_overlock_xt_demo.py'])


def _rel(path: str) -> str:
    return osp.relpath(path, REPO)


@functools.cache
def _read(path: str):
    return load_config(path)


def _load(path: str, pretrained: bool = False):
    """A copy of the config at ``path`` (read once), by default without ImageNet weights."""
    cfg = copy.deepcopy(_read(path))
    if not pretrained:
        cfg.model.backbone.init_cfg = None
    return cfg


def _arch(path: str) -> str:
    name = osp.basename(path)
    return name.split('overlock_')[1].split('_')[0]


#: The project's recipes (configs/dropin/, stock OpenMMLab models with the backbones dropped in,
#: are tested by tests/test_dropin.py).
RECIPE_CONFIGS = [p for p in ALL_CONFIGS if _rel(p).split(osp.sep)[1] != 'dropin']
OVERLOCK_CONFIGS = [p for p in RECIPE_CONFIGS if '_overlock_' in osp.basename(p)]


def test_all_expected_configs_exist() -> None:
    assert sorted(EXPECTED) == sorted(_rel(p) for p in OVERLOCK_CONFIGS)


@pytest.mark.parametrize('path', RECIPE_CONFIGS, ids=_rel)
def test_config_builds_with_matching_widths(path: str) -> None:
    cfg = _load(path)
    assert cfg.custom_imports == dict(imports=['mmoverlock'], allow_failed_imports=False)
    check_model_config(cfg)
    model = build_model(cfg)
    widths = list(model.backbone.out_channels)
    if cfg.default_scope == 'mmdet':
        assert [c.conv.in_channels for c in model.neck.lateral_convs] == widths
    else:
        assert list(model.decode_head.in_channels) == widths
        assert model.auxiliary_head.in_index == 2
        assert model.auxiliary_head.in_channels == widths[2]
    if path in OVERLOCK_CONFIGS:
        assert widths == ARCH_WIDTHS[_arch(path)]
        if path.endswith('maskrcnn_overlock_xt_demo.py'):  # from scratch: no output norms
            assert not model.backbone.with_out_norms and not model.backbone.overview_fusion
        else:
            # detection form for COCO (the authors' COCO checkpoints), segmentation form for
            # ADE20K (their ADE20K checkpoints)
            assert model.backbone.with_out_norms
            assert model.backbone.overview_fusion is (cfg.default_scope == 'mmdet')


@pytest.mark.parametrize('path', [p for p in OVERLOCK_CONFIGS if 'demo' not in p], ids=_rel)
def test_recipe(path: str) -> None:
    cfg = _load(path, pretrained=True)
    arch = _arch(path)
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW' and tuple(optim.optimizer.betas) == (0.9, 0.999)
    assert optim.paramwise_cfg == dict(norm_decay_mult=0.0)
    assert cfg.sync_bn == 'torch'
    assert cfg.model.backbone.init_cfg == dict(
        type='Pretrained', checkpoint=f'checkpoints/overlock_{arch}_in1k_224.pth')
    warmup, main = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.by_epoch is False
    if cfg.default_scope == 'mmdet':
        three = path.endswith('_3x.py')
        assert cfg.model.backbone.drop_path_rate == DET_DROP_PATH[arch]
        assert optim.optimizer.lr == (1e-4 if three else 2e-4)
        assert optim.optimizer.weight_decay == 0.05
        assert warmup.end == 500
        assert cfg.train_cfg.max_epochs == (36 if three else 12)
        assert main.type == 'MultiStepLR' and main.milestones == ([27, 33] if three else [8, 11])
        assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
        steps = [t.type for t in cfg.train_dataloader.dataset.pipeline]
        if three:
            choice = cfg.train_dataloader.dataset.pipeline[3]
            assert choice.type == 'RandomChoice'
            scales = [s[0] for s in choice.transforms[0][0].scales]
            assert min(scales) == 480 and max(scales) == 800
            assert {s[1] for s in choice.transforms[0][0].scales} == {1333}
            assert choice.transforms[1][1].type == 'RandomCrop'
        else:
            assert 'RandomChoice' not in steps
    else:
        assert cfg.model.backbone.drop_path_rate == SEG_DROP_PATH[arch]
        assert optim.optimizer.lr == 6e-5 and optim.optimizer.weight_decay == 0.01
        assert warmup.end == 1500
        assert main.type == 'PolyLR' and main.power == 1.0 and main.end == 160000
        assert cfg.train_cfg.max_iters == 160000
        assert cfg.train_dataloader.batch_size == 2
        assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
        assert cfg.model.decode_head.num_classes == 150


def test_norms_get_no_weight_decay() -> None:
    from mmengine.optim import build_optim_wrapper
    cfg = _load(str(REPO / 'configs/detection/maskrcnn_overlock_xt_1x.py'))
    model = build_model(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups
             for p in g['params']}
    norm = model.backbone.blocks1[0].proj[0]   # channel LayerNorm
    bn = model.backbone.patch_embed1[1]        # BatchNorm
    conv = model.backbone.patch_embed1[0]
    assert decay[id(norm.weight)] == 0 and decay[id(bn.bias)] == 0
    assert decay[id(conv.weight)] == 0.05


def _det_inputs(size: int = 128) -> tuple:
    """One random image with one box / mask of class 3."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                         pad_shape=(size, size), scale_factor=(1.0, 1.0),
                                         batch_input_shape=(size, size)))
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 20:80, 30:90] = 1
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[30.0, 20.0, 90.0, 80.0]]),
                                       labels=torch.tensor([3]),
                                       masks=BitmapMasks(masks.numpy(), size, size))
    return torch.randn(1, 3, size, size), [sample]


def test_full_size_mask_rcnn_forward_and_loss() -> None:
    cfg = _load(str(REPO / 'configs/detection/maskrcnn_overlock_t_1x.py'))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    model.train()
    inputs, samples = _det_inputs()
    losses = model.loss(inputs, samples)
    assert {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.patch_embed1[0].weight.grad.abs().sum() > 0
    assert model.backbone.h_proj[0].weight.grad is not None


def test_full_size_upernet_forward_and_loss() -> None:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    cfg = _load(str(REPO / 'configs/segmentation/upernet_overlock_t_160k_ade20k.py'))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    model.train()
    size = 64
    sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                         pad_shape=(size, size)))
    sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, size, size)))
    inputs = torch.randn(2, 3, size, size)
    losses = model.loss(inputs, [sample, sample])
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(losses)
    total = losses['decode.loss_ce'] + losses['aux.loss_ce']
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.patch_embed1[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits = model(inputs, mode='tensor')
    assert logits.shape == (2, 150, size // 4, size // 4)
