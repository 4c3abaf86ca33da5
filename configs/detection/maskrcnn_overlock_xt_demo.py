# Demo: Mask R-CNN + OverLoCK-XT trained from scratch on CPU on the built-in shapes set (COCO
# format, 128x128 images; `python tools/demo.py` generates it, or
# `python -c "from mmoverlock.datasets import generate_coco_shapes; generate_coco_shapes()"`).
# Lighter than the COCO recipe where CPU time matters: no ImageNet weights, no drop path,
# 128-channel FPN and heads with GroupNorm (mmdet's recipe for training from scratch), fewer
# proposals and RoI samples (half of them positive), batch 2, 300 iterations with linear decay.
# The backbone is built without its output LayerNorms (with_out_norms=False, hence no overview
# fusion): with them, none of the settings tried here got the RoI heads to learn in 300 iterations
# (box AP50 <= 0.11, from scratch or from the segmentation demo's backbone, with or without
# GroupNorm heads); without them box AP50 reaches 1.0. The COCO configs keep them, as the authors'
# checkpoints have them.
_base_ = ['./maskrcnn_overlock_xt_1x.py']

data_root = 'data/demo/coco_shapes/'
metainfo = dict(classes=('circle', 'square', 'triangle'),
                palette=[(220, 60, 50), (60, 190, 70), (60, 90, 220)])
img_scale = (128, 128)
max_iters = 300

width = 128
# As mmdet's recipe for training from scratch (configs/scratch): GroupNorm in the FPN and the
# RoI heads, whose convolutions otherwise grow out of scale under AdamW.
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(drop_path_rate=0.0, with_out_norms=False, init_cfg=None),
    neck=dict(out_channels=width, norm_cfg=norm_cfg),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', in_channels=width, conv_out_channels=width,
                       fc_out_channels=2 * width, norm_cfg=norm_cfg, num_classes=3),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width, norm_cfg=norm_cfg,
                       num_classes=3)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=200),
                   rcnn=dict(sampler=dict(num=64, pos_fraction=0.5))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100), rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
# As mmdet's COCO test pipeline (Resize to scale (1333, 800), keep_ratio) at the demo's training
# scale: a photograph of any size is run with its long side at 128; boxes and masks come back at
# the image's own size (mmdet rescales them to ori_shape).
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=50, end=max_iters, by_epoch=False),
]
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False)
randomness = dict(seed=0)
