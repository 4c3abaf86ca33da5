# mmseg's stock Semantic FPN (ADE20K, 160k, 512x512) with OverLoCK-XT in its segmentation form:
# the FPN takes the backbone's widths (its head reads the FPN's 256-channel maps, unchanged);
# optimiser AdamW as PVT's Semantic FPN. tests/test_dropin.py
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    pretrained=None,  # the stock base's ResNet-50 weights
    backbone=dict(
        _delete_=True, type='OverLoCK', arch='xt', overview_fusion=False, drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_xt_in1k_224.pth')),
    neck=dict(in_channels=[56, 112, 340, 420]))
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4))
