# Demo: UperNet + GLNet-4G trained from scratch on CPU on the built-in shapes set: the data,
# pipeline and schedule of upernet_overlock_xt_demo.py with the backbone and optimiser settings of
# upernet_glnet_4g_160k_ade20k.py (no pretrained weights, no drop path).
_base_ = ['./upernet_overlock_xt_demo.py']

model = dict(
    backbone=dict(_delete_=True, type='GLNet', arch='4g', out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'slot_scale': dict(decay_mult=0.0)}))
