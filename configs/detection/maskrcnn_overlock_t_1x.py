# Mask R-CNN + FPN, OverLoCK-T, COCO, 1x schedule.
_base_ = ['./_base_/mask-rcnn_overlock_fpn.py', './_base_/coco-instance_adamw_1x.py']

model = dict(
    backbone=dict(arch='t', drop_path_rate=0.2,
                  init_cfg=dict(checkpoint='checkpoints/overlock_t_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 384, 640]))
