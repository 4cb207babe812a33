"""Where a model's data is: what a checkpoint or sidecar records, the layout found in a folder, and the image
files of one split. Shared by `deploy export` (calibration and held-out accuracy) and `deploy eval`.

A checkpoint records its dataset as an absolute path (`data`) and as typed (`data_as_typed`), so export and eval
find it from any working directory. When the recorded folder is gone, the caller stops with an error naming
the path and the flag that replaces it: nothing silently falls back to the built-in synthetic set, which is
used only when asked for (`synthetic`) or for a model trained on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edgedeploy.errors import DatasetError

SYNTHETIC = "synthetic"


def record_data(data: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, str]:
    """Checkpoint meta fields for the dataset a run trained on: `data` absolute (or "synthetic"), `data_as_typed`,
    `data_layout`. `root` is the folder actually read when it differs from `data` (a generated synthetic set)."""
    typed = str(data)
    if typed.lower() == SYNTHETIC:
        return {"data": str(Path(root).resolve()) if root else SYNTHETIC, "data_as_typed": typed,
                "data_layout": "synthetic (generated)"}
    resolved = Path(root if root is not None else data).resolve()
    return {"data": str(resolved), "data_as_typed": typed, "data_layout": describe_layout(resolved)}


def trained_on_synthetic(meta: Mapping[str, Any]) -> bool:
    train_args = meta.get("train_args") or {}
    return (str(meta.get("data", "")).lower() == SYNTHETIC or str(meta.get("data_as_typed", "")).lower() == SYNTHETIC
            or str(train_args.get("data", "")).lower() == SYNTHETIC)


@dataclass
class Recorded:
    """The recorded training data of an artifact: `path` (absolute, may be missing), as typed, whether it exists."""

    path: str | None
    as_typed: str | None
    synthetic: bool

    @property
    def found(self) -> bool:
        return self.path is not None and self.path.lower() != SYNTHETIC and Path(self.path).exists()


def recorded_data(meta: Mapping[str, Any]) -> Recorded:
    data = meta.get("data")
    return Recorded(str(data) if data else None, meta.get("data_as_typed") or (str(data) if data else None),
                    trained_on_synthetic(meta))


def missing_data_error(artifact: str | os.PathLike, rec: Recorded, flags: str) -> DatasetError:
    """The error for recorded data that is not there (or not recorded): names the path and the flag to pass."""
    if rec.path is None:
        return DatasetError(f"{artifact} does not record the dataset it was trained on: pass {flags}")
    typed = f" (typed at training as {rec.as_typed!r})" if rec.as_typed and rec.as_typed != rec.path else ""
    return DatasetError(
        f"the training data recorded in {artifact}, {rec.path}{typed}, is not there: pass {flags}. "
        "Nothing falls back to synthetic images on its own."
    )


# ------------------------------------------------------------------------------------------------- layouts


def describe_layout(path: str | os.PathLike) -> str:
    """The dataset layout found in `path`, in words ("ImageFolder train/ val/", "Ultralytics data YAML ...")."""
    path = Path(path)
    if str(path).lower() == SYNTHETIC:
        return "synthetic (generated)"
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            return f"Ultralytics data YAML {path.name}"
        if path.suffix.lower() == ".json":
            return f"COCO json {path.name}"
        return "file"
    if not path.is_dir():
        return "missing"
    from edgedeploy.data.coco import find_coco_split
    from edgedeploy.data.voc import segmentation_layout
    from edgedeploy.data.yolo_format import find_data_yaml

    spec = find_data_yaml(path)
    if spec is not None:
        return f"Ultralytics data YAML {spec.name}"
    if find_coco_split(path, "train") or find_coco_split(path, "val"):
        return "COCO json (annotations/instances_<split>.json)"
    seg = segmentation_layout(path)
    if seg != "unknown":
        return seg
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "YOLO txt (images/<split> + labels/<split>)"
    if (path / "train").is_dir() and any(d.is_dir() for d in (path / "train").iterdir()):
        return "ImageFolder (train/<class>/, val/<class>/)"
    return "folder of images"


# ----------------------------------------------------------------------------------------- split images


def split_images(root: str | os.PathLike, task: str, split: str) -> tuple[list[Path], Path, str]:
    """(image files, their folder, layout in words) of `split` in the dataset at `root`, in any supported layout
    for `task`. Raises DatasetError when the split is not there."""
    from edgedeploy.data.imagefolder import IMAGE_EXTENSIONS, find_split_dir

    root = Path(root)

    def files_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    if task == "classify":
        folder = find_split_dir(root, split)
        return files_in(folder), folder, "ImageFolder"
    if task == "detect":
        from edgedeploy.data.coco import find_coco_split
        from edgedeploy.data.yolo_format import find_yolo_split

        coco = None if root.is_file() else find_coco_split(root, split)
        if coco is not None:
            return files_in(coco[1]), coco[1], f"COCO json {coco[0].name}"
        found = find_yolo_split(root, split)
        if found is None:
            raise DatasetError(f"{root}: no {split} split (expected images/{split} + labels/{split}, a data YAML "
                               f"with `{split}:`, or annotations/instances_{split}.json)")
        return files_in(found[0]), found[0], describe_layout(root)
    if task == "segment":
        from edgedeploy.data.voc import find_pairs

        pairs, _ = find_pairs(root, split)
        return [img for img, _ in pairs], pairs[0][0].parent, describe_layout(root)
    raise DatasetError(f"no dataset layout known for task {task!r}")


def open_detection_dataset(path: str | os.PathLike, split: str = "train"):
    """Open `split` of a YOLO-txt or COCO-json dataset folder (detected from its layout), or a COCO json file."""
    from edgedeploy.data.coco import find_coco_split, load_coco_dataset
    from edgedeploy.data.yolo_format import find_yolo_split, load_yolo_dataset

    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return load_coco_dataset(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path} (a YOLO/COCO folder, a COCO .json file, or `synthetic`)")
    coco = find_coco_split(path, split)  # checked first: COCO's images/<split> looks like half a YOLO layout
    if coco is not None:
        return load_coco_dataset(*coco, split=split)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return load_yolo_dataset(path, split)
    if find_yolo_split(path, split) is not None:
        return load_yolo_dataset(path, split)
    raise DatasetError(
        f"{path} is neither a YOLO dataset (images/{split} + labels/{split}) nor a COCO dataset "
        f"(annotations/instances_{split}.json + images); see docs/DETECTION.md for both layouts"
    )


def open_detection_data(data: str | os.PathLike, split: str, imgsz: int, synthetic: dict[str, Any] | None = None):
    """`open_detection_dataset`, or the built-in `synthetic` set when `data` is "synthetic" (`synthetic`: keyword
    arguments of `synthetic_detection_dataset`, e.g. num_train, num_val, seed)."""
    if str(data).lower() == "synthetic":
        from edgedeploy.data.synthetic_detect import synthetic_detection_dataset
        from edgedeploy.data.yolo_format import load_yolo_dataset

        return load_yolo_dataset(synthetic_detection_dataset(**{"imgsz": imgsz, **(synthetic or {})}), split)
    return open_detection_dataset(data, split)


__all__ = ["Recorded", "SYNTHETIC", "describe_layout", "missing_data_error", "open_detection_data", "open_detection_dataset", "record_data", "recorded_data",
           "split_images", "trained_on_synthetic"]
