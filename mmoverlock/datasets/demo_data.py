"""Generators of two tiny data sets for the demo and the tests: coloured shapes on textures.

* :func:`generate_coco_shapes` writes an instance-segmentation set in COCO layout
  (``annotations/instances_{train,val}.json`` with polygon masks, images under ``train/`` and
  ``val/``), read by mmdet's ``CocoDataset``.
* :func:`generate_ade_shapes` writes a semantic-segmentation set in ADE20K layout
  (``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``, label 0
  meaning "ignore", so ``reduce_zero_label=True`` as for ADE20K), read by mmseg's
  ``BaseSegDataset``.

Each image holds one to four non-overlapping shapes (circle, square, triangle, each class with its
own hue family, jittered) on a textured background (low-frequency colour noise, faint stripes and
pixel noise). Everything is deterministic: image ``i`` of split ``s`` is drawn from the random
generator seeded with ``(seed, s, i)``, so the same arguments always write the same files.
"""
from __future__ import annotations

import json
import math
import os.path as osp
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
from mmengine.logging import print_log

#: Instance classes of the detection set (category ids 1, 2, 3 in the COCO file).
DEMO_CLASSES = ('circle', 'square', 'triangle')
#: Semantic classes of the segmentation set (label values 1..4 in the PNGs; 0 is "ignore").
DEMO_SEG_CLASSES = ('background',) + DEMO_CLASSES
#: Default locations, relative to the working directory (the repository root); the demo configs
#: point there.
DEMO_COCO_ROOT = 'data/demo/coco_shapes'
DEMO_SEG_ROOT = 'data/demo/ade_shapes'
#: Palette for visualisation, RGB, one colour per class of :data:`DEMO_SEG_CLASSES`.
DEMO_PALETTE = [(120, 120, 120), (220, 60, 50), (60, 190, 70), (60, 90, 220)]

_BASE_COLOURS = np.array([(215, 55, 45), (55, 185, 65), (55, 85, 215)], dtype=np.float64)
_SPLITS = {'train': 0, 'val': 1}
_SHIFT = 4  # sub-pixel bits for cv2.fillPoly
_MARKER = 'demo_data.json'
_VERSION = 2  # of the drawing code: a data set of another version is rewritten

PathLike = Union[str, Path]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random background of shape (size, size, 3), float RGB in [0, 255].

    Mostly brightness variation (low-frequency noise, faint stripes) on a weakly tinted grey, so
    that the shapes' hues stand out while the texture still has to be ignored.
    """
    base = rng.uniform(80, 170) + rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0, 1, size=(6, 6, 4)).astype(np.float32)
    noise = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    brightness = 25 * noise[..., :1] + 6 * noise[..., 1:]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 18)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    img = base + brightness + (rng.uniform(6, 16) * stripes)[..., None]
    return img + rng.normal(0, 4, size=img.shape)


def _polygon(rng: np.random.Generator, label: int, cx: float, cy: float,
             radius: float) -> np.ndarray:
    """Vertices (N, 2) of a circle (label 0), square (1) or triangle (2) around (cx, cy)."""
    if label == 0:
        n, phase = 32, 0.0
    else:
        n, phase = (4, 3)[label - 1], rng.uniform(0, 2 * math.pi)
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def render_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4
                 ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], np.ndarray]:
    """Draw one image.

    Returns:
        ``(image, objects, label_map)``: the RGB uint8 image, a list of ``(class index, polygon
        (N, 2) float array in pixels)``, and the uint8 semantic map (1 background, 2 + class).
    """
    img = _texture(rng, size)
    label_map = np.ones((size, size), np.uint8)
    objects: list[tuple[int, np.ndarray]] = []
    boxes: list[tuple[float, float, float, float]] = []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(50):
        if len(objects) == wanted:
            break
        label = int(rng.integers(len(DEMO_CLASSES)))
        radius = rng.uniform(0.1, 0.22) * size
        cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
        box = (cx - radius - 2, cy - radius - 2, cx + radius + 2, cy + radius + 2)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
               for b in boxes):
            continue
        poly = _polygon(rng, label, cx, cy, radius)
        colour = np.clip(_BASE_COLOURS[label] + rng.uniform(-35, 35, size=3), 0, 255)
        pts = [np.round(poly * (1 << _SHIFT)).astype(np.int32)]
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=_SHIFT)
        shade = rng.uniform(0.85, 1.0) + 0.15 * (np.mgrid[0:size, 0:size][0] - cy) / size
        img[mask > 0] = (colour[None] * shade[mask > 0][:, None]
                         + rng.normal(0, 4, size=(int(mask.sum()), 3)))
        label_map[mask > 0] = label + 2
        objects.append((label, poly))
        boxes.append(box)
    return np.clip(img, 0, 255).astype(np.uint8), objects, label_map


def _write_image(path: str, rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f'could not write {path}')


def _coco_annotation(ann_id: int, image_id: int, label: int, poly: np.ndarray) -> dict:
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return dict(id=ann_id, image_id=image_id, category_id=label + 1, iscrowd=0,
                segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]],
                area=float(cv2.contourArea(poly.astype(np.float32))),
                bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)])


def _split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def _is_current(root: Path, params: dict) -> bool:
    marker = root / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def generate_coco_shapes(root: PathLike = DEMO_COCO_ROOT, num_train: int = 64, num_val: int = 16,
                         size: int = 128, seed: int = 0, force: bool = False) -> Path:
    """Write the instance-segmentation set in COCO layout under ``root`` and return ``root``.

    Nothing is rewritten when ``root`` already holds a set made with the same arguments (unless
    ``force``).
    """
    root = Path(root)
    params = dict(kind='coco_shapes', version=_VERSION, num_train=num_train, num_val=num_val,
                  size=size, seed=seed)
    if not force and _is_current(root, params):
        return root
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(DEMO_CLASSES)]
    ann_id = 1
    for split, count in (('train', num_train), ('val', num_val)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            img, objects, _ = render_scene(_split_rng(seed, split, index), size)
            name = f'{split}_{index:05d}.jpg'
            _write_image(str(root / split / name), img)
            images.append(dict(id=index + 1, file_name=name, width=size, height=size))
            for label, poly in objects:
                annotations.append(_coco_annotation(ann_id, index + 1, label, poly))
                ann_id += 1
        coco = dict(images=images, annotations=annotations, categories=categories,
                    info=dict(description=f'mmoverlock demo shapes ({split})'))
        (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(coco))
    (root / _MARKER).write_text(json.dumps(params))
    print_log(f'demo data: wrote {num_train} + {num_val} COCO-format images to {root}',
              logger='current')
    return root


def generate_ade_shapes(root: PathLike = DEMO_SEG_ROOT, num_train: int = 64, num_val: int = 16,
                        size: int = 128, seed: int = 0, force: bool = False) -> Path:
    """Write the semantic-segmentation set in ADE20K layout under ``root`` and return ``root``.

    Label maps hold 1 for background and 2, 3, 4 for the shapes (0 is never used; with
    ``reduce_zero_label=True`` they become classes 0..3 of :data:`DEMO_SEG_CLASSES`).
    """
    root = Path(root)
    params = dict(kind='ade_shapes', version=_VERSION, num_train=num_train, num_val=num_val,
                  size=size, seed=seed)
    if not force and _is_current(root, params):
        return root
    for split, folder, count in (('train', 'training', num_train),
                                 ('val', 'validation', num_val)):
        img_dir, ann_dir = root / 'images' / folder, root / 'annotations' / folder
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            img, _, label_map = render_scene(_split_rng(seed, split, index), size)
            stem = f'{split}_{index:05d}'
            _write_image(str(img_dir / f'{stem}.jpg'), img)
            if not cv2.imwrite(str(ann_dir / f'{stem}.png'), label_map):
                raise OSError(f'could not write {ann_dir / stem}.png')
    (root / _MARKER).write_text(json.dumps(params))
    print_log(f'demo data: wrote {num_train} + {num_val} ADE20K-layout images to {root}',
              logger='current')
    return root


def ensure_demo_data(task: str, root: Optional[PathLike] = None, **kwargs) -> Path:
    """Generate the demo set of ``task`` (``'det'`` or ``'seg'``) unless it is already there."""
    if task == 'det':
        return generate_coco_shapes(root or DEMO_COCO_ROOT, **kwargs)
    if task == 'seg':
        return generate_ade_shapes(root or DEMO_SEG_ROOT, **kwargs)
    raise ValueError(f"task must be 'det' or 'seg', got {task!r}")


def demo_root_of(path: PathLike) -> Optional[str]:
    """``'det'`` / ``'seg'`` when ``path`` is one of the default demo roots, else None."""
    norm = osp.normpath(str(path))
    for task, root in (('det', DEMO_COCO_ROOT), ('seg', DEMO_SEG_ROOT)):
        if norm == osp.normpath(root) or norm.endswith(osp.sep + osp.normpath(root)):
            return task
    return None
