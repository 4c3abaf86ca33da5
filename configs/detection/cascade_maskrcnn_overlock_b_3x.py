# Cascade Mask R-CNN + FPN, OverLoCK-B, COCO, 3x schedule.
_base_ = ['./_base_/cascade-mask-rcnn_overlock_fpn.py', './_base_/coco-instance_adamw_3x.py']

model = dict(
    backbone=dict(arch='b', drop_path_rate=0.6,
                  init_cfg=dict(checkpoint='checkpoints/overlock_b_in1k_224.pth')),
    neck=dict(in_channels=[80, 160, 528, 720]))
