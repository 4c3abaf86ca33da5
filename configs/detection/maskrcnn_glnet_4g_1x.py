# Mask R-CNN + FPN, GLNet-4G, COCO, 1x schedule (the recipe of OverLoCK-T, of similar size).
_base_ = ['./_base_/mask-rcnn_glnet_fpn.py', './_base_/coco-instance_adamw_1x.py']

model = dict(
    backbone=dict(arch='4g', drop_path_rate=0.2,
                  init_cfg=dict(checkpoint='checkpoints/glnet_4g_in1k.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
# No weight decay on GLMix's per-block slot temperatures (scalars that decay would pull to 0).
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'slot_scale': dict(decay_mult=0.0)}))
