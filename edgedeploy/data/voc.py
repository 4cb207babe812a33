"""Semantic-segmentation datasets in VOC style: RGB images paired with single-channel masks of class ids.

Accepted layouts (masks are PNGs named like their image; palette "P" PNGs as in VOC, or 8/16-bit grey)::

    DIR/images/{train,val}/x.jpg     DIR/masks/{train,val}/x.png          ("images/masks" layout)
    DIR/JPEGImages/x.jpg             DIR/SegmentationClass/x.png          (Pascal VOC; DIR may also be the
    DIR/ImageSets/Segmentation/{train,val}.txt                             VOCdevkit or its parent)

Class names come from `classes.txt` (or `class_names.txt`, `labels.txt`; one per line, in id order) in DIR;
VOC layouts without one get the 21 VOC names. Mask pixels equal to `ignore_index` (255, VOC's object borders)
are left out of the loss and the metrics; any other value outside [0, num_classes) is an error naming the file.
Grey, palette and RGBA images are converted to RGB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from edgedeploy.errors import DatasetError
from edgedeploy.data.palette import voc_palette
from edgedeploy.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CLASS_FILES = ("classes.txt", "class_names.txt", "labels.txt")
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


# ------------------------------------------------------------------------------------------------ reading


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 RGB; grey, palette, 16-bit and RGBA images are converted (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """HxW int64 class ids from a palette (indices), grey or 16-bit PNG. Colour-coded RGB masks are refused:
    their colours are not ids."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
                raise DatasetError(
                    f"mask {path} is a {im.mode} colour image: masks must hold one class id per pixel (a palette "
                    "'P' PNG as in VOC, or an 8/16-bit grey PNG). Map each colour to its class id and save it "
                    "with mode 'P' or 'L'."
                )
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from e
    if arr.ndim != 2:
        raise DatasetError(f"mask {path} has shape {arr.shape}; expected a single-channel HxW image")
    return arr.astype(np.int64)


def mask_palette(path: str | os.PathLike, num_classes: int) -> list[list[int]] | None:
    """The RGB colour of each class id in a palette ("P") mask, as VOC ships them; None for grey masks."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            flat = im.getpalette() if im.mode == "P" else None
    except OSError:
        return None
    if not flat:
        return None
    flat = list(flat) + [0] * max(0, 3 * num_classes - len(flat))
    return [flat[3 * i:3 * i + 3] for i in range(num_classes)]


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def read_class_names(path: str | os.PathLike) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path} lists no class names (one per line, in class-id order)")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path} repeats a class name")
    return names


# ------------------------------------------------------------------------------------------------ layout


def _find_voc_root(root: Path) -> Path | None:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    return None



def _pair_with_masks(img_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by file stem; an image without a `.png` mask is an error naming it."""
    images = _image_by_stem(img_dir)
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = [s for s in images if s not in masks]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) in {img_dir} have no mask in {mask_dir}, e.g. {images[missing[0]].name} "
            f"(expected {mask_dir / (missing[0] + '.png')})"
        )
    return [(images[s], masks[s]) for s in sorted(images)]

def _image_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


SPLIT_ALIASES = {"val": ("val", "valid", "validation"), "train": ("train",), "test": ("test",)}


def _camvid_split(root: Path, split: str) -> tuple[Path, Path] | None:
    """CamVid's layout: DIR/<split>/ images beside DIR/<split>annot/ index masks (val: `val`, `valid`...)."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        if (root / name).is_dir() and (root / f"{name}annot").is_dir():
            return root / name, root / f"{name}annot"
    return None


def segmentation_layout(root: str | os.PathLike) -> str:
    """The layout `find_pairs` reads in `root`, in words (printed so the user sees what was detected)."""
    root = Path(root)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "images/<split> + masks/<split>"
    if any(_camvid_split(root, s) for s in ("train", "val", "test")):
        return "CamVid (<split>/ + <split>annot/)"
    if _find_voc_root(root) is not None:
        return "Pascal VOC (JPEGImages + SegmentationClass + ImageSets)"
    return "unknown"


def find_pairs(root: str | os.PathLike, split: str) -> tuple[list[tuple[Path, Path]], Path]:
    """(image, mask) paths for `split`, and the folder class-name files are looked up in."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        img_dir, mask_dir = root / "images" / split, root / "masks" / split
        if not img_dir.is_dir() or not mask_dir.is_dir():
            found = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
            raise DatasetError(
                f"{root}: no split {split!r} (expected images/{split} and masks/{split}; found images/{{{', '.join(found)}}})"
            )
        pairs = _pair_with_masks(img_dir, mask_dir)
        meta_dir = root
    elif (camvid := _camvid_split(root, split)) is not None:
        img_dir, mask_dir = camvid
        pairs = _pair_with_masks(img_dir, mask_dir)
        meta_dir = root
    elif (voc := _find_voc_root(root)) is not None:
        list_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        images = _image_by_stem(voc / "JPEGImages")
        if list_file.is_file():
            ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        else:
            available = sorted(p.stem for p in (voc / "ImageSets" / "Segmentation").glob("*.txt")) \
                if (voc / "ImageSets" / "Segmentation").is_dir() else []
            raise DatasetError(
                f"{voc}: no split list {list_file.relative_to(voc)} "
                f"({'available: ' + ', '.join(available) if available else 'no ImageSets/Segmentation folder'}); "
                f"write one image id per line, or use the images/{{train,val}} + masks/{{train,val}} layout"
            )
        pairs = []
        for i in ids:
            mask = voc / "SegmentationClass" / f"{i}.png"
            if i not in images or not mask.is_file():
                raise DatasetError(f"{list_file} lists {i!r}, but {'JPEGImages/' + i + '.jpg' if i not in images else mask} is missing")
            pairs.append((images[i], mask))
        meta_dir = root if any((root / f).is_file() for f in CLASS_FILES) else voc
    else:
        raise DatasetError(
            f"{root} is not a segmentation dataset (for split {split!r}): expected images/{{train,val}} + "
            "masks/{{train,val}} (PNG masks of class ids named like the images), CamVid's train/ + trainannot/, "
            "val/ + valannot/, or a Pascal VOC tree (JPEGImages, SegmentationClass, "
            "ImageSets/Segmentation). `--data synthetic` builds an example."
        )
    if not pairs:
        raise DatasetError(f"{root}: split {split!r} is empty")
    return pairs, meta_dir


def resolve_class_names(
    meta_dir: Path, num_classes: int | None = None, class_names: Sequence[str] | None = None
) -> list[str]:
    """Names from the argument, else classes.txt, else VOC's (VOC tree), else class0..N-1 for --num-classes."""
    names = list(class_names) if class_names else None
    if names is None:
        for f in CLASS_FILES:
            if (meta_dir / f).is_file():
                names = read_class_names(meta_dir / f)
                break
    if names is None and _find_voc_root(meta_dir) is not None:
        names = list(VOC_CLASSES)
    if names is None:
        if not num_classes:
            raise DatasetError(
                f"{meta_dir}: cannot tell the number of classes. Add classes.txt (one name per line, in id order, "
                "background first) or pass --num-classes"
            )
        names = [f"class{i}" for i in range(num_classes)]
    if num_classes and num_classes != len(names):
        raise DatasetError(
            f"--num-classes {num_classes} disagrees with the {len(names)} class names of {meta_dir}: "
            f"drop --num-classes or fix the class list"
        )
    return names


# ------------------------------------------------------------------------------------------- augmentation


def _resize(img: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    import cv2

    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img
    if nearest:  # class ids must never be interpolated into other ids
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def train_transform(
    img: np.ndarray,
    mask: np.ndarray,
    crop: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
    ignore_index: int = 255,
    hflip: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's segmentation recipe: resize the shorter side to crop*U(scale_range), pad to the crop
    (image with 0 after normalisation -> mean colour, mask with ignore_index), random crop, horizontal flip.
    Image bilinear, mask nearest, same geometry for both."""
    h, w = img.shape[:2]
    short = crop * rng.uniform(*scale_range)
    s = short / min(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    img = _resize(img, (nh, nw), nearest=False)
    mask = _resize(mask.astype(np.int32), (nh, nw), nearest=True)
    ph, pw = max(0, crop - nh), max(0, crop - nw)
    if ph or pw:
        mean = np.round(np.asarray(IMAGENET_MEAN) * 255).astype(img.dtype)
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        img[nh:, :] = mean
        img[:, nw:] = mean
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=ignore_index)
    y0 = int(rng.integers(0, img.shape[0] - crop + 1))
    x0 = int(rng.integers(0, img.shape[1] - crop + 1))
    img, mask = img[y0 : y0 + crop, x0 : x0 + crop], mask[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < hflip:
        img, mask = img[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def normalise(img_rgb: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32, (x/255 - mean) / std (the same as data.preprocess.to_input_tensor)."""
    x = img_rgb.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- dataset


class SegmentationDataset(Dataset):
    """(image, mask) pairs. Training items are augmented crops of `imgsz`; eval items (`eval_item`) are the
    image resized to imgsz x imgsz (what a fixed-shape engine sees) with the mask at its original resolution.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        imgsz: int,
        train: bool = False,
        ignore_index: int = 255,
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        if imgsz < 32:
            raise DatasetError(f"imgsz {imgsz} is too small for a stride-16 segmenter; use >= 32")
        if 0 <= ignore_index < len(class_names):
            raise DatasetError(
                f"ignore index {ignore_index} is a class id (there are {len(class_names)} classes); use 255 or -1"
            )
        self.pairs = list(pairs)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.imgsz = int(imgsz)
        self.train = train
        self.ignore_index = int(ignore_index)
        self.scale_range = scale_range
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.epoch = 0  # set by the trainer: augmentation differs per epoch but is reproducible
        self.root: Path | None = None  # set by open_segmentation_data: the dataset folder, its layout in words,
        self.layout = ""  # and the class list the folder itself carries (None: it has none)
        self.own_class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (RGB uint8) and mask (int64 ids), checked: same size, ids in range or ignore."""
        img_path, mask_path = self.pairs[i]
        img, mask = read_rgb(img_path), read_mask(mask_path)
        if img.shape[:2] != mask.shape:
            raise DatasetError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {img_path} is "
                f"{img.shape[1]}x{img.shape[0]}: masks must have their image's size"
            )
        self._check_values(mask, mask_path)
        return img, mask

    def _check_values(self, mask: np.ndarray, mask_path: Path) -> None:
        valid = ((mask >= 0) & (mask < self.num_classes)) | (mask == self.ignore_index)
        if valid.all():
            return
        bad = [int(v) for v in np.unique(mask[~valid])]
        raise DatasetError(
            f"mask {mask_path} holds value(s) {bad[:10]} outside the {self.num_classes} classes "
            f"(ids 0..{self.num_classes - 1}, ignore index {self.ignore_index}) in {int((~valid).sum())} pixel(s). "
            "Check the class list (classes.txt / --num-classes) or the --ignore-index of this dataset."
        )

    def check(self, progress: bool = True, desc: str = "checking masks") -> None:
        """Read every pair once and raise on the first problem (before any training time is spent)."""
        from tqdm import tqdm

        for i in tqdm(range(len(self)), desc=desc, unit="img", disable=not progress, leave=False):
            img_path, mask_path = self.pairs[i]
            mask = read_mask(mask_path)
            hw = image_size(img_path)
            if hw != mask.shape:
                raise DatasetError(
                    f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {img_path} is "
                    f"{hw[1]}x{hw[0]}: masks must have their image's size"
                )
            self._check_values(mask, mask_path)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.load(i)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img, mask = train_transform(img, mask, self.imgsz, rng, self.scale_range, self.ignore_index)
        else:
            img = _resize(img, (self.imgsz, self.imgsz), nearest=False)
            mask = _resize(mask.astype(np.int32), (self.imgsz, self.imgsz), nearest=True)
        return torch.from_numpy(normalise(img, self.mean, self.std)), torch.from_numpy(mask.astype(np.int64))

    def eval_item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(3, imgsz, imgsz) float32 network input, (H, W) int64 mask at the image's own resolution."""
        img, mask = self.load(i)
        return normalise(_resize(img, (self.imgsz, self.imgsz), nearest=False), self.mean, self.std), mask


def open_segmentation_data(
    source: str | os.PathLike,
    split: str = "train",
    imgsz: int = 520,
    train: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
    seed: int = 0,
    synthetic_kwargs: dict | None = None,
    **kwargs,
) -> SegmentationDataset:
    """A dataset folder (see module docstring) or `"synthetic"` (built once, then reused) -> SegmentationDataset."""
    if str(source) == "synthetic":
        from edgedeploy.data.synthetic_segment import make_synthetic_segmentation

        source = make_synthetic_segmentation(**(synthetic_kwargs or {}))
    pairs, meta_dir = find_pairs(source, split)
    names = resolve_class_names(meta_dir, num_classes, class_names)
    ds = SegmentationDataset(pairs, names, imgsz, train=train, ignore_index=ignore_index, seed=seed, **kwargs)
    ds.root = Path(source).resolve()
    ds.layout = segmentation_layout(source)
    ds.own_class_names = dataset_class_names(meta_dir)
    return ds


def dataset_class_names(meta_dir: str | os.PathLike) -> list[str] | None:
    """The class list the dataset itself carries (classes.txt ..., VOC's names), None when it has none."""
    meta_dir = Path(meta_dir)
    for f in CLASS_FILES:
        if (meta_dir / f).is_file():
            return read_class_names(meta_dir / f)
    return list(VOC_CLASSES) if _find_voc_root(meta_dir) is not None else None


def dataset_summary(ds: SegmentationDataset) -> str:
    return (f"{len(ds)} images, {ds.num_classes} classes ({', '.join(ds.class_names[:6])}"
            f"{', ...' if ds.num_classes > 6 else ''}), ignore index {ds.ignore_index}")


__all__ = [
    "SegmentationDataset",
    "VOC_CLASSES",
    "dataset_summary",
    "find_pairs",
    "open_segmentation_data",
    "read_mask",
    "read_rgb",
    "resolve_class_names",
    "train_transform",
    "voc_palette",
]
