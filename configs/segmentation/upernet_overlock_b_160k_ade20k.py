# UperNet, OverLoCK-B, ADE20K 512x512, 160k iterations.
_base_ = ['./_base_/upernet_overlock.py', './_base_/ade20k-512x512_adamw_160k.py']

model = dict(
    backbone=dict(arch='b', drop_path_rate=0.5,
                  init_cfg=dict(checkpoint='checkpoints/overlock_b_in1k_224.pth')),
    decode_head=dict(in_channels=[80, 160, 528, 720]),
    auxiliary_head=dict(in_channels=528))
