# UperNet (mmseg's base model) with a GLNet backbone (stage outputs at strides 4-32, each through
# its own output LayerNorm); auxiliary FCN head on the third output (stride 16). Each config sets
# the arch-specific values; these defaults are GLNet-4G's.
_base_ = 'mmseg::_base_/models/upernet_swin.py'
custom_imports = dict(imports=['mmoverlock'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(size=(512, 512)),
    backbone=dict(
        _delete_=True,
        type='GLNet',
        arch='4g',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        # ImageNet-1K weights of the authors (their file keeps them under 'model', for 16G under
        # 'model_ema'; head and final norm are ignored). Put the file there or override the path,
        # e.g. --cfg-options model.backbone.init_cfg.checkpoint=/path/to/glnet_4g.pth
        # (or model.backbone.init_cfg=None to train from scratch).
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/glnet_4g_in1k.pth')),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, in_index=2, num_classes=150))
