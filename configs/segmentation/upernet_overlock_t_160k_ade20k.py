# UperNet, OverLoCK-T, ADE20K 512x512, 160k iterations.
_base_ = ['./_base_/upernet_overlock.py', './_base_/ade20k-512x512_adamw_160k.py']

model = dict(
    backbone=dict(arch='t', drop_path_rate=0.2,
                  init_cfg=dict(checkpoint='checkpoints/overlock_t_in1k_224.pth')),
    decode_head=dict(in_channels=[64, 128, 384, 640]),
    auxiliary_head=dict(in_channels=384))
