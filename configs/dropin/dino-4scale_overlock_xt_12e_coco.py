# mmdet's stock DINO (4 scales, COCO, 12 epochs) with OverLoCK-XT: the backbone returns the maps of
# strides 8, 16 and 32 as ResNet does there; the ChannelMapper takes their widths. The optimiser
# (AdamW, backbone lr x 0.1) stays the stock one. tests/test_dropin.py
_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True, type='OverLoCK', arch='xt', drop_path_rate=0.1, out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_xt_in1k_224.pth')),
    neck=dict(in_channels=[112, 340, 420]))
