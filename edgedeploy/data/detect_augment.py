"""Detection training/eval samples: 4-image mosaic, HSV jitter, horizontal flip, letterbox, and the collate
that builds the `[M, 6]` targets (image_index, class, cx, cy, w, h normalised to the network input).

Geometric transforms are scale + translation only (no rotation or shear), so boxes transform exactly and a
box after augmentation still encloses exactly the pixels of its object (what the mosaic test checks).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from edgedeploy.data.preprocess import LETTERBOX_PAD, letterbox
from edgedeploy.data.yolo_format import DetectionDataset

MIN_BOX_SIDE = 2.0  # pixels: slivers left after cropping are dropped (YOLOv5's box_candidates wh_thr)
MIN_VISIBLE = 0.2  # fraction of a box's area that must survive the crop


def load_resized(dataset: DetectionDataset, index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image resized so its long side is `size` (no padding), with classes and boxes scaled alike."""
    import cv2

    img = dataset.load_image(index)
    rec = dataset[index]
    h, w = img.shape[:2]
    r = size / max(h, w)
    if r != 1:
        img = cv2.resize(img, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    sx, sy = img.shape[1] / w, img.shape[0] / h
    return img, rec.classes.copy(), rec.boxes * np.array([sx, sy, sx, sy], np.float32)


def filter_boxes(classes: np.ndarray, boxes: np.ndarray, before: np.ndarray, width: int, height: int):
    """Clip boxes to the image; drop slivers and boxes mostly cut away (`before` = unclipped boxes)."""
    clipped = boxes.clip(0, [width, height, width, height])
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area_before = (before[:, 2] - before[:, 0]) * (before[:, 3] - before[:, 1])
    keep = (w > MIN_BOX_SIDE) & (h > MIN_BOX_SIDE) & (w * h > MIN_VISIBLE * np.maximum(area_before, 1e-6))
    return classes[keep], clipped[keep].astype(np.float32)


def mosaic4(
    dataset: DetectionDataset, indices: list[int], size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.5)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four images around a random centre on a 2*size canvas, then a random scale/translate crop to size x size."""
    import cv2

    canvas = np.full((2 * size, 2 * size, 3), LETTERBOX_PAD, np.uint8)
    xc, yc = (int(v) for v in rng.uniform(0.5 * size, 1.5 * size, size=2))
    all_cls, all_boxes = [], []
    for k, index in enumerate(indices):
        img, cls, boxes = load_resized(dataset, index, size)
        h, w = img.shape[:2]
        # Corner of the canvas where this tile goes: top-left, top-right, bottom-left, bottom-right of the centre.
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, 2 * size), min(y0 + h, 2 * size)
        canvas[cy0:cy1, cx0:cx1] = img[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        shifted = boxes + np.array([x0, y0, x0, y0], np.float32)
        c, b = filter_boxes_region(cls, shifted, (cx0, cy0, cx1, cy1))
        all_cls.append(c)
        all_boxes.append(b)
    cls = np.concatenate(all_cls) if all_cls else np.zeros(0, np.int64)
    boxes = np.concatenate(all_boxes).reshape(-1, 4) if all_boxes else np.zeros((0, 4), np.float32)

    # Random zoom about the canvas centre and a small shift, then crop the central size x size window.
    s = rng.uniform(*scale)
    tx, ty = rng.uniform(-0.1, 0.1, size=2) * size
    m = np.array([[s, 0, size / 2 - s * size + tx], [0, s, size / 2 - s * size + ty]], np.float32)
    out = cv2.warpAffine(canvas, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=(LETTERBOX_PAD,) * 3)
    moved = boxes * s + np.array([m[0, 2], m[1, 2], m[0, 2], m[1, 2]], np.float32)
    cls, boxes = filter_boxes(cls, moved, moved, size, size)
    return out, cls, boxes


def filter_boxes_region(cls: np.ndarray, boxes: np.ndarray, region: tuple[int, int, int, int]):
    """Keep the part of each box inside `region` (x0, y0, x1, y1) of the canvas, dropping slivers."""
    x0, y0, x1, y1 = region
    clipped = np.stack(
        [boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1), boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)], 1
    ).astype(np.float32)
    before = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (w > MIN_BOX_SIDE) & (h > MIN_BOX_SIDE) & (w * h > MIN_VISIBLE * np.maximum(before, 1e-6))
    return cls[keep], clipped[keep]


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.015, sgain: float = 0.7, vgain: float = 0.4) -> np.ndarray:
    """Random hue/saturation/value gains through lookup tables (YOLOv5's defaults). Returns a new BGR image."""
    import cv2

    gains = rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    flipped = boxes.copy()
    flipped[:, [0, 2]] = w - boxes[:, [2, 0]]
    return np.ascontiguousarray(img[:, ::-1]), flipped


def letterbox_sample(dataset: DetectionDataset, index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, tuple[int, int]]:
    """The eval/deploy view of a sample: letterboxed image (same function as the runtime) and its boxes."""
    img = dataset.load_image(index)
    rec = dataset[index]
    out, scale, (px, py) = letterbox(img, size)
    boxes = rec.boxes * scale + np.array([px, py, px, py], np.float32)
    return out, rec.classes.copy(), boxes.astype(np.float32), scale, (px, py)


class DetectionTrainSet(Dataset):
    """Training samples: (image [3, S, S] float RGB in 0..1, labels [n, 5] = class, cx, cy, w, h normalised).

    Randomness is seeded from (seed, epoch, index), so runs are reproducible and DataLoader workers never
    share a stream. Call `set_epoch` each epoch and `close_mosaic()` for the final plain-letterbox epochs.
    """

    def __init__(
        self,
        dataset: DetectionDataset,
        imgsz: int,
        augment: bool = True,
        mosaic: float = 1.0,
        hsv: bool = True,
        flip: float = 0.5,
        seed: int = 0,
        convention=None,  # InputConvention of the weights (e.g. BGR 0-255 for official YOLOX); None: RGB / 255
    ):
        self.dataset = dataset
        self.convention = convention
        self.imgsz = int(imgsz)
        self.augment = augment
        self.mosaic = mosaic if augment else 0.0
        self.hsv = hsv and augment
        self.flip = flip if augment else 0.0
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close_mosaic(self) -> None:
        self.mosaic = 0.0

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(BGR uint8 image S x S, classes [n], boxes [n, 4] xyxy pixels) after augmentation."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.mosaic > 0 and rng.random() < self.mosaic:
            others = rng.integers(0, len(self.dataset), size=3).tolist()
            img, cls, boxes = mosaic4(self.dataset, [index, *others], self.imgsz, rng)
        else:
            img, cls, boxes, _, _ = letterbox_sample(self.dataset, index, self.imgsz)
        if self.hsv:
            img = augment_hsv(img, rng)
        if self.flip > 0 and rng.random() < self.flip:
            img, boxes = hflip(img, boxes)
        return img, cls, boxes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, cls, boxes = self.sample(index)
        s = float(self.imgsz)
        cxcywh = np.stack(
            [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1
        ).reshape(-1, 4) / s
        labels = np.concatenate([cls.reshape(-1, 1).astype(np.float32), cxcywh.astype(np.float32)], 1)
        c = self.convention
        if c is None:
            x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).float().div_(255.0)
        else:  # channel order, scale and mean/std of the weights' convention (the geometry is the augmentation's)
            chw = (img[:, :, ::-1] if c.channel_order == "rgb" else img).transpose(2, 0, 1)
            x = torch.from_numpy(np.ascontiguousarray(chw)).float().mul_(c.scale)
            x = (x - torch.tensor(c.mean).view(3, 1, 1)) / torch.tensor(c.std).view(3, 1, 1)
        return x, torch.from_numpy(labels)


def collate_detection(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images; concatenate labels with their image index in front -> targets [M, 6]."""
    images = torch.stack([b[0] for b in batch])
    targets = [torch.cat([torch.full((len(b[1]), 1), float(i)), b[1]], 1) for i, b in enumerate(batch)]
    return images, torch.cat(targets) if targets else torch.zeros((0, 6))


class LetterboxEvalSet(Dataset):
    """Evaluation inputs exactly as deployment sees them: (x [3, S, S] normalised, index, scale, pad_x, pad_y)."""

    def __init__(self, dataset: DetectionDataset, imgsz: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 convention=None):
        self.dataset, self.imgsz, self.mean, self.std = dataset, int(imgsz), mean, std
        self.convention = convention  # InputConvention; overrides mean/std (RGB, /255, centred letterbox)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from edgedeploy.data.preprocess import to_input_tensor

        x, scale, (px, py) = to_input_tensor(self.dataset.load_image(index), self.imgsz, self.mean, self.std, letterboxed=True,
                                             convention=self.convention)
        return torch.from_numpy(x[0]), index, scale, px, py
