"""Helpers shared by the detection / segmentation tests (issue 4): tiny configs, tool loading.

The tiny configs are the demo configs with a custom OverLoCK arch of one block per stage, narrow
heads and 64-pixel images, so a training iteration takes a fraction of a second on one core.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

from mmengine.config import Config

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
DET_DEMO = REPO / 'configs' / 'detection' / 'maskrcnn_overlock_xt_demo.py'
SEG_DEMO = REPO / 'configs' / 'segmentation' / 'upernet_overlock_xt_demo.py'
ALL_CONFIGS = sorted(glob.glob(str(REPO / 'configs' / '*' / '*.py')))

#: One block per stage, narrow: out_channels [16, 32, 64 + 24, 96 + 24].
TINY_ARCH = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96],
                 kernel_size=[7, 5, 5, 5], sub_num_heads=[1, 1], mlp_ratio=[2, 2, 2, 2],
                 sub_mlp_ratio=[2, 2])
TINY_OUT = [16, 32, 88, 120]
TINY_SIZE = 64
WIDTH = 32


def _load_script(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module (its ``main(argv)`` is then callable in-process)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return _load_script(TOOLS / f'{name}.py', f'mmoverlock_tool_{name}')


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (``main(argv)`` callable in-process)."""
    return _load_script(REPO / 'benchmarks' / f'{name}.py', f'mmoverlock_benchmarks_{name}')


def _runtime(max_iters: int) -> dict:
    return {'train_cfg.max_iters': max_iters, 'train_cfg.val_interval': max_iters,
            'default_hooks.checkpoint.interval': max_iters, 'default_hooks.logger.interval': 1,
            'randomness.seed': 0}


def tiny_det_options(data_root: str, max_iters: int = 2) -> dict:
    """``merge_from_dict`` options turning the detection demo config into the tiny one (with
    ``model.backbone.arch = TINY_ARCH``)."""
    scale = (TINY_SIZE, TINY_SIZE)
    ann = f'{data_root}/annotations/instances_val.json'
    options = {
        'model.neck.in_channels': TINY_OUT,
        'model.neck.out_channels': WIDTH,
        'model.rpn_head.in_channels': WIDTH, 'model.rpn_head.feat_channels': WIDTH,
        'model.roi_head.bbox_roi_extractor.out_channels': WIDTH,
        'model.roi_head.bbox_head.in_channels': WIDTH,
        'model.roi_head.bbox_head.conv_out_channels': WIDTH,
        'model.roi_head.bbox_head.fc_out_channels': 2 * WIDTH,
        'model.roi_head.mask_roi_extractor.out_channels': WIDTH,
        'model.roi_head.mask_head.in_channels': WIDTH,
        'model.roi_head.mask_head.conv_out_channels': WIDTH,
        'model.roi_head.mask_head.num_convs': 1,
        'train_dataloader.dataset.pipeline.2.scale': scale,
        'val_dataloader.dataset.pipeline.1.scale': scale,
        'test_dataloader.dataset.pipeline.1.scale': scale,
        'val_evaluator.ann_file': ann, 'test_evaluator.ann_file': ann,
    }
    for split in ('train', 'val', 'test'):
        options[f'{split}_dataloader.dataset.data_root'] = f'{data_root}/'
    options.update(_runtime(max_iters))
    return options


def tiny_seg_options(data_root: str, max_iters: int = 2) -> dict:
    """``merge_from_dict`` options turning the segmentation demo config into the tiny one (with
    ``model.backbone.arch = TINY_ARCH``)."""
    options = {
        'model.data_preprocessor.size': (TINY_SIZE, TINY_SIZE),
        'model.decode_head.in_channels': TINY_OUT, 'model.decode_head.channels': WIDTH // 2,
        'model.auxiliary_head.in_channels': TINY_OUT[2],
        'model.auxiliary_head.channels': WIDTH // 2,
    }
    for split in ('train', 'val', 'test'):
        options[f'{split}_dataloader.dataset.data_root'] = data_root
    options.update(_runtime(max_iters))
    return options


def write_tiny_config(directory: Path, task: str, data_root: str, max_iters: int = 2,
                      extra: Optional[dict] = None) -> str:
    """Write the tiny ``task`` ('det' / 'seg') config as a stand-alone file; return its path."""
    base, options = ((DET_DEMO, tiny_det_options(data_root, max_iters)) if task == 'det'
                     else (SEG_DEMO, tiny_seg_options(data_root, max_iters)))
    cfg = Config.fromfile(str(base))
    cfg.model.backbone.arch = TINY_ARCH  # a dict replacing a name: not mergeable
    cfg.merge_from_dict({**options, **(extra or {})})
    path = directory / f'tiny_{task}.py'
    cfg.dump(str(path))
    return str(path)


def write_tiny_arch_config(directory: Path, config: str) -> str:
    """``config`` (a path under configs/) with the tiny backbone arch and no pretrained weights,
    everything else as it is; written to ``directory``. Returns its path."""
    cfg = Config.fromfile(str(REPO / config))
    cfg.model.backbone.arch = TINY_ARCH
    cfg.model.backbone.init_cfg = None
    if 'neck' in cfg.model:
        cfg.model.neck.in_channels = TINY_OUT
    else:
        cfg.model.decode_head.in_channels = TINY_OUT
        cfg.model.auxiliary_head.in_channels = TINY_OUT[2]
    path = directory / f'tiny_arch_{Path(config).name}'
    cfg.dump(str(path))
    return str(path)


def find_log(work_dir: str) -> str:
    """Text of the (single) mmengine log file of a run in ``work_dir``."""
    logs = sorted(Path(work_dir).glob('*/*.log'))
    assert logs, f'no log file under {work_dir}'
    return logs[-1].read_text()


def train_iterations(work_dir: str) -> list[int]:
    """Iterations logged as training steps (from mmengine's ``vis_data/scalars.json``)."""
    iters = []
    for path in sorted(Path(work_dir).glob('*/vis_data/scalars.json')):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record:
                iters.append(record['iter'])
    return iters


def cli_error(tool: str, argv: list[str], capsys) -> str:
    """Run ``tools/<tool>.py`` in-process; it must exit with status 2 and print exactly one
    ``error:`` line and no traceback. Returns that line."""
    import pytest
    module = load_tool(tool)
    from _cli import run_main
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: module.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]
