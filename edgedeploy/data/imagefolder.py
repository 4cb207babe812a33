"""ImageFolder classification datasets (the torchvision layout) read with OpenCV.

    DATA/train/<class_a>/*.jpg|png|...
    DATA/train/<class_b>/...
    DATA/val/<class_a>/...            (`valid` or `validation` also accepted)
    DATA/classes.txt                  optional: class names in label order (else sorted train folders)

Unreadable images are skipped, never fatal: files that are empty or not an image by their signature are
dropped when the folder is scanned (cheap: 16 bytes read per file), and a file that still fails to decode at
load time (truncated JPEG) is replaced by another sample of the same split. Both are counted and logged.

The eval transform is exactly the deployment preprocessing (`edgedeploy.data.preprocess.to_input_tensor`:
plain resize, RGB, /255, mean/std), so accuracy measured here is the accuracy an exported model sees.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from edgedeploy.data.preprocess import to_input_tensor
from edgedeploy.errors import DatasetError

log = logging.getLogger("edgedeploy.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VAL_SPLIT_NAMES = ("val", "valid", "validation")
LAYOUT_HELP = (
    "expected an ImageFolder layout:\n"
    "  DATA/train/<class>/<image>.jpg   (one folder per class)\n"
    "  DATA/val/<class>/<image>.jpg\n"
    "  DATA/classes.txt                 (optional: class names in label order)\n"
    "or pass `--data synthetic` for the built-in shapes dataset"
)


def _looks_like_image(path: Path) -> bool:
    """Signature check of the first bytes: catches empty files, text/HTML saved as .jpg, partial downloads."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return (
        head[:3] == b"\xff\xd8\xff"  # JPEG
        or head[:8] == b"\x89PNG\r\n\x1a\n"
        or head[:2] == b"BM"
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or head[:4] in (b"II*\x00", b"MM\x00*")  # TIFF
    )


def read_class_names(root: str | os.PathLike) -> list[str]:
    """Class names in label order: classes.txt if present, else the sorted folders of the train split."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}; {LAYOUT_HELP}")
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if names:
            return names
    train = root / "train"
    if not train.is_dir():
        raise DatasetError(f"{root}: no train/ folder; {LAYOUT_HELP}")
    names = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DatasetError(f"{train}: no class folders; {LAYOUT_HELP}")
    return names


def find_split_dir(root: str | os.PathLike, split: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}; {LAYOUT_HELP}")
    candidates = VAL_SPLIT_NAMES if split == "val" else (split,)
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{root}: no {'/'.join(candidates)} folder; {LAYOUT_HELP}")


def skipped_message(where: Path, skipped: Sequence[Path], shown: int = 5) -> str:
    """One line naming the files left out (format not supported, or not an image by its signature)."""
    names = ", ".join(str(p.relative_to(where)) if p.is_relative_to(where) else str(p) for p in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return (f"{where}: skipped {len(skipped)} file(s) that are not readable images ({names}{more}); supported: "
            f"{', '.join(IMAGE_EXTENSIONS)}. Convert or remove them to use them.")


@dataclass
class ScanResult:
    samples: list[tuple[Path, int]]
    skipped: list[Path]


def scan_split(split_dir: Path, classes: Sequence[str]) -> ScanResult:
    """List (path, label) pairs of one split, dropping files that are not images by their signature."""
    known = set(classes)
    extra = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in known)
    if extra:
        raise DatasetError(
            f"{split_dir}: class folder(s) {', '.join(extra)} are not in the class list ({', '.join(classes)}); "
            "every split must use the train split's classes (or list them all in classes.txt)"
        )
    samples: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(path)  # .gif, .heic, ...: not decoded here, so counted and named, not dropped silently
                continue
            (samples.append((path, label)) if _looks_like_image(path) else skipped.append(path))
    return ScanResult(samples, skipped)


AUGMENT_LEVELS = ("standard", "light")


def train_transform(imgsz: int, mean: Sequence[float], std: Sequence[float], level: str = "standard"):
    """Augmentation on uint8 CHW RGB tensors.

    "standard" (user data): RandomResizedCrop scale (0.5, 1) (moderate: small images lose their object under
    ImageNet's (0.08, 1)), flip, colour jitter. Resizing is plain bilinear without antialiasing, exactly what the
    deployment preprocessing does (cv2 INTER_LINEAR in `to_input_tensor`): a network trained on antialiased
    downscales and served aliased ones loses accuracy (issue 13 reported 2 points of top-1). "light" (synthetic data, already randomised in colour, size
    and pose): crop scale (0.75, 1) near-square, flip; measured to double the convergence speed of short runs.
    """
    from torchvision.transforms import v2

    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augmentation level {level!r}: use one of {AUGMENT_LEVELS}")
    if level == "light":
        geometry = [v2.RandomResizedCrop(imgsz, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=False)]
        colour = []
    else:
        geometry = [v2.RandomResizedCrop(imgsz, scale=(0.5, 1.0), antialias=False)]
        colour = [v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)]
    return v2.Compose(
        [
            *geometry,
            v2.RandomHorizontalFlip(),
            *colour,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


class ImageFolderDataset(Dataset):
    """One split of an ImageFolder tree. Items are (float32 CHW normalised tensor, int label)."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        imgsz: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool | str = False,
        classes: Sequence[str] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        self.imgsz = imgsz
        self.mean, self.std = tuple(mean), tuple(std)
        self.classes = list(classes) if classes is not None else read_class_names(self.root)
        self.split_dir = find_split_dir(self.root, split)
        scan = scan_split(self.split_dir, self.classes)
        self.samples = scan.samples
        self.skipped = scan.skipped
        self.load_failures = 0  # decode failures at load time (per process: each loader worker counts its own)
        if self.skipped:
            log.warning("%s", skipped_message(self.split_dir, self.skipped))
        if not self.samples:
            raise DatasetError(f"{self.split_dir}: no readable images in any class folder; {LAYOUT_HELP}")
        level = augment if isinstance(augment, str) else "standard"
        self.transform = train_transform(imgsz, mean, std, level) if augment else None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def read_bgr(self, index: int) -> tuple[np.ndarray, int]:
        """Decode sample `index` (BGR uint8); a file that fails to decode is replaced by the next readable one."""
        import cv2

        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is not None:
                return img, label
            self.load_failures += 1
            log.warning("%s: cannot decode, using another sample instead (%d so far)", path, self.load_failures)
        raise DatasetError(f"{self.split_dir}: none of the {len(self.samples)} images can be decoded")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.read_bgr(index)
        if self.transform is None:
            x, _, _ = to_input_tensor(img, self.imgsz, self.mean, self.std)
            return torch.from_numpy(x[0]), label
        rgb = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))
        return self.transform(rgb), label


def load_imagefolder(
    root: str | os.PathLike,
    imgsz: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool | str = True,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """(train with augmentation, val with the deployment preprocessing), sharing one class list. `augment`:
    False, True ("standard") or an `AUGMENT_LEVELS` name."""
    classes = read_class_names(root)
    train = ImageFolderDataset(root, "train", imgsz, mean, std, augment=augment, classes=classes)
    val = ImageFolderDataset(root, "val", imgsz, mean, std, augment=False, classes=classes)
    return train, val


def classification_datasets(
    data: str | os.PathLike,
    imgsz: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int | None = None,
    seed: int = 0,
    augment: bool | str = True,
    progress: bool = True,
):
    """(train, val, class_names, data_root) for an ImageFolder folder or "synthetic" (the shapes set at its default
    size, 500 train + 100 val images per class, generated or reused)."""
    if str(data).lower() == "synthetic":
        from edgedeploy.data.synthetic_classify import make_synthetic_classification

        sizes = {"num_classes": num_classes} if num_classes else {}
        root = make_synthetic_classification(imgsz=imgsz, seed=seed, progress=progress, **sizes)
    else:
        root = Path(data)
    train, val = load_imagefolder(root, imgsz, mean, std, augment=augment)
    if num_classes is not None and num_classes != len(train.classes):
        raise DatasetError(
            f"--num-classes {num_classes} but {root} has {len(train.classes)} classes "
            f"({', '.join(train.classes[:10])}{' ...' if len(train.classes) > 10 else ''}); drop --num-classes "
            "or fix the dataset"
        )
    return train, val, train.classes, root
