# mmdet's stock RetinaNet (COCO, 1x) with OverLoCK-XT returning the maps of strides 8-32, the ones
# RetinaNet's FPN reads (as mmdet's Swin RetinaNet); AdamW as mmdet's PVT RetinaNet.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True, type='OverLoCK', arch='xt', drop_path_rate=0.1, out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_xt_in1k_224.pth')),
    neck=dict(in_channels=[112, 340, 420], start_level=0))
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0))
