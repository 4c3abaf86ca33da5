# UperNet (mmseg's base model) with the segmentation form of OverLoCK (overview_fusion=False), the
# form of the authors' ADE20K checkpoints; auxiliary FCN head on the third output (stride 16).
# Each config sets the arch-specific values; these defaults are OverLoCK-T's.
_base_ = 'mmseg::_base_/models/upernet_swin.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(size=(512, 512)),
    backbone=dict(
        _delete_=True,
        type='OverLoCK',
        arch='t',
        overview_fusion=False,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        # ImageNet-1K weights of the authors; put the file there or override the path, e.g.
        # --cfg-options model.backbone.init_cfg.checkpoint=/path/to/overlock_t_in1k_224.pth
        # (or model.backbone.init_cfg=None to train from scratch).
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_t_in1k_224.pth')),
    decode_head=dict(in_channels=[64, 128, 384, 640], num_classes=150),
    auxiliary_head=dict(in_channels=384, in_index=2, num_classes=150))
