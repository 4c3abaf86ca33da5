# mmdet's stock Faster R-CNN (COCO, 1x) with OverLoCK-XT: backbone, FPN input widths and optimiser
# (the authors' Mask R-CNN recipe: AdamW, lr 2e-4, wd 0.05) change. tests/test_dropin.py
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True, type='OverLoCK', arch='xt', drop_path_rate=0.1, out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_xt_in1k_224.pth')),
    neck=dict(in_channels=[56, 112, 340, 420]))
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0))
