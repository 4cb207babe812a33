"""Detection datasets in the YOLO txt layout, and the in-memory form every detection dataset takes.

Layout (Ultralytics/YOLOv5 convention):

    DIR/images/train/*.jpg   DIR/labels/train/*.txt   (one `cls cx cy w h` line per object, normalised 0..1)
    DIR/images/val/...       DIR/labels/val/...
    DIR/data.yaml (`names: [...]` or `names: {0: ...}`) or DIR/classes.txt (one name per line)

`DIR/train/images` + `DIR/train/labels` (Roboflow export) is accepted too. An image without a label file is a
background image; a label file without an image is ignored with a warning; a malformed or out-of-range label
line is reported as `file:line: reason` and skipped; an unreadable or zero-size image is skipped and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgedeploy.errors import DatasetError

log = logging.getLogger("edgedeploy.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_ALIASES = {"val": ("val", "valid", "validation"), "train": ("train",), "test": ("test",)}
_EDGE_TOLERANCE = 1e-3  # exporters round; a box edge at -0.0004 is not an error


@dataclass
class DetectionRecord:
    """One image and its objects; boxes are x1, y1, x2, y2 in original-image pixels."""

    image_id: int
    path: Path
    width: int
    height: int
    classes: np.ndarray  # int64 [N]
    boxes: np.ndarray  # float32 [N, 4]


@dataclass
class DatasetIssue:
    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line is not None else f"{self.path}: {self.message}"


@dataclass
class DetectionDataset:
    """Records plus class names. Augmentation, training and COCO evaluation all consume this one form."""

    records: list[DetectionRecord]
    names: list[str]
    root: Path
    split: str
    issues: list[DatasetIssue] = field(default_factory=list)
    skipped_images: int = 0  # unreadable / zero-size images left out
    format: str = "yolo"
    layout: str = ""  # how the layout was detected, for the screen: "Ultralytics data YAML data.yaml", ...

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionRecord:
        return self.records[index]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_objects(self) -> int:
        return int(sum(len(r.classes) for r in self.records))

    @property
    def num_background(self) -> int:
        return sum(1 for r in self.records if len(r.classes) == 0)

    def load_image(self, index: int) -> np.ndarray:
        """HWC uint8 BGR image. An image that became unreadable after indexing raises a DatasetError."""
        import cv2

        path = self.records[index].path
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None or img.size == 0:
            raise DatasetError(f"cannot read image {path} (deleted or corrupted after the dataset was indexed)")
        return img

    def summary(self) -> str:
        text = (
            f"{self.format} {self.split}: {len(self)} images, {self.num_objects} objects, "
            f"{self.num_background} background, {self.num_classes} classes"
        )
        if self.skipped_images:
            text += f", {self.skipped_images} unreadable images skipped"
        if self.issues:
            text += f", {len(self.issues)} label problems (see warnings)"
        return text


DATA_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml")


def _names_from(value, path: Path) -> list[str]:
    """Class names from a YAML `names:` value: a list, or an {id: name} mapping with ids 0..N-1."""
    if isinstance(value, dict):
        try:
            ids = sorted(int(k) for k in value)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path}: `names` keys must be class ids (0, 1, ...)") from e
        if ids != list(range(len(ids))):
            raise DatasetError(f"{path}: class ids in `names` must be 0..{len(ids) - 1} without gaps, got {ids}")
        return [str(value[k] if k in value else value[str(k)]) for k in ids]
    if isinstance(value, list) and value:
        return [str(n) for n in value]
    raise DatasetError(f"{path}: needs a `names:` list (or {{id: name}} mapping) of class names")


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())  # safe_load: a data file never runs code
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{path}: not readable YAML: {e}") from e
    return cfg if isinstance(cfg, dict) else {}


def find_data_yaml(root: str | os.PathLike) -> Path | None:
    """An Ultralytics data YAML: the file itself, DIR/data.yaml (dataset.yaml, data.yml), or the one YAML in DIR
    with `names` and a `train` or `val` key (e.g. coco8.yaml)."""
    root = Path(root)
    if root.is_file():
        return root if root.suffix.lower() in (".yaml", ".yml") else None
    if not root.is_dir():
        return None
    def is_spec(p: Path) -> bool:  # a data.yaml with `names` only just lists the classes of a YOLO folder
        cfg = _load_yaml(p)
        return "names" in cfg and ("train" in cfg or "val" in cfg)

    for name in DATA_YAML_NAMES:
        if (root / name).is_file():
            return root / name if is_spec(root / name) else None
    found = [p for p in sorted(root.glob("*.y*ml")) if p.suffix.lower() in (".yaml", ".yml") and is_spec(p)]
    return found[0] if len(found) == 1 else None


@dataclass
class DataYaml:
    """An Ultralytics data YAML resolved: dataset root, the images folder of each split, class names."""

    file: Path
    root: Path
    splits: dict[str, Path]
    names: list[str]

    def images_dir(self, split: str) -> Path:
        for name in SPLIT_ALIASES.get(split, (split,)):
            if name in self.splits:
                return self.splits[name]
        raise DatasetError(
            f"{self.file} has no `{split}:` entry (it lists {', '.join(sorted(self.splits)) or 'no splits'}): add "
            f"`{split}: images/<folder>` pointing at that split's images"
        )


def labels_dir_for(images_dir: Path) -> Path:
    """Ultralytics' rule: the labels of `.../images/<split>` are in `.../labels/<split>` (last `images` swapped)."""
    parts = list(images_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return images_dir.parent / "labels" if images_dir.name == "images" else images_dir / "labels"


def read_data_yaml(path: str | os.PathLike) -> DataYaml:
    """Parse an Ultralytics data YAML (`path`, `train`, `val`, `test`, `names`); every split folder it names must
    exist. `path` is relative to the YAML's folder (absent: the YAML's folder); split entries relative to `path`."""
    path = Path(path).resolve()
    cfg = _load_yaml(path)
    if "names" not in cfg:
        raise DatasetError(f"{path}: not an Ultralytics data YAML (no `names:`); expected keys path, train, val, names")
    names = _names_from(cfg["names"], path)
    base = cfg.get("path")
    root = path.parent if not base else (Path(str(base)) if Path(str(base)).is_absolute() else path.parent / str(base))
    root = root.resolve()
    splits: dict[str, Path] = {}
    for key in ("train", "val", "test"):
        value = cfg.get(key)
        if value in (None, ""):
            continue
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else None
        if not isinstance(value, str):
            raise DatasetError(f"{path}: `{key}:` must be one folder of images (lists of folders are not supported)")
        folder = Path(value) if Path(value).is_absolute() else root / value
        if folder.suffix == ".txt":
            raise DatasetError(f"{path}: `{key}: {value}` is an image list file; point `{key}:` at the images folder")
        if not folder.is_dir():
            raise DatasetError(
                f"{path}: `{key}: {value}` -> {folder} does not exist. Fix `path:` (now {base or '(unset)'}, "
                f"relative to {path.parent}) or `{key}:` so it names the folder of {key} images"
            )
        splits[key] = folder
    if not splits:
        raise DatasetError(f"{path}: no `train:`/`val:` folder given")
    return DataYaml(path, root, splits, names)


def read_class_names(root: str | os.PathLike) -> list[str] | None:
    """Names from DIR/data.yaml (`names` list or {id: name}) or DIR/classes.txt; None when neither exists."""
    root = Path(root)
    for yaml_name in DATA_YAML_NAMES:
        path = root / yaml_name
        if path.is_file():
            cfg = _load_yaml(path)
            if "names" in cfg:
                return _names_from(cfg["names"], path)
    path = root / "classes.txt"
    if path.is_file():
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not names:
            raise DatasetError(f"{path} is empty: write one class name per line")
        return names
    return None


def find_yolo_split(root: str | os.PathLike, split: str) -> tuple[Path, Path] | None:
    """(images_dir, labels_dir) of `split` under `root`, or None when the YOLO layout is not there. A data YAML
    in `root` decides; else `images/<split>` (or a folder named like it, e.g. `images/train2017`) beside
    `labels/<same>`, or the Roboflow `<split>/images`."""
    root = Path(root)
    spec = find_data_yaml(root)
    if spec is not None:
        data = read_data_yaml(spec)
        if any(name in data.splits for name in SPLIT_ALIASES.get(split, (split,))) or not (root / "images" / split).is_dir():
            images = data.images_dir(split)
            return images, labels_dir_for(images)
    for name in SPLIT_ALIASES.get(split, (split,)):
        for images, labels in ((root / "images" / name, root / "labels" / name), (root / name / "images", root / name / "labels")):
            if images.is_dir():
                return images, labels
    if (root / "images").is_dir():  # `train2017`, `val2017`: the split name followed by a year or tag
        for name in SPLIT_ALIASES.get(split, (split,)):
            cands = sorted(d for d in (root / "images").iterdir() if d.is_dir() and d.name.startswith(name)
                           and (root / "labels" / d.name).is_dir())
            if cands:
                return cands[0], root / "labels" / cands[0].name
    return None


def parse_label_file(path: Path, num_classes: int | None) -> tuple[np.ndarray, list[DatasetIssue]]:
    """Rows of (cls, cx, cy, w, h) from a YOLO label file; bad lines come back as issues, not rows."""
    rows: list[list[float]] = []
    issues: list[DatasetIssue] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return np.zeros((0, 5), np.float32), [DatasetIssue(path, None, f"cannot read label file: {e}")]
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            issues.append(DatasetIssue(path, lineno, f"expected 5 values `cls cx cy w h`, got {len(fields)}: {line.strip()!r}"))
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            issues.append(DatasetIssue(path, lineno, f"not a number: {line.strip()!r}"))
            continue
        cls, cx, cy, w, h = values
        problem = _check_label(cls, cx, cy, w, h, num_classes)
        if problem:
            issues.append(DatasetIssue(path, lineno, f"{problem}: {line.strip()!r}"))
            continue
        rows.append(values)
    return (np.asarray(rows, np.float32).reshape(-1, 5), issues)


def _check_label(cls: float, cx: float, cy: float, w: float, h: float, num_classes: int | None) -> str | None:
    if not np.isfinite([cls, cx, cy, w, h]).all():
        return "non-finite value"
    if cls != int(cls) or cls < 0:
        return f"class id {cls:g} is not a non-negative integer"
    if num_classes is not None and cls >= num_classes:
        return f"class id {int(cls)} out of range (dataset has {num_classes} classes: 0..{num_classes - 1})"
    if w <= 0 or h <= 0:
        return "box width and height must be > 0"
    tol = _EDGE_TOLERANCE
    if cx - w / 2 < -tol or cy - h / 2 < -tol or cx + w / 2 > 1 + tol or cy + h / 2 > 1 + tol:
        return "box outside the image (values are normalised: every edge must lie in 0..1)"
    return None


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from the file header, or None for an empty or unreadable image."""
    try:
        if path.stat().st_size == 0:
            return None
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        return (w, h) if w > 0 and h > 0 else None
    except Exception:  # PIL raises many types for truncated/non-image files
        return None


def load_yolo_dataset(root: str | os.PathLike, split: str = "train", names: list[str] | None = None) -> DetectionDataset:
    """Index a YOLO-txt split: read image sizes and labels, report problems, keep what is usable."""
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir() and find_data_yaml(root) is None:
        raise DatasetError(f"dataset folder not found: {root}")
    found = find_yolo_split(root, split)
    if found is None:
        raise DatasetError(
            f"no `{split}` split in {root}: expected {root}/images/{split}/ with labels in {root}/labels/{split}/ "
            f"(or {root}/{split}/images + {root}/{split}/labels)"
        )
    images_dir, labels_dir = found
    spec = find_data_yaml(root)
    names = names or (read_data_yaml(spec).names if spec is not None else read_class_names(root))
    all_files = sorted(p for p in images_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    image_paths = [p for p in all_files if p.suffix.lower() in IMAGE_EXTENSIONS]
    other_formats = [p for p in all_files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not image_paths:
        raise DatasetError(f"{images_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if not labels_dir.is_dir() or not any(labels_dir.rglob("*.txt")):
        raise DatasetError(
            f"{images_dir} holds {len(image_paths)} images but there are no label files in {labels_dir}: a "
            f"detection split needs one `cls cx cy w h` .txt per image in {labels_dir} (same name as the image); "
            "images without objects may have an empty .txt"
        )

    records: list[DetectionRecord] = []
    issues: list[DatasetIssue] = [DatasetIssue(p, None, f"{p.suffix or 'no suffix'}: not an image format read here "
                                               f"({', '.join(IMAGE_EXTENSIONS)}), skipped") for p in other_formats]
    skipped = len(other_formats)
    used_labels: set[Path] = set()
    max_cls = -1
    for path in tqdm(image_paths, desc=f"index {split}", unit="img", leave=False, disable=len(image_paths) < 500):
        label_path = (labels_dir / path.relative_to(images_dir)).with_suffix(".txt")
        used_labels.add(label_path)
        size = _image_size(path)
        if size is None:
            skipped += 1
            issues.append(DatasetIssue(path, None, "empty or unreadable image, skipped"))
            continue
        w, h = size
        rows, bad = parse_label_file(label_path, len(names) if names else None) if label_path.is_file() else (np.zeros((0, 5), np.float32), [])
        issues += bad
        cls = rows[:, 0].astype(np.int64)
        max_cls = max(max_cls, int(cls.max()) if len(cls) else -1)
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1).astype(np.float32)
        boxes = boxes.clip(0, [w, h, w, h]).astype(np.float32)
        records.append(DetectionRecord(len(records) + 1, path, w, h, cls, boxes))  # COCO ids start at 1

    orphans = sorted(p for p in labels_dir.rglob("*.txt") if p not in used_labels) if labels_dir.is_dir() else []
    if orphans:
        issues += [DatasetIssue(p, None, "label file without an image, ignored") for p in orphans]
    if not records:
        raise DatasetError(f"no readable images in {images_dir} ({skipped} empty or unreadable)")
    if names is None:
        names = [f"class{i}" for i in range(max_cls + 1)] or ["class0"]
        log.warning("%s has no data.yaml or classes.txt: using %d generic class names", root, len(names))
    _log_issues(issues, split)
    layout = f"Ultralytics data YAML {spec.name}" if spec is not None else "YOLO txt"
    ds = DetectionDataset(records, list(names), root if spec is None else read_data_yaml(spec).root, split, issues,
                          skipped, "yolo")
    ds.layout = layout
    return ds


def _log_issues(issues: list[DatasetIssue], split: str, shown: int = 10) -> None:
    for issue in issues[:shown]:
        log.warning("%s", issue)
    if len(issues) > shown:
        log.warning("... and %d more problems in the %s split", len(issues) - shown, split)
