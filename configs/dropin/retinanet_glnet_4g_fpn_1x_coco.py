# mmdet's stock RetinaNet (COCO, 1x) with GLNet-4G returning the maps of strides 8-32, the ones
# RetinaNet's FPN reads; AdamW as mmdet's PVT RetinaNet, no decay on GLMix's slot temperatures.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True, type='GLNet', arch='4g', drop_path_rate=0.1, out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/glnet_4g_in1k.pth')),
    neck=dict(in_channels=[128, 256, 512], start_level=0))
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={'slot_scale': dict(decay_mult=0.0)}))
