"""A built-in classification dataset: coloured geometric shapes on noisy textured backgrounds.

One class per shape type. Colour, size, position, rotation, aspect and background are random for every image,
so the class cannot be read from colour or from where pixels are bright: a linear classifier on raw pixels
stays far below a small CNN (tests/test_data_classify.py measures both). The dataset is deterministic for
a given seed and is written as an ImageFolder tree that `edgedeploy.data.imagefolder` reads like user data::

    root/classes.txt                 one class name per line, in label order
    root/manifest.json               generation parameters: an existing tree with the same ones is reused
    root/train/<class>/00000.jpg
    root/val/<class>/00000.jpg
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

GENERATOR_VERSION = 2
SUPERSAMPLE = 4  # masks are drawn at 4x and area-downsampled: anti-aliased edges at any image size

# Label order. Shapes that a rotation maps onto each other (square/diamond) are deliberately not both here.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "arrow", "crescent")


def _regular_polygon(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(a), np.sin(a)], 1) * radius


def _star(points: int = 5, outer: float = 1.15, inner: float = 0.48) -> np.ndarray:
    a = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([np.cos(a) * r, np.sin(a) * r], 1)


_CROSS = np.array(
    [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3),
     (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], dtype=np.float64,
)
_ARROW = np.array(
    [(-1, -0.28), (0.15, -0.28), (0.15, -0.7), (1.05, 0), (0.15, 0.7), (0.15, 0.28), (-1, 0.28)], dtype=np.float64,
)


def _shape_polygons(shape: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(filled polygons, holes) in unit coordinates (radius ~1) before the random transform."""
    if shape == "circle":
        return [_regular_polygon(96, 0.95)], []
    if shape == "square":
        return [_regular_polygon(4, 1.1, math.pi / 4)], []
    if shape == "triangle":
        return [_regular_polygon(3, 1.2, -math.pi / 2)], []
    if shape == "star":
        return [_star()], []
    if shape == "cross":
        return [_CROSS], []
    if shape == "ring":
        return [_regular_polygon(96, 1.0)], [_regular_polygon(96, 0.55)]
    if shape == "arrow":
        return [_ARROW], []
    if shape == "crescent":
        return [_regular_polygon(96, 1.0)], [_regular_polygon(96, 0.85) + np.array([0.45, -0.1])]
    raise ValueError(shape)


def _shape_mask(shape: str, imgsz: int, rng: np.random.Generator) -> np.ndarray:
    """Soft (0..1) float mask of one randomly scaled/rotated/stretched/placed shape."""
    import cv2

    big = imgsz * SUPERSAMPLE
    radius = rng.uniform(0.25, 0.42) * imgsz  # 50-85% of the image across
    angle = rng.uniform(0, 2 * math.pi)
    stretch = rng.uniform(0.8, 1.2)
    margin = radius * 0.9
    cx, cy = rng.uniform(margin, imgsz - margin, size=2)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def place(poly: np.ndarray) -> np.ndarray:
        p = poly * np.array([stretch, 1 / stretch]) @ rot.T * radius + np.array([cx, cy])
        return np.round(p * SUPERSAMPLE).astype(np.int32)

    filled, holes = _shape_polygons(shape)
    mask = np.zeros((big, big), np.uint8)
    cv2.fillPoly(mask, [place(p) for p in filled], 255)
    if holes:
        cv2.fillPoly(mask, [place(p) for p in holes], 0)
    return cv2.resize(mask, (imgsz, imgsz), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    import cv2

    hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(60, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(imgsz: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour field + fine noise + a few distractor strokes."""
    import cv2

    cells = int(rng.integers(2, 6))
    base = _random_colour(rng)
    field = rng.normal(0, 25, size=(cells, cells, 3)).astype(np.float32)
    bg = cv2.resize(field, (imgsz, imgsz), interpolation=cv2.INTER_CUBIC) + base
    for _ in range(int(rng.integers(0, 3))):
        p1, p2 = rng.integers(0, imgsz, size=(2, 2))
        colour = tuple(float(c) for c in _random_colour(rng))
        cv2.line(bg, tuple(int(v) for v in p1), tuple(int(v) for v in p2), colour, 1, cv2.LINE_AA)
    return bg


def render_shape_image(shape: str, imgsz: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 BGR image of `shape`."""
    bg = _background(imgsz, rng)
    mask = _shape_mask(shape, imgsz, rng)[..., None]
    bg_mean = bg.reshape(-1, 3).mean(0)
    # a shape must stand out from its background, else its label is noise: the most distinct of a few draws
    colour = max((_random_colour(rng) for _ in range(4)), key=lambda c: float(np.abs(c - bg_mean).sum()))
    shade = 1.0 + rng.normal(0, 0.08, size=(imgsz, imgsz, 1)).astype(np.float32)
    img = bg * (1 - mask) + colour * shade * mask
    img += rng.normal(0, rng.uniform(3, 10), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_params(num_classes: int, train_per_class: int, val_per_class: int, imgsz: int, seed: int) -> dict:
    return {
        "kind": "synthetic_classify",
        "version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "imgsz": imgsz,
        "seed": seed,
    }


def default_synthetic_root(params: dict) -> Path:
    return synthetic_root("classify", params)


def make_synthetic_classification(
    root: str | os.PathLike | None = None,
    num_classes: int = 6,
    train_per_class: int = 500,
    val_per_class: int = 100,
    imgsz: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write (or reuse) the shapes dataset under `root` and return `root`.

    An existing `root` with a manifest of the same parameters is reused as is. The tree is written to a
    temporary sibling folder and renamed into place, so an interrupted run never leaves a half dataset.
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise DatasetError(f"synthetic classification supports 2..{len(SHAPES)} classes, got {num_classes}")
    if imgsz < 16:
        raise DatasetError(f"synthetic images need imgsz >= 16, got {imgsz}")
    params = synthetic_params(num_classes, train_per_class, val_per_class, imgsz, seed)
    root = Path(root) if root is not None else default_synthetic_root(params)
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == params:
                return root
        except ValueError:
            pass
        shutil.rmtree(root)  # ours, but other parameters: regenerate
    elif root.exists() and any(root.iterdir()):
        raise DatasetError(
            f"{root} exists and is not a synthetic dataset written by edgedeploy (no manifest.json); "
            "choose an empty or new folder"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    from edgedeploy.io import apply_umask

    apply_umask(tmp, directory=True)  # mkdtemp makes 0700: the cache should read like any folder
    try:
        _write_tree(tmp, params, progress)
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_tree(out: Path, params: dict, progress: bool) -> None:
    import cv2
    from tqdm import tqdm

    classes = list(SHAPES[: params["num_classes"]])
    jobs = [
        (split, ci, i)
        for split, n in (("train", params["train_per_class"]), ("val", params["val_per_class"]))
        for ci in range(len(classes))
        for i in range(n)
    ]
    for split in ("train", "val"):
        for name in classes:
            (out / split / name).mkdir(parents=True)
    for split, ci, i in tqdm(jobs, desc="synthetic shapes", unit="img", disable=not progress, leave=False):
        # one independent stream per image: the same image whatever the order or count of the others
        rng = np.random.default_rng([params["seed"], 0 if split == "train" else 1, ci, i])
        img = render_shape_image(classes[ci], params["imgsz"], rng)
        cv2.imwrite(str(out / split / classes[ci] / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    (out / "manifest.json").write_text(json.dumps(params, indent=2) + "\n")

