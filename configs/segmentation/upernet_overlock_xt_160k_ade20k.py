# UperNet, OverLoCK-XT, ADE20K 512x512, 160k iterations.
# drop path 0.1: our choice for the smallest model; the authors publish T 0.2 / S 0.3 / B 0.5.
_base_ = ['./_base_/upernet_overlock.py', './_base_/ade20k-512x512_adamw_160k.py']

model = dict(
    backbone=dict(arch='xt', drop_path_rate=0.1,
                  init_cfg=dict(checkpoint='checkpoints/overlock_xt_in1k_224.pth')),
    decode_head=dict(in_channels=[56, 112, 340, 420]),
    auxiliary_head=dict(in_channels=340))
