# Cascade Mask R-CNN + FPN (mmdet's base model) with the detection form of OverLoCK. As in
# mask-rcnn_overlock_fpn.py, each config sets the arch-specific values; defaults are OverLoCK-T's.
_base_ = 'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='OverLoCK',
        arch='t',
        overview_fusion=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_t_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 384, 640]))
