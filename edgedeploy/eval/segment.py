"""Segmentation metrics (pixel accuracy, mean class accuracy, mIoU) and one evaluation loop for every backend.

`evaluate_segmenter(predict_fn, dataset)` only needs a callable mapping a normalised float32 NCHW batch to
logits (N, C, h, w) or class ids (N, h, w) (`edgedeploy.eval.predictors`): a PyTorch checkpoint, an ONNX file
and a TensorRT engine are all scored by the same code, at each image's original resolution (predictions are resized back, logits
bilinearly, class ids nearest), as torchvision's reference evaluates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgedeploy.errors import EdgeDeployError
from edgedeploy.eval.predictors import PredictFn  # (N, 3, H, W) float32 -> logits (N, C, h, w) or ids (N, h, w)
from edgedeploy.eval.request import EvalRequest
from edgedeploy.tasks import SEGMENT


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose target is `ignore_index` (or otherwise outside [0, num_classes)) are not counted.
    """
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    if pred.numel() != target.numel():
        raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    pred, target = pred[keep], target[keep]
    # a prediction outside the class range (a bug upstream) must not be silently folded into another class
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predicted class ids must lie in [0, {num_classes}), got {int(pred.min())}..{int(pred.max())}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass
class SegmentationScores:
    pixel_acc: float  # correctly labelled pixels / labelled pixels
    mean_acc: float  # mean over classes present in the ground truth of per-class recall
    miou: float  # mean over classes that occur (in target or prediction) of TP / (TP + FP + FN)
    iou: list[float]  # per class, NaN where the class occurs in neither target nor prediction
    acc: list[float]  # per-class recall, NaN where the class is absent from the ground truth
    pixels: int  # labelled pixels counted
    class_names: list[str] = field(default_factory=list)

    def as_dict(self, per_class: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"pixel_acc": self.pixel_acc, "mean_acc": self.mean_acc, "miou": self.miou,
                             "pixels": self.pixels}
        if per_class:
            names = self.class_names or [str(i) for i in range(len(self.iou))]
            d["iou"] = {n: (None if math.isnan(v) else v) for n, v in zip(names, self.iou)}
        return d

    def table(self) -> str:
        names = self.class_names or [str(i) for i in range(len(self.iou))]
        width = max([len(n) for n in names] + [5])
        rows = [f"{'class':<{width}}  {'IoU':>7}  {'acc':>7}"]
        for n, iou, acc in zip(names, self.iou, self.acc):
            rows.append(f"{n:<{width}}  {_pct(iou):>7}  {_pct(acc):>7}")
        rows.append(f"{'mean':<{width}}  {_pct(self.miou):>7}  {_pct(self.mean_acc):>7}")
        rows.append(f"pixel accuracy {_pct(self.pixel_acc)} over {self.pixels} labelled pixels")
        return "\n".join(rows)


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.2f}"


def scores_from_confusion(cm: torch.Tensor | np.ndarray, class_names: Sequence[str] = ()) -> SegmentationScores:
    """Pixel accuracy, mean class accuracy, per-class and mean IoU from a ground-truth x prediction matrix."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    tp = cm.diag()
    gt = cm.sum(1)  # pixels of each class in the ground truth
    pred = cm.sum(0)  # pixels predicted as each class
    total = float(cm.sum())
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    return SegmentationScores(
        pixel_acc=float(tp.sum() / total) if total else float("nan"),
        mean_acc=float(acc.nanmean()) if (gt > 0).any() else float("nan"),
        miou=float(iou.nanmean()) if (union > 0).any() else float("nan"),
        iou=[float(v) for v in iou],
        acc=[float(v) for v in acc],
        pixels=int(total),
        class_names=list(class_names),
    )


class SegmentationMeter:
    """Accumulates a confusion matrix over batches; `scores()` at the end."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255, class_names: Sequence[str] = ()):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        self.cm += confusion_matrix(torch.as_tensor(pred).cpu(), torch.as_tensor(target).cpu(), self.num_classes,
                                    self.ignore_index)

    def scores(self) -> SegmentationScores:
        return scores_from_confusion(self.cm, self.class_names)


# ------------------------------------------------------------------------------------------ evaluation loop


def predictions_at(output: Any, size: tuple[int, int]) -> torch.Tensor:
    """One image's network output -> (H, W) class ids at `size`: logits (C, h, w) are resized bilinearly
    before the argmax (as torchvision evaluates), class ids (h, w) by nearest neighbour."""
    out = torch.as_tensor(np.asarray(output))
    if out.ndim == 3 and out.is_floating_point():
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        return out.argmax(0)
    if out.ndim == 3 and out.shape[0] == 1:  # (1, h, w) argmax output
        out = out[0]
    if out.ndim != 2:
        raise EdgeDeployError(f"segmentation output must be (C, h, w) logits or (h, w) class ids, got {tuple(out.shape)}")
    if tuple(out.shape) != tuple(size):
        out = F.interpolate(out[None, None].float(), size=size, mode="nearest")[0, 0]
    return out.long()


def evaluate_segmenter(
    predict_fn: PredictFn,
    dataset,
    batch_size: int = 8,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = None,
    max_images: int | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> SegmentationScores:
    """Score `predict_fn` on a segmentation dataset exposing `eval_item(i) -> (input (3,H,W) float32,
    mask (h, w) int64 at the original resolution)`, `num_classes`, `class_names` and `ignore_index`
    (edgedeploy.data.voc.SegmentationDataset does).
    """
    from tqdm import tqdm

    num_classes = num_classes or dataset.num_classes
    names = list(class_names) if class_names is not None else list(getattr(dataset, "class_names", []))
    ignore = dataset.ignore_index if ignore_index is None else ignore_index
    meter = SegmentationMeter(num_classes, ignore, names)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise EdgeDeployError("evaluation set is empty")
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            items = [dataset.eval_item(i) for i in range(start, min(n, start + batch_size))]
            x = np.stack([np.asarray(inp, dtype=np.float32) for inp, _ in items])
            out = predict_fn(x)
            if isinstance(out, (list, tuple)):  # ONNX Runtime / engine runners return every output
                out = out[0]
            out = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out)
            if out.shape[0] != len(items):
                raise EdgeDeployError(f"predict_fn returned batch {out.shape[0]} for {len(items)} inputs")
            for o, (_, mask) in zip(out, items):
                mask_t = torch.as_tensor(np.asarray(mask)).long()
                meter.update(predictions_at(o, tuple(mask_t.shape)), mask_t)
            bar.update(len(items))
    return meter.scores()


# --------------------------------------------------------------------------------------------------- CLI


@SEGMENT.provides("evaluator")
def evaluate_artifact(request: EvalRequest) -> int:
    """`deploy eval` for segmentation: a checkpoint, ONNX file or engine on a VOC-style set (or `synthetic`).
    The class list, input size and ignore index come from the request's artifact description (given, else
    what the checkpoint or the export sidecar recorded)."""
    from pathlib import Path

    from edgedeploy.data.voc import open_segmentation_data
    from edgedeploy.io import atomic_write_json

    desc, path, data = request.artifact, request.path, request.data
    class_names = list(desc.class_names) or None
    if desc.is_checkpoint:
        from edgedeploy.eval.predictors import torch_predict_fn
        from edgedeploy.runtime.engine import select_device
        from edgedeploy.models.registry import create_model

        if not desc.model:
            raise EdgeDeployError(f"{path} does not record its model: pass --model (e.g. lraspp_mobilenetv3)")
        synthetic = (desc.data.get("train_args") or {}).get("synthetic")
        model = create_model(desc.model, num_classes=desc.num_classes, weights=path)
        predict, default_batch = torch_predict_fn(model, select_device(request.device)), 8
    else:
        from edgedeploy.eval.predictors import artifact_predict_fn

        synthetic = desc.data.get("synthetic")
        predict, default_batch = artifact_predict_fn(path, desc.model)
    if not desc.imgsz:
        raise EdgeDeployError("pass --imgsz: the input size is not recorded beside the artifact")
    imgsz = int(desc.imgsz)
    dataset = open_segmentation_data(
        data,
        split=request.split,
        imgsz=imgsz,
        train=False,
        num_classes=None if class_names else desc.num_classes,
        class_names=class_names,
        ignore_index=255 if desc.ignore_index is None else desc.ignore_index,
        synthetic_kwargs={**(synthetic or {}), "imgsz": imgsz} if data == "synthetic" else None,
    )
    if class_names and dataset.own_class_names and list(dataset.own_class_names) != list(class_names):
        raise EdgeDeployError(
            f"{path} was trained on classes {list(class_names)}, but {dataset.root} lists {dataset.own_class_names}: "
            "labels would not line up. Evaluate on the dataset the model was trained on (or fix its classes.txt)"
        )
    print(f"{dataset.layout}: {len(dataset)} {request.split} images, ignore index {dataset.ignore_index}")
    scores = evaluate_segmenter(predict, dataset, batch_size=request.batch or default_batch, progress=not request.quiet)
    print(f"{Path(path).name} on {data} ({len(dataset)} {request.split} images)")
    print(scores.table())
    print(f"mIoU {100 * scores.miou:.2f}  pixel acc {100 * scores.pixel_acc:.2f}  mean acc {100 * scores.mean_acc:.2f}")
    if request.json:
        atomic_write_json(Path(request.json), {"artifact": path, "data": str(data), **scores.as_dict()})
    return 0
