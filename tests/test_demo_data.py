"""The built-in shapes data sets: deterministic, valid COCO / ADE20K layouts, consistent labels."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmoverlock.datasets import (
    DEMO_CLASSES,
    generate_coco_shapes,
    render_scene,
)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    a = generate_coco_shapes(tmp_path / 'a', num_train=3, num_val=2, size=64, seed=5)
    b = generate_coco_shapes(tmp_path / 'b', num_train=3, num_val=2, size=64, seed=5)
    c = generate_coco_shapes(tmp_path / 'c', num_train=3, num_val=2, size=64, seed=6)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    before = {p: p.stat().st_mtime_ns for p in a.rglob('*.jpg')}
    generate_coco_shapes(a, num_train=3, num_val=2, size=64, seed=5)  # already there: kept
    assert before == {p: p.stat().st_mtime_ns for p in a.rglob('*.jpg')}


def test_coco_file_is_valid_and_masks_match_boxes(coco_root: str) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    root = Path(coco_root)
    for split, count in (('train', 8), ('val', 4)):
        coco = COCO(str(root / 'annotations' / f'instances_{split}.json'))
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(DEMO_CLASSES)
        assert len(coco.getImgIds()) == count
        for image in coco.loadImgs(coco.getImgIds()):
            assert (root / split / image['file_name']).is_file()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image['id']))
            assert 1 <= len(anns) <= 4
            for ann in anns:
                rle = mask_utils.frPyObjects(ann['segmentation'], image['height'], image['width'])
                x, y, w, h = mask_utils.toBbox(mask_utils.merge(rle))
                assert np.allclose([x, y, w, h], ann['bbox'], atol=1.5)
                assert ann['area'] == pytest.approx(mask_utils.area(mask_utils.merge(rle)),
                                                    rel=0.15)


def test_ade_layout_and_labels(ade_root: str) -> None:
    root = Path(ade_root)
    for folder, count in (('training', 8), ('validation', 4)):
        images = sorted((root / 'images' / folder).glob('*.jpg'))
        labels = sorted((root / 'annotations' / folder).glob('*.png'))
        assert len(images) == len(labels) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
        for path in labels:
            label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert label.dtype == np.uint8 and label.ndim == 2
            values = set(np.unique(label).tolist())
            assert 1 in values and values <= {1, 2, 3, 4}  # 0 (ignored in ADE20K) never used
    assert json.loads((root / 'demo_data.json').read_text())['kind'] == 'ade_shapes'


def test_label_map_matches_shapes_and_colours() -> None:
    rng = np.random.default_rng(3)
    image, objects, label_map = render_scene(rng, size=96)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    for label, poly in objects:
        mask = np.zeros((96, 96), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        inside = label_map[mask > 0]
        assert (inside == label + 2).mean() > 0.9
        # each class has its own hue family: its channel is the largest inside the shape
        channel = {0: 0, 1: 1, 2: 2}[label]
        assert image[label_map == label + 2].mean(axis=0).argmax() == channel
