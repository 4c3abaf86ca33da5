# ADE20K at 512x512, 160k iterations, the authors' recipe: AdamW, lr 6e-5, betas (0.9, 0.999),
# weight decay 0.01 (none on normalisation layers), 1,500-iteration linear warm-up then poly decay
# (power 1.0) to 0. Batch 16 = 8 GPUs x 2 images.
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)

# BatchNorm -> SyncBatchNorm when training distributed (mmengine applies it only then).
sync_bn = 'torch'
