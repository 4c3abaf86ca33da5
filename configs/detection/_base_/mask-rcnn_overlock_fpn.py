# Mask R-CNN + FPN (mmdet's base model) with the detection form of OverLoCK (overview_fusion=True),
# the form of the authors' COCO checkpoints. The arch-specific values (arch, drop path, ImageNet
# weights, FPN input widths) are set by each config; these defaults are OverLoCK-T's.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='OverLoCK',
        arch='t',
        overview_fusion=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        # ImageNet-1K weights of the authors; put the file there or override the path, e.g.
        # --cfg-options model.backbone.init_cfg.checkpoint=/path/to/overlock_t_in1k_224.pth
        # (or model.backbone.init_cfg=None to train from scratch).
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/overlock_t_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 384, 640]))
