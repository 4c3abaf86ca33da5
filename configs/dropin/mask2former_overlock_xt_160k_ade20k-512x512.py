# mmseg's stock Mask2Former (ADE20K, 160k, 512x512) with OverLoCK-XT in its segmentation form: the
# head's pixel decoder reads the four maps; optimiser and schedule stay the stock ones.
# tests/test_dropin.py
_base_ = 'mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmdet.models', 'mmoverlock'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True, type='OverLoCK', arch='xt', overview_fusion=False, drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_xt_in1k_224.pth')),
    decode_head=dict(in_channels=[56, 112, 340, 420]))
