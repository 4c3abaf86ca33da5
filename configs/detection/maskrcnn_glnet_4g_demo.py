# Demo: Mask R-CNN + GLNet-4G trained from scratch on CPU on the built-in shapes set: the data,
# pipeline and schedule of maskrcnn_overlock_xt_demo.py with the backbone and optimiser settings
# of maskrcnn_glnet_4g_1x.py (no pretrained weights, no drop path).
_base_ = ['./maskrcnn_overlock_xt_demo.py']

model = dict(
    backbone=dict(_delete_=True, type='GLNet', arch='4g', out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'slot_scale': dict(decay_mult=0.0)}))
