"""Images for INT8 calibration and held-out evaluation: a directory (any layout) or the task's synthetic set.

Unreadable files are skipped and counted, never fatal: one corrupt JPEG must not abort an export.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgedeploy.errors import DatasetError

log = logging.getLogger("edgedeploy.export")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


_NOT_IMAGES = {".txt", ".json", ".yaml", ".yml", ".xml", ".csv", ".md", ".cache"}  # annotations beside images


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (recursive, sorted). Other files (a .gif in a class folder) are named in a warning:
    a file left out is said, never silently dropped."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image directory not found: {root} (pass a folder of images, or `synthetic`)")
    files, other = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        suffix = p.suffix.lower()
        (files if suffix in IMAGE_SUFFIXES else other if suffix not in _NOT_IMAGES else []).append(p)
    if other:
        from edgedeploy.data.imagefolder import skipped_message

        log.warning("%s", skipped_message(root, other))
    if not files:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


def read_image(path: Path) -> np.ndarray | None:
    """uint8 BGR image, or None when the file cannot be decoded."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return img if img is not None and img.size else None


def read_image_files(files: list[Path], n: int | None = None, where: str = "") -> tuple[list[np.ndarray], int]:
    """Up to `n` decodable images of `files` and how many were skipped as corrupt.

    Files are taken evenly spaced over the sorted list, so a tree of class folders gives every class its share
    (the first `n` files would all be one class: a calibration that has never seen the others).
    """
    files = sorted(files)
    if n is not None and len(files) > n:
        step = len(files) / n
        picked = [files[int(i * step)] for i in range(n)]
        chosen = set(picked)
        files = picked + [f for f in files if f not in chosen]  # the rest stand in for corrupt ones
    images, skipped = [], 0
    for path in files:
        if n is not None and len(images) >= n:
            break
        img = read_image(path)
        if img is None:
            skipped += 1
        else:
            images.append(img)
    if not images:
        raise DatasetError(f"none of the images under {where or 'the given files'} could be decoded ({skipped} corrupt)")
    return images, skipped


def read_image_dir(root: str | os.PathLike, n: int | None = None) -> tuple[list[np.ndarray], int]:
    """Up to `n` decodable images from `root` (recursive, evenly spaced) and how many were skipped as corrupt."""
    return read_image_files(list_images(root), n, str(root))


def read_image_folder(
    root: str | os.PathLike, n: int | None = None, classes: list[str] | None = None
) -> tuple[list[np.ndarray], list[int], list[str], int, int]:
    """ImageFolder layout (root/<class>/<image>): images, labels, class names, corrupt files skipped, and how
    many images the folder holds (files of unsupported formats are named in a warning by `list_images`).

    Labels follow `classes` (the training label order, e.g. from classes.txt) when given, else sorted folder
    names. Images are taken round-robin over classes so a small `n` still covers every class.
    """
    root = Path(root)
    if classes is None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    per_class = []
    for c in classes:
        try:
            per_class.append(list_images(root / c))
        except DatasetError:
            per_class.append([])
    images, labels, skipped = [], [], 0
    for i in range(max(len(p) for p in per_class)):
        for label, files in enumerate(per_class):
            if i >= len(files) or (n is not None and len(images) >= n):
                continue
            img = read_image(files[i])
            if img is None:
                skipped += 1
                continue
            images.append(img)
            labels.append(label)
    if not images:
        raise DatasetError(f"no decodable images under {root} ({skipped} corrupt)")
    return images, labels, classes, skipped, sum(len(p) for p in per_class)


class CalibrationReader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed images (one batch of 1 per call)."""

    def __init__(self, input_name: str, inputs: list[np.ndarray], progress: Callable[[], None] | None = None):
        self.input_name = input_name
        self.inputs = inputs
        self._progress = progress
        self._it: Iterator[np.ndarray] = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is None:
            return None
        if self._progress:
            self._progress()
        return {self.input_name: x}

    def rewind(self) -> None:
        self._it = iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)
