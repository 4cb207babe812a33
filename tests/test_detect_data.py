"""Detection data: YOLO-txt and COCO-json parsing (with bad input), the synthetic set, mosaic and collate."""

from __future__ import annotations

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch

from edgedeploy.data.coco import build_coco_gt, load_coco_dataset
from edgedeploy.data.detect_augment import LETTERBOX_PAD, DetectionTrainSet, collate_detection, letterbox_sample
from edgedeploy.data.synthetic_detect import synthetic_detection_dataset
from edgedeploy.data.sources import open_detection_dataset
from edgedeploy.data.yolo_format import load_yolo_dataset, read_class_names
from edgedeploy.errors import DatasetError

# Class colours (BGR) for the hand-made datasets: every object is a solid rectangle of its class colour.
COLOURS = [(255, 255, 255), (0, 0, 255), (0, 255, 0)]
BACKGROUND = 60


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On a shared, oversubscribed CPU, OpenMP's 2-thread barriers make small convs 10-50x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_image(path, w, h, objects):
    """objects: (cls, x1, y1, x2, y2) pixel rectangles drawn in their class colour."""
    img = np.full((h, w, 3), BACKGROUND, np.uint8)
    for c, x1, y1, x2, y2 in objects:
        img[y1:y2, x1:x2] = COLOURS[c]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def _yolo_line(c, x1, y1, x2, y2, w, h):
    return f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"


def make_rect_dataset(root, n=6, seed=0, split="train"):
    """YOLO dataset of non-overlapping coloured rectangles on flat backgrounds (various image shapes)."""
    rng = np.random.default_rng(seed)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(120, 200)), int(rng.integers(90, 200))
        objects = []
        for _ in range(20):
            bw, bh = int(rng.integers(12, 50)), int(rng.integers(12, 50))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            box = (x1 - 3, y1 - 3, x1 + bw + 3, y1 + bh + 3)  # keep a gap between objects
            if all(box[2] <= o[1] or box[0] >= o[3] or box[3] <= o[2] or box[1] >= o[4] for o in objects):
                objects.append((int(rng.integers(3)), x1, y1, x1 + bw, y1 + bh))
            if len(objects) == 4:
                break
        _write_image(root / "images" / split / f"im{i}.png", w, h, objects)
        (root / "labels" / split / f"im{i}.txt").write_text("\n".join(_yolo_line(*o, w, h) for o in objects) + "\n")
    (root / "classes.txt").write_text("white\nred\ngreen\n")
    return root


def test_yolo_labels_bad_lines_background_and_empty_images(tmp_path, caplog):
    root = tmp_path / "ds"
    _write_image(root / "images/train/a.png", 200, 100, [(0, 10, 20, 50, 60)])
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/train/a.txt").write_text(
        "0 0.15 0.4 0.2 0.4\n"  # good: x 10..50, y 20..60
        "1 0.5 0.5 0.1\n"  # 4 values
        "1 0.5 zero 0.1 0.1\n"  # not a number
        "7 0.5 0.5 0.1 0.1\n"  # class out of range
        "1 0.98 0.5 0.1 0.1\n"  # right edge at 1.03
        "\n"
        "2 0.5 0.5 0.0 0.1\n"  # zero width
        "2 0.5 0.5 0.2 0.2\n"  # good
    )
    _write_image(root / "images/train/background.png", 64, 48, [])  # no label file: background
    (root / "images/train/empty.jpg").write_bytes(b"")  # zero-size
    (root / "images/train/corrupt.jpg").write_bytes(b"this is not a jpeg")
    (root / "labels/train/orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # label without image
    (root / "classes.txt").write_text("a\nb\nc\n")

    with caplog.at_level(logging.WARNING, logger="edgedeploy.data"):
        ds = load_yolo_dataset(root, "train")

    assert len(ds) == 2 and ds.skipped_images == 2 and ds.num_background == 1
    rec = next(r for r in ds.records if r.path.name == "a.png")
    assert rec.classes.tolist() == [0, 2]
    np.testing.assert_allclose(rec.boxes, [[10, 20, 50, 60], [80, 40, 120, 60]], atol=1e-3)
    label = str(root / "labels/train/a.txt")
    messages = [str(i) for i in ds.issues]
    for line, reason in ((2, "expected 5 values"), (3, "not a number"), (4, "out of range"), (5, "outside the image"), (7, "> 0")):
        assert any(m.startswith(f"{label}:{line}:") and reason in m for m in messages), (line, messages)
    assert any("orphan.txt" in m and "without an image" in m for m in messages)
    assert any("empty.jpg" in m for m in messages) and any("corrupt.jpg" in m for m in messages)
    assert f"{label}:2:" in caplog.text  # the user sees file:line in the log
    assert "2 unreadable images skipped" in ds.summary()


def test_class_names_yaml_txt_and_fallback(tmp_path):
    (tmp_path / "data.yaml").write_text("names:\n  0: person\n  1: car\n")
    assert read_class_names(tmp_path) == ["person", "car"]
    (tmp_path / "data.yaml").write_text("names: [a, b, c]\n")
    assert read_class_names(tmp_path) == ["a", "b", "c"]
    (tmp_path / "data.yaml").write_text("names:\n  0: a\n  2: c\n")
    with pytest.raises(DatasetError, match="without gaps"):
        read_class_names(tmp_path)
    os.remove(tmp_path / "data.yaml")
    assert read_class_names(tmp_path) is None
    # no names anywhere: generic names sized by the largest class id seen
    _write_image(tmp_path / "images/val/x.png", 32, 32, [(0, 1, 1, 20, 20)])
    (tmp_path / "labels/val").mkdir(parents=True)
    (tmp_path / "labels/val/x.txt").write_text("4 0.5 0.5 0.5 0.5\n")
    assert load_yolo_dataset(tmp_path, "val").names == [f"class{i}" for i in range(5)]
    with pytest.raises(DatasetError, match="no `train` split"):
        load_yolo_dataset(tmp_path, "train")


def _coco_fixture(root):
    _write_image(root / "images/val/p.png", 100, 80, [(0, 10, 10, 30, 40)])
    _write_image(root / "images/val/q.png", 50, 50, [])
    ann = {
        "images": [{"id": 11, "file_name": "p.png", "width": 100, "height": 80}, {"id": 12, "file_name": "q.png", "width": 50, "height": 50}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [50, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 90, 70], "area": 6300, "iscrowd": 1},
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/instances_val.json").write_text(json.dumps(ann))
    return ann


def test_coco_json_loading_and_gt_round_trip(tmp_path):
    _coco_fixture(tmp_path)
    ds = open_detection_dataset(tmp_path, "val")  # layout detected as COCO
    assert ds.format == "coco" and ds.names == ["cat", "dog"]  # sorted by category id: 3 -> 0, 7 -> 1
    p = next(r for r in ds.records if r.path.name == "p.png")
    assert p.classes.tolist() == [1, 0]  # crowd region dropped
    np.testing.assert_allclose(p.boxes, [[10, 10, 30, 40], [50, 5, 60, 15]])
    assert ds.num_background == 1
    gt = build_coco_gt(ds)
    assert len(gt.getAnnIds()) == 2 and sorted(gt.getCatIds()) == [0, 1]
    assert gt.loadAnns(gt.getAnnIds(imgIds=[p.image_id], catIds=[1]))[0]["bbox"] == [10, 10, 20, 30]


def test_coco_image_id_mismatch_is_named(tmp_path):
    ann = _coco_fixture(tmp_path)
    ann["annotations"][0]["image_id"] = 99
    ann["annotations"][1]["image_id"] = 1234
    (tmp_path / "annotations/instances_val.json").write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match=r"image ids that are not in `images`: 99, 1234.*Known image ids: 11, 12"):
        load_coco_dataset(tmp_path / "annotations/instances_val.json", tmp_path / "images/val")
    ann["annotations"][0]["image_id"] = 11
    ann["annotations"][1]["image_id"] = 11
    ann["annotations"][1]["category_id"] = 5
    (tmp_path / "annotations/instances_val.json").write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match="category ids missing from `categories`: 5"):
        load_coco_dataset(tmp_path / "annotations/instances_val.json", tmp_path / "images/val")


def test_synthetic_set_is_deterministic_and_reused(tmp_path):
    kw = dict(num_train=6, num_val=3, imgsz=96, seed=3)
    a = synthetic_detection_dataset(tmp_path / "a", **kw)
    b = synthetic_detection_dataset(tmp_path / "b", **kw)
    labels_a = sorted(p.read_text() for p in (a / "labels/train").glob("*.txt"))
    assert labels_a == sorted(p.read_text() for p in (b / "labels/train").glob("*.txt"))
    marker = a / "images/train/train_00000.jpg"
    stamp = marker.stat().st_mtime_ns
    assert synthetic_detection_dataset(tmp_path / "a", **kw) == a and marker.stat().st_mtime_ns == stamp  # reused
    c = synthetic_detection_dataset(tmp_path / "a", **{**kw, "seed": 4})  # other parameters: regenerated
    assert sorted(p.read_text() for p in (c / "labels/train").glob("*.txt")) != labels_a
    ds = load_yolo_dataset(a, "train")
    assert ds.names[:3] == ["circle", "rectangle", "triangle"] and not ds.issues
    assert ds.num_objects >= 6
    with pytest.raises(DatasetError, match="not a synthetic set"):
        (tmp_path / "user").mkdir()
        (tmp_path / "user/keep.txt").write_text("mine")
        synthetic_detection_dataset(tmp_path / "user", **kw)


def _check_boxes_match_pixels(img, cls, boxes, size):
    assert boxes.shape[1] == 4 and len(cls) == len(boxes)
    assert (boxes >= 0).all() and (boxes <= size).all()
    assert ((boxes[:, 2] - boxes[:, 0]) > 2).all() and ((boxes[:, 3] - boxes[:, 1]) > 2).all()
    covered = np.zeros(img.shape[:2], bool)
    for c, (x1, y1, x2, y2) in zip(cls, boxes):
        inner = img[int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1].reshape(-1, 3).astype(int)
        if len(inner):
            match = (np.abs(inner - COLOURS[c]).sum(1) < 60).mean()
            assert match > 0.95, f"box {c} {x1:.1f},{y1:.1f},{x2:.1f},{y2:.1f}: only {match:.0%} of pixels have its colour"
        covered[max(0, int(y1) - 2) : int(y2) + 3, max(0, int(x1) - 2) : int(x2) + 3] = True
    # every object pixel (any class colour) lies inside some box: no object lost its label
    object_px = np.zeros(img.shape[:2], bool)
    for colour in COLOURS:
        object_px |= np.abs(img.astype(int) - colour).sum(2) < 60
    stray = (object_px & ~covered).astype(np.uint8)
    # Unlabelled object pixels may only be remains of objects mostly cut away (dropped on purpose): those
    # touch the crop border or the padding around a mosaic tile, never sit in the open.
    pad = (np.abs(img.astype(int) - LETTERBOX_PAD).max(2) <= 3).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(stray)
    for k in range(1, n):
        x, y, w, h, area = stats[k]
        at_border = x == 0 or y == 0 or x + w == size or y + h == size
        near_pad = (cv2.dilate((labels == k).astype(np.uint8), np.ones((5, 5), np.uint8)) & pad).any()
        assert at_border or near_pad, f"unlabelled object remains at x={x} y={y} ({w}x{h})"


def test_mosaic_flip_letterbox_keep_boxes_on_their_objects(tmp_path):
    ds = load_yolo_dataset(make_rect_dataset(tmp_path / "rects", n=6), "train")
    size = 128
    train = DetectionTrainSet(ds, size, augment=True, mosaic=1.0, hsv=False, flip=0.5, seed=1)
    seen_objects = 0
    for epoch in range(3):
        train.set_epoch(epoch)
        for i in range(len(ds)):
            img, cls, boxes = train.sample(i)
            assert img.shape == (size, size, 3)
            _check_boxes_match_pixels(img, cls, boxes, size)
            seen_objects += len(cls)
    assert seen_objects > 3 * len(ds) * 2  # mosaics do carry objects
    a, b = train.sample(2), train.sample(2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])  # reproducible per (seed, epoch, index)

    train.close_mosaic()  # plain letterbox (+flip)
    for i in range(len(ds)):
        img, cls, boxes = train.sample(i)
        _check_boxes_match_pixels(img, cls, boxes, size)
        assert len(cls) == len(ds[i].classes)  # nothing is cropped away without mosaic
    img, cls, boxes, scale, (px, py) = letterbox_sample(ds, 0, size)
    np.testing.assert_allclose((boxes - [px, py, px, py]) / scale, ds[0].boxes, atol=1e-3)

    hsv = DetectionTrainSet(ds, size, mosaic=0.0, hsv=True, flip=0.0, seed=1)
    plain = DetectionTrainSet(ds, size, mosaic=0.0, hsv=False, flip=0.0, seed=1)
    assert not np.array_equal(hsv.sample(0)[0], plain.sample(0)[0])
    np.testing.assert_array_equal(hsv.sample(0)[2], plain.sample(0)[2])  # colour jitter never moves boxes


def test_collate_builds_normalised_targets(tmp_path):
    ds = load_yolo_dataset(make_rect_dataset(tmp_path / "rects", n=4), "train")
    train = DetectionTrainSet(ds, 96, augment=False)
    images, targets = collate_detection([train[i] for i in range(4)])
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert targets.shape == (ds.num_objects, 6)
    counts = torch.bincount(targets[:, 0].long(), minlength=4).tolist()
    assert counts == [len(ds[i].classes) for i in range(4)]
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
    # image 0's first target maps back to its label in original pixels
    img, cls, boxes, scale, pad = letterbox_sample(ds, 0, 96)
    cx, cy = (boxes[0, 0] + boxes[0, 2]) / 2 / 96, (boxes[0, 1] + boxes[0, 3]) / 2 / 96
    first = targets[targets[:, 0] == 0][0]
    assert first[1] == cls[0]
    np.testing.assert_allclose(first[2:4].numpy(), [cx, cy], atol=1e-5)
    # RGB order: the red class-1 object shows up in channel 0
    red = next(i for i in range(4) if 1 in ds[i].classes.tolist())
    x, labels = train[red]
    c, cxn, cyn = labels[labels[:, 0] == 1][0, :3].tolist()
    pix = x[:, int(cyn * 96), int(cxn * 96)]
    assert pix[0] > 0.9 and pix[2] < 0.1
