"""Training, testing, inference, checkpoint conversion and the demo, as used by ``tools/``.

Imported explicitly (``import mmoverlock.apis``): it needs mmdet or mmseg, the backbones do not.
"""
from .config import (
                     check_checkpoint_path,
                     check_data_paths,
                     check_model_config,
                     check_pretrained,
                     ensure_demo_data_for,
                     library_of,
                     load_config,
                     overlock_out_channels,
                     prepare_config,
)
from .convert import (
                     check_state_dict,
                     convert_checkpoint,
                     convert_file,
                     load_checkpoint_strict,
                     read_checkpoint,
)
from .demo import (
                     DEMO_PHOTO,
                     draw_predictions,
                     infer_photo,
                     run_demo,
                     run_demo_worker,
                     run_demos,
                     summarize_metrics,
)
from .errors import (
                     CheckpointMismatchError,
                     CheckpointNotFoundError,
                     ConfigMismatchError,
                     ConfigNotFoundError,
                     DataNotFoundError,
                     UsageError,
)
from .inference import (
                     build_inferencer,
                     check_device,
                     check_score_thr,
                     expand_images,
                     infer_images,
)
from .launch import (
                     build_model,
                     build_runner,
                     configure_run,
                     configure_training,
                     default_work_dir,
                     setup_distributed,
                     unwrap,
)
from .progress import (
                     STATUS_FILE,
                     ProgressDisplay,
                     ProgressFileHook,
                     follow,
                     format_status,
                     read_status,
                     write_status,
)

__all__ = [
    'DEMO_PHOTO', 'STATUS_FILE', 'ProgressDisplay', 'ProgressFileHook', 'build_inferencer',
    'check_device', 'check_score_thr', 'expand_images', 'follow', 'format_status', 'infer_images',
    'infer_photo', 'read_status', 'run_demo_worker', 'run_demos', 'write_status',
    'CheckpointMismatchError', 'CheckpointNotFoundError', 'ConfigMismatchError',
    'ConfigNotFoundError', 'DataNotFoundError', 'UsageError', 'build_model', 'build_runner',
    'check_checkpoint_path', 'check_data_paths', 'check_model_config', 'check_pretrained',
    'check_state_dict', 'configure_run', 'configure_training', 'convert_checkpoint',
    'convert_file', 'default_work_dir', 'draw_predictions', 'ensure_demo_data_for', 'library_of',
    'load_checkpoint_strict', 'load_config', 'overlock_out_channels', 'prepare_config',
    'read_checkpoint', 'run_demo', 'setup_distributed', 'summarize_metrics', 'unwrap',
]
