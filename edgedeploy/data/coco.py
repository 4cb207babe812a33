"""COCO-json detection datasets, and the COCO ground truth built in memory from any detection dataset.

Layout: DIR/annotations/instances_<split>.json (images, annotations with `bbox` = x, y, w, h in pixels,
categories) and the images in DIR/images/<split>/, DIR/<split>/, DIR/<split>2017/ or DIR/images/.
Category ids (COCO's run 1..90 with gaps) become contiguous class indices in sorted id order.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgedeploy.data.yolo_format import SPLIT_ALIASES, DatasetIssue, DetectionDataset, DetectionRecord, _log_issues
from edgedeploy.errors import DatasetError


def find_coco_split(root: str | os.PathLike, split: str) -> tuple[Path, Path] | None:
    """(annotation_json, images_dir) for `split`, or None when no matching annotation file exists."""
    root = Path(root)
    for name in SPLIT_ALIASES.get(split, (split,)):
        for ann in (root / "annotations" / f"instances_{name}.json", *sorted((root / "annotations").glob(f"instances_{name}*.json"))):
            if ann.is_file():
                for images in (root / "images" / name, root / name, root / f"{name}2017", root / "images"):
                    if images.is_dir():
                        return ann, images
                return ann, root / "images" / name  # reported as missing by load_coco_dataset
    return None


def _ids_text(ids, limit: int = 10) -> str:
    ids = sorted(ids)
    return ", ".join(str(i) for i in ids[:limit]) + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def load_coco_dataset(ann_file: str | os.PathLike, images_dir: str | os.PathLike | None = None, split: str = "") -> DetectionDataset:
    """Read a COCO instances json. Annotations that point at unknown image or category ids are an error."""
    ann_file = Path(ann_file)
    images_dir = Path(images_dir) if images_dir is not None else ann_file.parent.parent / "images" / split
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read COCO annotations {ann_file}: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{ann_file} is not a COCO instances file: missing list(s) {', '.join(missing)}")
    if not images_dir.is_dir():
        raise DatasetError(f"image folder for {ann_file.name} not found: {images_dir}")

    images = {}
    for im in data["images"]:
        if im.get("id") in images:
            raise DatasetError(f"{ann_file}: image id {im['id']} appears twice in `images`")
        images[im.get("id")] = im
    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_to_index = {c["id"]: i for i, c in enumerate(categories)}
    if not categories:
        raise DatasetError(f"{ann_file}: `categories` is empty")

    unknown_images = {a.get("image_id") for a in data["annotations"]} - set(images)
    if unknown_images:
        raise DatasetError(
            f"{ann_file}: annotations refer to image ids that are not in `images`: {_ids_text(unknown_images)}. "
            f"Known image ids: {_ids_text(images)}. The json was probably merged or filtered without renumbering."
        )
    unknown_cats = {a.get("category_id") for a in data["annotations"]} - set(cat_to_index)
    if unknown_cats:
        raise DatasetError(
            f"{ann_file}: annotations use category ids missing from `categories`: {_ids_text(unknown_cats)} "
            f"(categories: {_ids_text(cat_to_index)})"
        )

    per_image = defaultdict(list)
    issues: list[DatasetIssue] = []
    for n, a in enumerate(data["annotations"]):
        if a.get("iscrowd", 0):
            continue  # crowd regions are neither objects to learn nor boxes to match
        im = images[a["image_id"]]
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            issues.append(DatasetIssue(ann_file, None, f"annotation #{n} (id {a.get('id')}): bbox must be [x, y, w, h]"))
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > im["width"] + 1 or y + h > im["height"] + 1:
            issues.append(DatasetIssue(ann_file, None, f"annotation #{n} (id {a.get('id')}): bbox {bbox} outside image {im['width']}x{im['height']}"))
            continue
        per_image[a["image_id"]].append((cat_to_index[a["category_id"]], x, y, x + w, y + h))

    records: list[DetectionRecord] = []
    skipped = 0
    for image_id in sorted(images, key=lambda i: str(images[i].get("file_name", ""))):
        im = images[image_id]
        path = images_dir / im.get("file_name", "")
        if not path.is_file() or path.stat().st_size == 0:
            skipped += 1
            issues.append(DatasetIssue(path, None, "image listed in the json is missing or empty, skipped"))
            continue
        rows = np.asarray(per_image.get(image_id, []), np.float32).reshape(-1, 5)
        w, h = int(im["width"]), int(im["height"])
        boxes = rows[:, 1:].clip(0, [w, h, w, h]).astype(np.float32)
        records.append(DetectionRecord(len(records) + 1, path, w, h, rows[:, 0].astype(np.int64), boxes))
    if not records:
        raise DatasetError(f"none of the {len(images)} images in {ann_file} exist in {images_dir}")
    _log_issues(issues, split or ann_file.stem)
    names = [str(c.get("name", c["id"])) for c in categories]
    return DetectionDataset(records, names, ann_file.parent.parent, split or ann_file.stem, issues, skipped, "coco",
                            layout=f"COCO json {ann_file.name}")


def coco_gt_dict(dataset: DetectionDataset) -> dict:
    """COCO instances dict for `dataset`: image ids are the records' ids, category ids the class indices."""
    images, annotations = [], []
    for r in dataset.records:
        images.append({"id": r.image_id, "file_name": r.path.name, "width": r.width, "height": r.height})
        for c, (x1, y1, x2, y2) in zip(r.classes.tolist(), r.boxes.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {"id": len(annotations) + 1, "image_id": r.image_id, "category_id": int(c), "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}
            )
    categories = [{"id": i, "name": n} for i, n in enumerate(dataset.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def build_coco_gt(dataset: DetectionDataset):
    """A pycocotools COCO object for `dataset`, built in memory (no json written)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = coco_gt_dict(dataset)
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        gt.createIndex()
    return gt
