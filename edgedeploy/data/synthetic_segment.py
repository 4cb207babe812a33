"""A built-in segmentation dataset: filled shapes with pixel masks on textured backgrounds, in VOC style.

Each image holds 1-4 shapes (circle, rectangle, triangle, ring), random in colour, size, position and
overlap order; the background is a smooth colour field with stripes and noise, so a class cannot be read
from one pixel's colour. Masks are palette PNGs of class ids (0 = background) with a 1-pixel ignore border
(255) around every shape, as VOC marks object boundaries. Image sizes vary around `imgsz` so evaluation at
the original resolution is exercised. Deterministic per seed; written once and reused::

    root/classes.txt  root/manifest.json
    root/images/{train,val}/00000.jpg   root/masks/{train,val}/00000.png
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgedeploy.data.cache import synthetic_root
from edgedeploy.errors import DatasetError

GENERATOR_VERSION = 1
CLASSES: tuple[str, ...] = ("background", "circle", "rectangle", "triangle", "ring")
IGNORE_INDEX = 255


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    import cv2

    hsv = np.array([[[rng.integers(0, 180), rng.integers(80, 256), rng.integers(70, 256)]]], np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    import cv2

    cells = int(rng.integers(2, 6))
    field = rng.normal(0, 45, size=(cells, cells, 3)).astype(np.float32)
    bg = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC) + np.asarray(_colour(rng), np.float32)
    if rng.random() < 0.6:  # stripes: texture the network must learn to ignore
        period = rng.uniform(6, 20)
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        bg += (wave[..., None] * rng.uniform(10, 35)).astype(np.float32)
    return bg


def _draw_shape(cls: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 {0,1} mask of one shape of class `cls`."""
    import cv2

    m = np.zeros((h, w), np.uint8)
    r = rng.uniform(0.12, 0.3) * min(h, w)
    cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
    name = CLASSES[cls]
    if name == "circle":
        cv2.circle(m, (int(cx), int(cy)), int(r), 1, -1)
    elif name == "rectangle":
        box = ((cx, cy), (2 * r * rng.uniform(0.7, 1.3), 2 * r * rng.uniform(0.5, 1.0)), rng.uniform(0, 180))
        cv2.fillPoly(m, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1)
    elif name == "triangle":
        a = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3
        pts = np.stack([cx + 1.2 * r * np.cos(a), cy + 1.2 * r * np.sin(a)], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    elif name == "ring":
        cv2.circle(m, (int(cx), int(cy)), int(r), 1, -1)
        cv2.circle(m, (int(cx), int(cy)), max(1, int(r * rng.uniform(0.45, 0.65))), 0, -1)
    else:
        raise ValueError(name)
    return m


def render_sample(imgsz: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (HxWx3 uint8 BGR image, HxW uint8 mask) pair; H, W within +-25% of imgsz."""
    import cv2

    h = int(rng.integers(imgsz * 3 // 4, imgsz * 5 // 4 + 1))
    w = int(rng.integers(imgsz * 3 // 4, imgsz * 5 // 4 + 1))
    img = _background(h, w, rng)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASSES)))
        m = _draw_shape(cls, h, w, rng)
        shade = 1.0 + rng.normal(0, 0.06, size=(h, w, 1)).astype(np.float32)
        img = np.where(m[..., None] > 0, np.asarray(_colour(rng), np.float32) * shade, img)
        mask[m > 0] = cls  # later shapes occlude earlier ones, in the image and in the mask alike
    # VOC-style ignore border: a pixel whose left or upper neighbour has another label is on a boundary
    border = np.zeros((h, w), bool)
    border[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    border[1:, :] |= mask[1:, :] != mask[:-1, :]
    mask[border] = IGNORE_INDEX
    img = img + rng.normal(0, rng.uniform(3, 10), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def synthetic_params(n_train: int, n_val: int, imgsz: int, seed: int) -> dict:
    return {"kind": "synthetic_segment", "version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val,
            "imgsz": imgsz, "seed": seed, "classes": list(CLASSES)}


def default_synthetic_root(params: dict) -> Path:
    return synthetic_root("segment", params)


def make_synthetic_segmentation(
    root: str | os.PathLike | None = None,
    n_train: int = 240,
    n_val: int = 60,
    imgsz: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write (or reuse) the dataset and return its root. Written to a temporary sibling folder and renamed into
    place, so an interrupted run never leaves half a dataset; a root with the same manifest is reused."""
    if imgsz < 32:
        raise DatasetError(f"synthetic segmentation needs imgsz >= 32, got {imgsz}")
    if n_train < 1 or n_val < 1:
        raise DatasetError("synthetic segmentation needs at least one train and one val image")
    params = synthetic_params(n_train, n_val, imgsz, seed)
    root = Path(root) if root is not None else default_synthetic_root(params)
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == params:
                return root
        except ValueError:
            pass
        shutil.rmtree(root)  # written by us with other parameters: regenerate
    elif root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root} exists and is not a synthetic set written by edgedeploy (no manifest.json); "
                           "choose an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    from edgedeploy.io import apply_umask

    apply_umask(tmp, directory=True)  # mkdtemp makes 0700: the cache should read like any folder
    try:
        _write_tree(tmp, params, progress)
        if root.exists():
            root.rmdir()
        try:
            os.replace(tmp, root)
        except OSError:  # another process wrote the same set meanwhile: keep theirs
            if not (root / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_tree(root: Path, params: dict, progress: bool) -> None:
    import cv2
    from PIL import Image
    from tqdm import tqdm

    from edgedeploy.data.palette import voc_palette

    palette = voc_palette()
    total = params["n_train"] + params["n_val"]
    with tqdm(total=total, desc="synthetic segmentation set", unit="img", disable=not progress, leave=False) as bar:
        for split_id, (split, n) in enumerate((("train", params["n_train"]), ("val", params["n_val"]))):
            (root / "images" / split).mkdir(parents=True)
            (root / "masks" / split).mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([params["seed"], split_id, i])  # each image reproducible on its own
                img, mask = render_sample(params["imgsz"], rng)
                if not cv2.imwrite(str(root / "images" / split / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                    raise DatasetError(f"cannot write into {root}: check free space and permissions")
                pm = Image.fromarray(mask)
                pm.putpalette(palette)  # L -> P: a VOC-style palette PNG whose indices are the class ids
                pm.save(root / "masks" / split / f"{i:05d}.png")
                bar.update(1)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "manifest.json").write_text(json.dumps(params, indent=2) + "\n")  # last: marks the tree complete
