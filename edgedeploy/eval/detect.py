"""COCO-style detection evaluation through pycocotools, shared by checkpoints, ONNX files and engines.

`evaluate_detector(predict_fn, dataset, imgsz)` letterboxes every image exactly as deployment does, asks
`predict_fn` for detections in network-input pixels, maps them back to original-image pixels with the
letterbox scale and padding, and scores them against the dataset's ground truth (a COCO object built in
memory, also for YOLO-txt datasets). Only `predict_fn` differs between backends (`edgedeploy.eval.predictors`:
`torch_detect_fn`, `engine_detect_fn`, `onnx_detect_fn`):

    predict_fn(x: np.ndarray [B, 3, S, S] float32) -> sequence of B arrays/tensors [K, 6] (x1, y1, x2, y2, score, cls)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgedeploy.data.yolo_format import DetectionDataset
from edgedeploy.errors import CheckpointError, EdgeDeployError
from edgedeploy.eval.predictors import PredictFn, engine_detect_fn, torch_detect_fn
from edgedeploy.eval.request import EvalRequest
from edgedeploy.options import EVAL_NMS
from edgedeploy.tasks import DETECT

# The 12 numbers COCOeval.summarize() prints, in order.
COCO_STAT_NAMES = (
    "AP@[.5:.95]", "AP@.5", "AP@.75", "AP_small", "AP_medium", "AP_large",
    "AR@1", "AR@10", "AR@100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


@dataclass
class DetectionMetrics:
    map: float  # AP@[.5:.95], area all, maxDets 100
    map50: float
    map75: float
    stats: list[float]  # the 12 COCO numbers, COCO_STAT_NAMES order
    per_class_ap: dict[str, float]  # AP@[.5:.95] per class (nan: class absent from the ground truth)
    per_class_ap50: dict[str, float]
    summary: str  # COCOeval's 12-line printout
    num_images: int
    num_detections: int
    seconds: float
    pr_curve: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stats"] = dict(zip(COCO_STAT_NAMES, self.stats))
        return d

    def class_table(self) -> str:
        width = max([5] + [len(n) for n in self.per_class_ap])
        lines = [f"{'class':<{width}}  {'AP50':>6}  {'AP50-95':>7}"]
        for name, ap in self.per_class_ap.items():
            lines.append(f"{name:<{width}}  {_fmt(self.per_class_ap50[name]):>6}  {_fmt(ap):>7}")
        lines.append(f"{'all':<{width}}  {_fmt(self.map50):>6}  {_fmt(self.map):>7}")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_detector(
    predict_fn: PredictFn,
    dataset: DetectionDataset,
    imgsz: int,
    *,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    batch_size: int = 8,
    num_workers: int = 0,
    out_dir: str | os.PathLike | None = None,
    verbose: bool = True,
    desc: str = "eval",
    progress: bool = True,
    convention=None,
) -> DetectionMetrics:
    """Run `predict_fn` over `dataset` and score it with pycocotools. Writes pr_curve.png into `out_dir`."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from edgedeploy.data.detect_augment import LetterboxEvalSet

    loader = DataLoader(LetterboxEvalSet(dataset, imgsz, mean, std, convention=convention), batch_size=batch_size, num_workers=num_workers, shuffle=False)
    results: list[dict] = []
    start = time.perf_counter()
    for x, indices, scales, pad_x, pad_y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        detections = predict_fn(np.ascontiguousarray(x.numpy()))
        if len(detections) != len(indices):
            raise EdgeDeployError(f"predict_fn returned {len(detections)} results for a batch of {len(indices)} images")
        for det, i, s, px, py in zip(detections, indices.tolist(), scales.tolist(), pad_x.tolist(), pad_y.tolist()):
            det = det.detach().float().cpu().numpy() if isinstance(det, torch.Tensor) else np.asarray(det, np.float32)
            results += detections_to_coco(det.reshape(-1, 6), dataset[i], s, (px, py))
    seconds = time.perf_counter() - start
    metrics = score_detections(dataset, results, out_dir=out_dir, verbose=verbose)
    metrics.seconds = seconds
    return metrics


def detections_to_coco(det: np.ndarray, record, scale: float, pad: tuple[float, float]) -> list[dict]:
    """[K, 6] detections in letterboxed-input pixels -> COCO result dicts in original-image pixels."""
    if len(det) == 0:
        return []
    boxes = (det[:, :4] - np.array([pad[0], pad[1], pad[0], pad[1]], np.float32)) / scale
    boxes = boxes.clip(0, [record.width, record.height, record.width, record.height])
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    return [
        {"image_id": record.image_id, "category_id": int(c), "bbox": [round(float(v), 3) for v in b], "score": float(s)}
        for b, s, c in zip(xywh, det[:, 4], det[:, 5])
    ]


def score_detections(
    dataset: DetectionDataset, results: list[dict], out_dir: str | os.PathLike | None = None, verbose: bool = True
) -> DetectionMetrics:
    """COCOeval over COCO-format `results`; per-class AP and the PR curve from its precision array."""
    from pycocotools.cocoeval import COCOeval

    from edgedeploy.data.coco import build_coco_gt

    gt = build_coco_gt(dataset)
    names = list(dataset.names)
    valid = {i: None for i in range(len(names))}
    bad = {r["category_id"] for r in results if r["category_id"] not in valid}
    if bad:
        raise EdgeDeployError(
            f"detections use class ids {sorted(bad)[:10]} but the dataset has {len(names)} classes: is this model "
            "trained for another dataset? (check --num-classes / the checkpoint's class names)"
        )
    if not results:  # pycocotools cannot load an empty result list; nothing detected means zero everywhere
        nan_or_zero = {n: (0.0 if _has_gt(dataset, i) else float("nan")) for i, n in enumerate(names)}
        summary = coco_summary_text([0.0] * 12) + "\n (no detections above the confidence threshold)"
        if verbose:
            print(summary)
        metrics = DetectionMetrics(0.0, 0.0, 0.0, [0.0] * 12, nan_or_zero, dict(nan_or_zero), summary, len(dataset), 0, 0.0)
        if out_dir is not None:  # still write the plot, so a run folder always has the same files
            metrics.pr_curve = str(plot_pr_curve(None, names, Path(out_dir) / "pr_curve.png"))
        return metrics

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = [r.image_id for r in dataset.records]
        ev.evaluate()
        ev.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev.summarize()  # the 12-line table users know from every detection repo
    summary = text.getvalue().rstrip()
    if verbose:
        print(summary)

    precision = ev.eval["precision"]  # [T iou thresholds, R recall points, K classes, A areas, M maxDets]
    per_ap, per_ap50 = {}, {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_ap[names[cat]] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
        p50 = precision[0, :, k, 0, -1]
        per_ap50[names[cat]] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else float("nan")
    stats = [float(s) for s in ev.stats]
    metrics = DetectionMetrics(
        map=max(stats[0], 0.0), map50=max(stats[1], 0.0), map75=max(stats[2], 0.0), stats=stats,
        per_class_ap=per_ap, per_class_ap50=per_ap50, summary=summary,
        num_images=len(dataset), num_detections=len(results), seconds=0.0,
    )  # fmt: skip
    if out_dir is not None:
        metrics.pr_curve = str(plot_pr_curve(ev, names, Path(out_dir) / "pr_curve.png"))
    return metrics


def coco_summary_text(stats: Sequence[float]) -> str:
    """The 12 lines COCOeval.summarize() prints, for given stats (used when there is nothing to evaluate)."""
    rows = [(1, "0.50:0.95", "all", 100), (1, "0.50", "all", 100), (1, "0.75", "all", 100),
            (1, "0.50:0.95", "small", 100), (1, "0.50:0.95", "medium", 100), (1, "0.50:0.95", "large", 100),
            (0, "0.50:0.95", "all", 1), (0, "0.50:0.95", "all", 10), (0, "0.50:0.95", "all", 100),
            (0, "0.50:0.95", "small", 100), (0, "0.50:0.95", "medium", 100), (0, "0.50:0.95", "large", 100)]  # fmt: skip
    return "\n".join(
        f" {'Average Precision' if ap else 'Average Recall':<18} {'(AP)' if ap else '(AR)'} @[ IoU={iou:<9} | "
        f"area={area:>6s} | maxDets={dets:>3d} ] = {value:0.3f}"
        for (ap, iou, area, dets), value in zip(rows, stats)
    )


def _has_gt(dataset: DetectionDataset, cls: int) -> bool:
    return any((r.classes == cls).any() for r in dataset.records)


def plot_pr_curve(ev, names: Sequence[str], path: str | os.PathLike) -> Path:
    """Precision-recall at IoU 0.5 per class (thin) and averaged over classes (bold), from COCOeval's array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from edgedeploy.io import atomic_path

    fig = Figure(figsize=(6, 5), dpi=110, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if ev is None:  # nothing detected: an empty plot that says so
        recall, precision, present = np.linspace(0, 1, 101), np.zeros((101, 0)), []
        ax.text(0.5, 0.5, "no detections", ha="center", va="center")
    else:
        recall = ev.params.recThrs
        precision = ev.eval["precision"][0, :, :, 0, -1]  # [R, K] at IoU 0.5, all areas, 100 detections
        present = [k for k in range(precision.shape[1]) if (precision[:, k] > -1).any()]
    for k in present:
        ap = precision[:, k].mean()
        label = f"{names[ev.params.catIds[k]]} {ap:.3f}" if len(present) <= 20 else None
        ax.plot(recall, precision[:, k], linewidth=1, alpha=0.7, label=label)
    if present:
        mean_curve = precision[:, present].mean(1)
        ax.plot(recall, mean_curve, linewidth=3, color="royalblue", label=f"all classes {mean_curve.mean():.3f} mAP@.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall (IoU 0.5)")
    ax.grid(alpha=0.3)
    if present:
        ax.legend(fontsize=7, loc="lower left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# ------------------------------------------------------------------------------------------ checkpoints


def load_detector(path: str | os.PathLike, model_name: str | None = None, num_classes: int | None = None):
    """A detector rebuilt from our checkpoint (EMA weights), model and class count taken from its meta (a
    checkpoint of another detector than `model_name` is refused by name)."""
    from edgedeploy.models.artifact import describe_artifact
    from edgedeploy.models.registry import create_model

    desc = describe_artifact(path, model=model_name)
    if not desc.model:
        raise CheckpointError(f"{path} does not say which model it belongs to: pass --model NAME")
    model = create_model(desc.model, num_classes=int(desc.num_classes or num_classes or 80), weights=str(path))
    return model.eval()


# ----------------------------------------------------------------------------------------------------- CLI


def add_detect_eval_arguments(parser) -> None:
    """Detection flags for `deploy eval`: the task's NMS flags with `options.EVAL_NMS` (low thresholds for mAP)."""
    nms = EVAL_NMS
    DETECT.add_flags(parser, defaults={"conf_thres": nms.conf_thres, "iou_thres": nms.iou_thres, "max_det": nms.max_det},
                     only=("conf_thres", "iou_thres", "max_det"))
    parser.add_argument("--out", default=None,
                        help="detect: folder for pr_curve.png and eval_<artifact>.json (default: beside the artifact)")


@DETECT.provides("evaluator")
def evaluate_artifact(request: EvalRequest) -> int:
    """`deploy eval` for detectors: a .pt checkpoint, .onnx or .engine on request.data (YOLO/COCO folder, or
    `synthetic`: regenerated as recorded at training). Prints the COCO summary and per-class AP; writes
    pr_curve.png into request.out (default: beside the artifact), and the scores to request.json (or
    out/eval_<artifact>.json when out is given)."""
    from edgedeploy.data.sources import open_detection_data
    from edgedeploy.runtime.engine import select_device
    from edgedeploy.io import atomic_write_json

    desc, nms = request.artifact, request.nms
    artifact = Path(request.path)
    if not desc.imgsz:
        raise EdgeDeployError(f"cannot tell the input size of {artifact.name}: pass --imgsz")
    dataset = open_detection_data(request.data, request.split, desc.imgsz, desc.data.get("synthetic"))
    print(f"{dataset.layout or dataset.format}: {dataset.summary()}")
    if desc.class_names and list(desc.class_names) != list(dataset.names):
        raise EdgeDeployError(
            f"{artifact.name} was trained on classes {list(desc.class_names)}, but the dataset has {dataset.names}: "
            "labels would not line up"
        )

    if desc.is_checkpoint:
        device = select_device(request.device)
        model = load_detector(artifact, desc.model, num_classes=desc.num_classes or len(dataset.names))
        predict = torch_detect_fn(model.to(device), device, nms.conf_thres, nms.iou_thres, nms.max_det)
    else:
        from edgedeploy.runtime.loader import load_engine

        predict = engine_detect_fn(load_engine(artifact), nms.conf_thres, nms.iou_thres, nms.max_det)
    conv = desc.convention
    mean, std = conv.unit_mean_std() if conv is not None else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    metrics = evaluate_detector(
        predict, dataset, desc.imgsz, mean=mean, std=std, batch_size=request.batch or 8, num_workers=request.workers,
        out_dir=Path(request.out or artifact.parent), progress=not request.quiet, convention=conv,
    )  # fmt: skip
    print(metrics.class_table())
    print(
        f"{artifact.name} on {dataset.root} ({metrics.num_images} {dataset.split} images): mAP@.5 {metrics.map50:.4f}  "
        f"mAP@.5:.95 {metrics.map:.4f}  ({metrics.seconds:.1f} s)  PR curve: {metrics.pr_curve}"
    )
    json_path = request.json or (Path(request.out) / f"eval_{artifact.stem}.json" if request.out else None)
    if json_path:
        atomic_write_json(json_path, {"artifact": str(artifact), "data": str(dataset.root), **metrics.as_dict()})
    return 0
