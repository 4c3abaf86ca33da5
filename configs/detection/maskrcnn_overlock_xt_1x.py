# Mask R-CNN + FPN, OverLoCK-XT, COCO, 1x schedule.
# drop path 0.1: our choice for the smallest model; the authors publish T 0.2 / S 0.4 / B 0.6.
_base_ = ['./_base_/mask-rcnn_overlock_fpn.py', './_base_/coco-instance_adamw_1x.py']

model = dict(
    backbone=dict(arch='xt', drop_path_rate=0.1,
                  init_cfg=dict(checkpoint='checkpoints/overlock_xt_in1k_224.pth')),
    neck=dict(in_channels=[56, 112, 340, 420]))
