# Demo: UperNet + OverLoCK-XT trained from scratch on CPU on the built-in shapes set (ADE20K
# layout, 128x128 images; `python tools/demo.py` generates it, or
# `python -c "from mmoverlock.datasets import generate_ade_shapes; generate_ade_shapes()"`).
# Lighter than the ADE20K recipe where CPU time matters: no pretrained weights, no drop path,
# narrower heads (128 / 64 channels), higher lr, a few hundred iterations.
_base_ = ['./upernet_overlock_xt_160k_ade20k.py']

data_root = 'data/demo/ade_shapes'
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[[120, 120, 120], [220, 60, 50], [60, 190, 70], [60, 90, 220]])
crop_size = (128, 128)
max_iters = 200

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(channels=128, num_classes=4),
    auxiliary_head=dict(channels=64, num_classes=4))

dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
# As mmseg's ADE20K test pipeline (Resize to scale (2048, 512), keep_ratio), scaled to the demo's
# 128-pixel training size: the 128x128 demo images stay as they are, a photograph is run at a
# short side of 128 (a 6000x4000 one at 192x128 instead of its full size), and the predicted map
# is still returned at the image's own size (mmseg resizes the logits to ori_shape).
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training',
                                  seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation',
                                  seg_map_path='annotations/validation')))
test_dataloader = val_dataloader

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=30, end=max_iters, by_epoch=False),
]
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
randomness = dict(seed=0)
