# UperNet, GLNet-9G, ADE20K 512x512, 160k iterations (the recipe of OverLoCK-S, of similar
# size).
_base_ = ['./_base_/upernet_glnet.py', './_base_/ade20k-512x512_adamw_160k.py']

model = dict(
    backbone=dict(arch='9g', drop_path_rate=0.3,
                  init_cfg=dict(checkpoint='checkpoints/glnet_9g_in1k.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
# No weight decay on GLMix's per-block slot temperatures (scalars that decay would pull to 0).
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'slot_scale': dict(decay_mult=0.0)}))
