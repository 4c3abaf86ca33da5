# COCO instance segmentation, 1x schedule (12 epochs, lr steps at 8 and 11, 500-iteration linear
# warm-up: mmdet's schedule_1x as is) with the authors' optimiser: AdamW, lr 2e-4, betas
# (0.9, 0.999), weight decay 0.05 except on normalisation layers. Batch 16 = 8 GPUs x 2 images
# (coco_instance.py's batch_size=2 per GPU); scale lr linearly with --auto-scale-lr otherwise.
_base_ = [
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0))

# BatchNorm -> SyncBatchNorm when training distributed (mmengine applies it only then).
sync_bn = 'torch'
