"""Stock mmdet / mmseg detectors and segmentors with OverLoCK or GLNet dropped in (issue 13.5).

Each config of configs/dropin/ inherits a stock OpenMMLab config and changes only the backbone, the
widths that read it and (for some) the optimiser. Here each one, shrunk for a CPU test (a narrow
custom arch, 32-channel heads, one transformer layer with a narrow FFN, few queries, the built-in
64-pixel data and its classes), trains 2 iterations through tools/train.py, must change its
weights with finite losses, and then predicts on an image through mmdet's / mmseg's inference API.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_ARCH, TINY_OUT, TINY_SIZE, load_tool
from mmengine.config import Config

from mmoverlock.apis import build_model, check_model_config
from mmoverlock.datasets import DEMO_CLASSES, DEMO_SEG_CLASSES

pytestmark = pytest.mark.usefixtures('single_thread', 'plain_config_text')

DROPIN = REPO / 'configs' / 'dropin'
#: A GLNet of the released structure (overlapping stem, GLMix stages, attention last), narrow.
TINY_GLNET = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], mlp_ratios=2,
                  mixing_modes=['glmix', 'glmix', 'glmix.mha_nchw', 'mha_nchw'])
WIDTH = 32  # of the necks, heads and transformer layers
SCALE = (TINY_SIZE, TINY_SIZE)


@pytest.fixture
def plain_config_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config text without yapf's formatting (same content, still valid Python): mmengine formats
    the whole config five times per run (log, work-dir copy, checkpoint meta), about half of
    these tests' time otherwise."""
    monkeypatch.setattr('mmengine.config.config.FormatCode', lambda text, **_: (text, False))


# ------------------------------------------------------------------------------------------------
# Shrinking a stock config for the test: size and data only
# ------------------------------------------------------------------------------------------------
def _tiny_backbone(cfg: Config) -> list[int]:
    """Narrow custom arch, no ImageNet weights; returns the widths of the maps it returns."""
    backbone = cfg.model.backbone
    widths = TINY_OUT if backbone.type == 'OverLoCK' else TINY_GLNET['embed_dim']
    backbone.arch = TINY_ARCH if backbone.type == 'OverLoCK' else TINY_GLNET
    backbone.init_cfg = None
    return [widths[i] for i in backbone.out_indices]


def _loader(dataset: dict, batch_size: int, infinite: bool = False) -> dict:
    return dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                sampler=dict(type='InfiniteSampler' if infinite else 'DefaultSampler',
                             shuffle=False),
                dataset=dataset)


def _coco_data(cfg: Config, root: str) -> None:
    """The built-in COCO-format shapes at 64 pixels, one epoch of 2 batches of 4, no validation."""
    ann = f'{root}/annotations/instances_%s.json'
    base = dict(type='CocoDataset', data_root=f'{root}/', metainfo=dict(classes=DEMO_CLASSES))
    train = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
             dict(type='Resize', scale=SCALE, keep_ratio=True), dict(type='PackDetInputs')]
    test = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=SCALE, keep_ratio=True),
            dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                                  'img_shape', 'scale_factor'))]
    cfg.train_dataloader = _loader(dict(base, ann_file=ann % 'train', data_prefix=dict(
        img='train/'), filter_cfg=dict(filter_empty_gt=True), pipeline=train), batch_size=4)
    cfg.test_dataloader = _loader(dict(base, ann_file=ann % 'val', data_prefix=dict(img='val/'),
                                       test_mode=True, pipeline=test), batch_size=1)
    cfg.test_evaluator = dict(type='CocoMetric', ann_file=ann % 'val', metric='bbox')
    cfg.test_pipeline = test
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.train_cfg.max_epochs = 1  # 8 images in batches of 4: 2 iterations
    cfg.default_hooks.logger.interval = 1


def _ade_data(cfg: Config, root: str) -> None:
    """The built-in ADE20K-layout shapes at 64 pixels, 2 iterations of 2 images, no validation."""
    base = dict(type='BaseSegDataset', data_root=root, img_suffix='.jpg', seg_map_suffix='.png',
                reduce_zero_label=True, metainfo=dict(classes=DEMO_SEG_CLASSES))
    train = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
             dict(type='PackSegInputs')]
    test = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='PackSegInputs')]
    cfg.train_dataloader = _loader(dict(base, data_prefix=dict(
        img_path='images/training', seg_map_path='annotations/training'), pipeline=train),
        batch_size=2, infinite=True)
    cfg.test_dataloader = _loader(dict(base, data_prefix=dict(
        img_path='images/validation', seg_map_path='annotations/validation'), pipeline=test),
        batch_size=1)
    cfg.test_pipeline = test
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.model.data_preprocessor.size = SCALE
    cfg.train_cfg.max_iters = 2
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 2


def _transformer_layer(heads: int = 4) -> dict:
    """Overrides of one (deformable) transformer layer of mmdet: attention + FFN at WIDTH."""
    return dict(self_attn_cfg=dict(embed_dims=WIDTH, num_heads=heads),
                ffn_cfg=dict(embed_dims=WIDTH, feedforward_channels=2 * WIDTH))


def _retinanet(cfg: Config, widths: list[int]) -> None:
    cfg.merge_from_dict({
        'model.neck.in_channels': widths, 'model.neck.out_channels': WIDTH,
        'model.bbox_head.in_channels': WIDTH, 'model.bbox_head.feat_channels': WIDTH,
        'model.bbox_head.stacked_convs': 1, 'model.bbox_head.num_classes': len(DEMO_CLASSES),
        # untrained, every score is near the focal loss's prior 0.01: keep them all to look at
        'model.test_cfg.score_thr': 0.0})


def _faster_rcnn(cfg: Config, widths: list[int]) -> None:
    cfg.merge_from_dict({
        'model.neck.in_channels': widths, 'model.neck.out_channels': WIDTH,
        'model.rpn_head.in_channels': WIDTH, 'model.rpn_head.feat_channels': WIDTH,
        'model.roi_head.bbox_roi_extractor.out_channels': WIDTH,
        'model.roi_head.bbox_head.in_channels': WIDTH,
        'model.roi_head.bbox_head.fc_out_channels': 2 * WIDTH,
        'model.roi_head.bbox_head.num_classes': len(DEMO_CLASSES),
        'model.test_cfg.rcnn.score_thr': 0.0})


def _dino(cfg: Config, widths: list[int]) -> None:
    # The widths of DINO's transformer stay 256: its decoder encodes the reference points with
    # mmdet's fixed 128 sine features per coordinate. One layer each, narrow FFNs, few queries.
    ffn = dict(ffn_cfg=dict(feedforward_channels=WIDTH))
    cfg.merge_from_dict({
        'model.num_queries': 20,
        'model.neck.in_channels': widths,
        'model.encoder.num_layers': 1, 'model.encoder.layer_cfg': ffn,
        'model.decoder.num_layers': 1, 'model.decoder.layer_cfg': ffn,
        'model.bbox_head.num_classes': len(DEMO_CLASSES),
        'model.dn_cfg.group_cfg.num_dn_queries': 10,
        'model.test_cfg.max_per_img': 20})


def _mask2former(cfg: Config, widths: list[int]) -> None:
    num_classes = len(DEMO_SEG_CLASSES)
    layer = _transformer_layer()
    head = 'model.decode_head.'
    cfg.merge_from_dict({
        head + 'in_channels': widths, head + 'feat_channels': WIDTH, head + 'out_channels': WIDTH,
        head + 'num_queries': 10, head + 'num_classes': num_classes,
        head + 'pixel_decoder.encoder.num_layers': 1,
        head + 'pixel_decoder.encoder.layer_cfg': layer,
        head + 'pixel_decoder.positional_encoding.num_feats': WIDTH // 2,
        head + 'positional_encoding.num_feats': WIDTH // 2,
        head + 'transformer_decoder.num_layers': 1,
        head + 'transformer_decoder.layer_cfg': dict(
            layer, cross_attn_cfg=dict(embed_dims=WIDTH, num_heads=4)),
        head + 'loss_cls.class_weight': [1.0] * num_classes + [0.1],
        head + 'train_cfg.num_points': 1024})


def _semantic_fpn(cfg: Config, widths: list[int]) -> None:
    cfg.merge_from_dict({
        'model.neck.in_channels': widths, 'model.neck.out_channels': WIDTH,
        'model.decode_head.in_channels': [WIDTH] * 4, 'model.decode_head.channels': WIDTH // 2,
        'model.decode_head.num_classes': len(DEMO_SEG_CLASSES)})


#: config of configs/dropin/, stock base it inherits, shrinking function.
DROPINS = {
    'retinanet_overlock_xt_fpn_1x_coco.py':
        ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', _retinanet),
    'faster-rcnn_overlock_xt_fpn_1x_coco.py':
        ('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', _faster_rcnn),
    'dino-4scale_overlock_xt_12e_coco.py':
        ('mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', _dino),
    'retinanet_glnet_4g_fpn_1x_coco.py':
        ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', _retinanet),
    'mask2former_overlock_xt_160k_ade20k-512x512.py':
        ('mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py', _mask2former),
    'fpn_overlock_xt_160k_ade20k-512x512.py':
        ('mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py', _semantic_fpn),
}


def _tiny_config(name: str, tmp_path: Path, data_root: str) -> tuple[str, Config]:
    """configs/dropin/``name`` shrunk for the test, written to ``tmp_path``; (path, config)."""
    cfg = Config.fromfile(str(DROPIN / name))
    DROPINS[name][1](cfg, _tiny_backbone(cfg))
    (_coco_data if cfg.default_scope == 'mmdet' else _ade_data)(cfg, data_root)
    cfg.randomness = dict(seed=0)
    path = tmp_path / f'tiny_{name}'
    cfg.dump(str(path))
    return str(path), Config.fromfile(str(path))


def _losses(work_dir: Path) -> list[dict]:
    """The logged training records (one per iteration: loss terms, lr, ...)."""
    records = []
    for path in sorted(work_dir.glob('*/vis_data/scalars.json')):
        records += [r for r in map(json.loads, path.read_text().splitlines()) if 'loss' in r]
    return records


def _train(config: str, cfg: Config, work_dir: Path) -> tuple[dict, dict, str, set]:
    """Train 2 iterations with tools/train.py from known initial weights.

    Returns (initial state, trained state, trained checkpoint path, parameter names).
    """
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    params = {name for name, _ in model.named_parameters()}
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    start = work_dir.parent / 'initial.pth'
    torch.save({'state_dict': initial}, start)
    load_tool('train').main([config, '--work-dir', str(work_dir),
                             '--cfg-options', f'load_from={start}'])
    checkpoint = (work_dir / 'last_checkpoint').read_text().strip()
    trained = torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']
    return initial, trained, checkpoint, params


def _unreturned_norms(cfg: Config) -> set[str]:
    """Parameters of OverLoCK's output norms of maps that ``out_indices`` leaves out.

    The backbone keeps them (the authors' checkpoints hold them) frozen and unused (DINO's
    out_indices=(1, 2, 3): ``extra_norm.0``). ``extra_norm.1`` always runs: it feeds stage 3.
    """
    backbone = cfg.model.backbone
    if backbone.type != 'OverLoCK':
        return set()
    return {f'backbone.extra_norm.{i}.{p}' for i in (0, 2, 3) if i not in backbone.out_indices
            for p in ('weight', 'bias')}


def _check_training(cfg: Config, work_dir: Path, initial: dict, trained: dict,
                    params: set) -> None:
    records = _losses(work_dir)
    assert [r['iter'] for r in records] == [1, 2]
    for record in records:
        terms = {k: v for k, v in record.items() if k.startswith('loss')}
        assert terms and all(math.isfinite(v) for v in terms.values()), record
    assert set(trained) == set(initial)
    changed = {k for k in params if not torch.equal(initial[k], trained[k])}
    backbone = {k for k in params if k.startswith('backbone.')}
    unused = _unreturned_norms(cfg)
    # every other backbone parameter is used by the forward pass, so each one took a step
    assert backbone and backbone - unused <= changed, sorted(backbone - unused - changed)[:5]
    assert not unused & changed
    assert changed - backbone, 'no neck / head parameter changed'


def _check_boxes(result, num_classes: int, max_boxes: int) -> None:
    pred = result.pred_instances
    n = len(pred)
    assert 0 < n <= max_boxes
    assert pred.bboxes.shape == (n, 4) and pred.bboxes.dtype == torch.float32
    assert pred.scores.shape == (n,) and bool(((pred.scores >= 0) & (pred.scores <= 1)).all())
    assert pred.labels.shape == (n,) and pred.labels.dtype == torch.int64
    assert bool(((pred.labels >= 0) & (pred.labels < num_classes)).all())
    boxes = pred.bboxes
    assert bool((boxes[:, 2:] >= boxes[:, :2]).all())  # x2 >= x1, y2 >= y1
    assert bool(((boxes >= 0) & (boxes <= TINY_SIZE)).all())  # inside the 64 x 64 image
    assert torch.isfinite(pred.scores).all()


def _check_seg_map(result, num_classes: int) -> None:
    seg = result.pred_sem_seg.data
    assert seg.shape == (1, TINY_SIZE, TINY_SIZE)
    assert seg.dtype == torch.int64
    assert bool(((seg >= 0) & (seg < num_classes)).all())
    logits = result.seg_logits.data
    assert logits.shape == (num_classes, TINY_SIZE, TINY_SIZE) and torch.isfinite(logits).all()
    assert torch.equal(seg[0], logits.argmax(0))


# ------------------------------------------------------------------------------------------------
# The configs themselves
# ------------------------------------------------------------------------------------------------
def test_every_dropin_config_is_listed() -> None:
    assert sorted(p.name for p in DROPIN.glob('*.py')) == sorted(DROPINS)


@pytest.mark.parametrize('name', sorted(DROPINS))
def test_dropin_config_inherits_the_stock_one(name: str) -> None:
    """Short, user-facing: the stock base, mmoverlock imported, the backbone replaced."""
    text = (DROPIN / name).read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith('#')]
    assert len(lines) <= 15
    assert f"_base_ = '{DROPINS[name][0]}'" in text
    cfg = Config.fromfile(str(DROPIN / name))
    assert 'mmoverlock' in cfg.custom_imports['imports']
    assert cfg.model.backbone.type in ('OverLoCK', 'GLNet')
    assert 'depth' not in cfg.model.backbone  # the stock ResNet's settings were deleted
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'


@pytest.mark.parametrize('name', sorted(DROPINS))
def test_dropin_config_builds_and_runs_at_full_width(name: str) -> None:
    """The config as a user runs it (XT / 4G widths, stock heads) passes the tools' check and its
    modules take the backbone's maps (random weights, one 64-pixel image)."""
    cfg = Config.fromfile(str(DROPIN / name))
    cfg.model.backbone.init_cfg = None
    check_model_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        feats = model.extract_feat(x)
        if cfg.default_scope == 'mmdet':  # backbone + neck: 256 channels at each level
            assert all(f.shape[:2] == (1, 256) for f in feats)
        else:  # the decode head reads the backbone (Mask2Former) or the FPN's maps
            meta = dict(img_shape=(TINY_SIZE, TINY_SIZE), pad_shape=(TINY_SIZE, TINY_SIZE))
            logits = model.decode_head.predict(feats, [meta], model.test_cfg)
            assert logits.shape == (1, 150, TINY_SIZE, TINY_SIZE)


@pytest.mark.parametrize('out_indices', [(1, 2, 3), (2, 3), (3,), (0, 1, 2, 3)])
@pytest.mark.parametrize('overview_fusion', [True, False])
def test_every_trainable_backbone_parameter_gets_a_gradient(out_indices: tuple,
                                                            overview_fusion: bool) -> None:
    """What DDP needs (find_unused_parameters=False, mmengine's default) when the last map is
    returned (without it the last stage runs for nothing, as in mmdet's ResNet): the output norms
    of maps not returned are frozen, every other parameter is used."""
    from mmoverlock.models.backbones.overlock import OverLoCK
    torch.manual_seed(0)
    model = OverLoCK(TINY_ARCH, out_indices=out_indices, overview_fusion=overview_fusion)
    sum(o.mean() for o in model(torch.randn(1, 3, TINY_SIZE, TINY_SIZE))).backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f'extra_norm.{i}.{p}' for i in (0, 2) if i not in out_indices
                      for p in ('weight', 'bias')}
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# ------------------------------------------------------------------------------------------------
# Train 2 iterations, then predict
# ------------------------------------------------------------------------------------------------
DET = [n for n in sorted(DROPINS) if n.endswith('_coco.py')]
SEG = [n for n in sorted(DROPINS) if 'ade20k' in n]


@pytest.mark.parametrize('name', DET)
def test_detector_trains_and_predicts(name: str, tmp_path: Path, coco_root: str) -> None:
    from mmdet.apis import inference_detector, init_detector
    config, cfg = _tiny_config(name, tmp_path, coco_root)
    work = tmp_path / 'work'
    initial, trained, checkpoint, params = _train(config, cfg, work)
    _check_training(cfg, work, initial, trained, params)

    model = init_detector(config, checkpoint, device='cpu')
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    image = sorted(Path(coco_root, 'val').glob('*.jpg'))[0]
    result = inference_detector(model, str(image))
    test_cfg = cfg.model.test_cfg
    max_boxes = (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).max_per_img
    _check_boxes(result, len(DEMO_CLASSES), max_boxes)
    assert tuple(result.ori_shape) == SCALE


@pytest.mark.parametrize('name', SEG)
def test_segmentor_trains_and_predicts(name: str, tmp_path: Path, ade_root: str) -> None:
    from mmseg.apis import inference_model, init_model
    config, cfg = _tiny_config(name, tmp_path, ade_root)
    work = tmp_path / 'work'
    initial, trained, checkpoint, params = _train(config, cfg, work)
    _check_training(cfg, work, initial, trained, params)

    model = init_model(config, checkpoint, device='cpu')
    image = sorted(Path(ade_root, 'images', 'validation').glob('*.jpg'))[0]
    _check_seg_map(inference_model(model, str(image)), len(DEMO_SEG_CLASSES))
