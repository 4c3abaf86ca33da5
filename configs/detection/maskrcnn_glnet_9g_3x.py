# Mask R-CNN + FPN, GLNet-9G, COCO, 3x schedule (the recipe of OverLoCK-S, of similar size).
_base_ = ['./_base_/mask-rcnn_glnet_fpn.py', './_base_/coco-instance_adamw_3x.py']

model = dict(
    backbone=dict(arch='9g', drop_path_rate=0.4,
                  init_cfg=dict(checkpoint='checkpoints/glnet_9g_in1k.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
# No weight decay on GLMix's per-block slot temperatures (scalars that decay would pull to 0).
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'slot_scale': dict(decay_mult=0.0)}))
