"""Training for semantic segmentation (LR-ASPP): `deploy train --model lraspp_mobilenetv3 --data DIR|synthetic`.

Cross-entropy with an ignore index, poly (torchvision's recipe) or cosine learning rate, augmentation that
moves image and mask together (random scale, crop, flip; masks resized nearest), AMP on CUDA, EMA weights,
atomic last/best checkpoints, per-epoch mIoU on the validation split at the images' own resolution, curves in
results.png. `train_segmentation(...)` is the Python API (`deploy train` passes it a `SegmentConfig`); the loop is
`edgedeploy.train.loop.fit`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from edgedeploy.tasks import SEGMENT
from edgedeploy.train.common import ModelEMA
from edgedeploy.train.config import SegmentConfig, Trainer, as_config
from edgedeploy.train.loop import TaskSpec, fit, shuffled_loader

# Overrides of `--data synthetic` (SegmentConfig holds torchvision's recipe for user data). Small images, from
# scratch: AdamW converges in a few CPU minutes where SGD needs many more epochs. Measured on a 2-core CPU (one
# core): lraspp_mobilenetv3_small from scratch, 60 epochs of 240 images at 128 px, val mIoU 39.2 % in 5.5 min
# (docs/SEGMENTATION.md); mild scale jitter, since the shapes already vary in size.
SYNTHETIC_PRESET: dict[str, Any] = {"epochs": 60, "batch_size": 8, "imgsz": 128, "lr": 6e-3, "optimizer": "adamw",
                                    "weight_decay": 1e-4, "scale_range": (0.75, 1.25)}


@dataclass
class SegmentTrainResult:
    run_dir: Path
    last: Path
    best: Path
    best_miou: float
    miou: float
    pixel_acc: float
    epochs: int
    wall_s: float
    class_names: list[str] = field(default_factory=list)
    iou: dict[str, float | None] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _loss_fn(ignore_index: int) -> nn.Module:
    return nn.CrossEntropyLoss(ignore_index=ignore_index)


def _init_from_weights(model: nn.Module, path: str) -> list[str]:
    """Start from a checkpoint (ours or torchvision's); output convs of another class count are re-initialised
    (fine-tuning COCO-VOC weights on your own classes). Returns the keys left at their initial values."""
    from edgedeploy.models.checkpoint import check_state_dict, extract_state_dict, read_checkpoint

    sd = extract_state_dict(read_checkpoint(path))
    own = model.state_dict()
    heads = [k for k in sd if k.startswith(("classifier.low_classifier.", "classifier.high_classifier."))]
    skipped = [k for k in heads if k in own and sd[k].shape != own[k].shape]
    sd = {k: v for k, v in sd.items() if k not in skipped}
    check_state_dict(model, {**sd, **{k: own[k] for k in skipped}})  # anything else must match exactly
    model.load_state_dict({**own, **sd})
    return skipped


def _set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """MobileNetV3's TF-style BatchNorm momentum (0.01) needs thousands of steps before the running statistics
    describe the data; a short run or fine-tune would then be evaluated (and exported) with stale statistics and
    predict the prior class everywhere. PyTorch's default 0.1 tracks within ~50 steps; weights are unaffected."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def train_segmentation(model_name: str | SegmentConfig = "lraspp_mobilenetv3", data: str | os.PathLike = "synthetic",
                       **options: Any) -> SegmentTrainResult:
    """Train a registered segmentation model; returns where the checkpoints are and the mIoU reached.

    `options` are `SegmentConfig` fields; those not given take the synthetic preset (`data="synthetic"`) or the
    config's defaults (imgsz: the model's, 520 for LR-ASPP). `resume=True` continues `out_dir/last.pt`,
    `resume=PATH` that checkpoint, with the arguments it was started with. `weights` initialises from a checkpoint
    (torchvision's included). A ready `SegmentConfig` may be passed instead of the model name.
    """
    cfg = as_config(SegmentConfig, SYNTHETIC_PRESET, model_name, data, **options)
    spec = SegmentSpec(cfg)
    run = fit(spec)
    if spec.scores is not None:
        print(spec.scores.table())
    out = run.run_dir
    return SegmentTrainResult(
        run_dir=out, last=out / "last.pt", best=out / "best.pt", best_miou=run.best,
        miou=run.val.get("val/miou", float("nan")), pixel_acc=run.val.get("val/pixel_acc", float("nan")),
        epochs=run.cfg.epochs, wall_s=run.wall_s, class_names=list(spec.class_names),
        iou=run.extra.get("iou", {}), metrics=run.rows,
    )


class SegmentSpec(TaskSpec):
    """Cross-entropy with an ignore index on image+mask augmented crops; mIoU of the EMA weights on the val split
    at the images' own resolution picks best.pt."""

    task = "segment"
    metric = "val/miou"
    nan_hint = ", or check the masks' ignore index"
    scores = None

    def default_workers(self, device: torch.device) -> int:
        return min(4, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0

    def load_data(self) -> DataLoader:
        from edgedeploy.data.voc import dataset_summary, open_segmentation_data

        cfg = self.cfg
        syn = dict(cfg.synthetic or {})
        if str(cfg.data) == "synthetic":
            syn.setdefault("imgsz", cfg.imgsz)
            syn.setdefault("progress", cfg.progress)
        common = dict(imgsz=cfg.imgsz, num_classes=cfg.num_classes, ignore_index=cfg.ignore_index, seed=cfg.seed,
                      synthetic_kwargs=syn)
        self.train_ds = open_segmentation_data(cfg.data, "train", train=True, scale_range=tuple(cfg.scale_range),
                                               **common)
        self.val_ds = open_segmentation_data(cfg.data, "val", train=False, class_names=self.train_ds.class_names,
                                             **common)
        if cfg.max_train_images:
            self.train_ds.pairs = self.train_ds.pairs[:cfg.max_train_images]
        if cfg.max_val_images:
            self.val_ds.pairs = self.val_ds.pairs[:cfg.max_val_images]
        self.train_ds.check(progress=cfg.progress, desc="checking train masks")
        self.val_ds.check(progress=cfg.progress, desc="checking val masks")
        self.class_names = self.train_ds.class_names
        print(f"data: {self.train_ds.root} ({self.train_ds.layout}), ignore index {cfg.ignore_index}")
        print(f"train {dataset_summary(self.train_ds)}; val {len(self.val_ds)} images")
        self.generator = torch.Generator()
        # the dataset's epoch sets the augmentation seed (workers are not persistent, so it reaches them)
        return shuffled_loader(self.train_ds, cfg.batch_size, self.workers, self.device, self.generator,
                               seed_workers=False)

    def build_model(self, resuming: bool) -> nn.Module:
        from edgedeploy.models.registry import create_model

        model = create_model(self.info.name, num_classes=len(self.class_names))
        _set_bn_momentum(model, 0.1)
        weights = self.cfg.weights
        if weights and not resuming:
            reset = _init_from_weights(model, weights)
            print(f"initialised from {weights}" + (f" (re-initialised {len(reset)} output tensors)" if reset else ""))
        self.criterion = _loss_fn(self.cfg.ignore_index)
        return model.to(self.device)

    def make_ema(self, model: nn.Module, total_iters: int) -> ModelEMA:
        return ModelEMA.for_run(model, total_iters)

    def meta(self) -> dict[str, Any]:
        from edgedeploy.data.sources import record_data
        from edgedeploy.data.voc import mask_palette

        cfg, info = self.cfg, self.info
        synthetic = str(cfg.data) == "synthetic"
        return {
            "model_name": info.name, "task": "segment", "num_classes": len(self.class_names),
            "class_names": self.class_names, "imgsz": cfg.imgsz, "ignore_index": cfg.ignore_index,
            "mean": list(info.mean), "std": list(info.std),
            **record_data(cfg.data, self.train_ds.pairs[0][0].parent.parent.parent if synthetic else None),
            "palette": mask_palette(self.train_ds.pairs[0][1], len(self.class_names)),  # None for grey masks
        }

    def start_epoch(self, epoch: int, model: nn.Module) -> str:
        self.generator.manual_seed(self.cfg.seed * 1000 + epoch)  # same order and augmentation per epoch: resumable
        self.train_ds.epoch = epoch
        return ""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float], int]:
        x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        loss = self.criterion(model(x), y)
        return loss, {"loss": loss.item()}, len(x)

    def validate(self, model: nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
        from edgedeploy.eval.predictors import torch_predict_fn
        from edgedeploy.eval.segment import evaluate_segmenter

        s = self.scores = evaluate_segmenter(torch_predict_fn(model, self.device), self.val_ds,
                                             batch_size=self.cfg.batch_size, progress=self.cfg.progress,
                                             desc=f"val {epoch + 1}/{self.cfg.epochs}")
        row = {"val/miou": s.miou, "val/pixel_acc": s.pixel_acc, "val/mean_acc": s.mean_acc}
        return row, {"miou": s.miou, "pixel_acc": s.pixel_acc, "iou": s.as_dict()["iou"]}

    def describe(self, row: dict[str, Any]) -> str:
        if "val/miou" not in row:
            return ""
        return f"  val mIoU {100 * row['val/miou']:.2f}  pixel acc {100 * row['val/pixel_acc']:.2f}"


def _summary(result: SegmentTrainResult) -> str:
    return (f"best val mIoU {100 * result.best_miou:.2f} -> {result.best}  (last: {result.last}, "
            f"curves: {result.run_dir / 'results.png'})")


SEGMENT.provides("trainer")(Trainer(SegmentConfig, SYNTHETIC_PRESET, train_segmentation, _summary))
