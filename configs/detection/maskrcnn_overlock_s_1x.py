# Mask R-CNN + FPN, OverLoCK-S, COCO, 1x schedule.
_base_ = ['./_base_/mask-rcnn_overlock_fpn.py', './_base_/coco-instance_adamw_1x.py']

model = dict(
    backbone=dict(arch='s', drop_path_rate=0.4,
                  init_cfg=dict(checkpoint='checkpoints/overlock_s_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 448, 640]))
