# UperNet, OverLoCK-S, ADE20K 512x512, 160k iterations.
_base_ = ['./_base_/upernet_overlock.py', './_base_/ade20k-512x512_adamw_160k.py']

model = dict(
    backbone=dict(arch='s', drop_path_rate=0.3,
                  init_cfg=dict(checkpoint='checkpoints/overlock_s_in1k_224.pth')),
    decode_head=dict(in_channels=[64, 128, 448, 640]),
    auxiliary_head=dict(in_channels=448))
