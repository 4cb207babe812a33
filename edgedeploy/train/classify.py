"""Image-classification training.

`train_classifier` trains any registered classify model on an ImageFolder tree or on the built-in synthetic
shapes (`data="synthetic"`): SGD/AdamW with warm-up + cosine per iteration, label smoothing, EMA weights
(evaluated and saved as the deployable weights), AMP on CUDA, top-1/top-5 each epoch, atomic `last.pt` /
`best.pt`, exact `resume`, metrics.csv/json and results.png in the run folder. `ClassifySpec` is what
classification plugs into the shared loop, `edgedeploy.train.loop.fit`.

Each epoch is scored by `edgedeploy.eval.classify.evaluate_classifier`, the code `deploy eval` scores
exported artifacts with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from edgedeploy.data.imagefolder import classification_datasets
from edgedeploy.data.sources import describe_layout, record_data
from edgedeploy.errors import EdgeDeployError
from edgedeploy.eval.classify import evaluate_classifier
from edgedeploy.tasks import CLASSIFY
from edgedeploy.train.config import ClassifyConfig, Trainer, as_config
from edgedeploy.train.loop import TaskSpec, fit, shuffled_loader

# Overrides of `--data synthetic` (ClassifyConfig holds the user-data defaults; the generated set has
# `make_synthetic_classification`'s default size): mobilenetv3_small reaches >= 90% val top-1 within 5 minutes on
# a 2-core CPU, data generation included (measured figures in docs/TRAINING.md). From-scratch MobileNets sit on a loss plateau for the first
# epochs; AdamW, light augmentation and no label smoothing get them off it fastest.
SYNTHETIC_PRESET: dict[str, Any] = {
    "num_classes": 6,
    "imgsz": 64,
    "epochs": 18,
    "batch_size": 64,
    "lr": 3e-3,
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "label_smoothing": 0.0,
    "augment": "light",
}


@dataclass
class TrainResult:
    run_dir: Path
    last: Path
    best: Path
    best_top1: float
    top1: float  # last epoch, EMA weights
    top5: float
    epochs: int
    wall_s: float
    class_names: list[str] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- training


def train_classifier(model_name: str | ClassifyConfig, data: str | os.PathLike = "synthetic",
                     **options: Any) -> TrainResult:
    """Train a registered classification model; returns where the checkpoints are and the accuracy reached.

    `options` are `ClassifyConfig` fields (epochs, batch_size, imgsz, lr, optimizer, label_smoothing, ema, amp,
    workers, out_dir, resume, num_classes, seed, device, weight_decay, warmup_epochs, progress, ...); those not
    given take the synthetic preset (`data="synthetic"`) or the config's defaults. `out_dir` is the run folder
    (default runs/train/<model>, <model>2, ...). `resume=True` continues `out_dir/last.pt`; `resume=PATH`
    continues that checkpoint in its folder with the arguments it was started with. A ready `ClassifyConfig`
    may be passed instead of the model name.
    """
    cfg = as_config(ClassifyConfig, SYNTHETIC_PRESET, model_name, data, **options)
    spec = ClassifySpec(cfg)
    run = fit(spec)
    out = run.run_dir
    return TrainResult(
        run_dir=out, last=out / "last.pt", best=out / "best.pt", best_top1=run.best,
        top1=run.val.get("val/top1", float("nan")), top5=run.val.get("val/top5", float("nan")),
        epochs=run.cfg.epochs, wall_s=run.wall_s, class_names=list(spec.class_names), metrics=run.rows,
    )


class ClassifySpec(TaskSpec):
    """Cross-entropy (label smoothing) on ImageFolder/synthetic data; top-1 of the EMA weights picks best.pt."""

    task = "classify"
    metric = "val/top1"

    def default_workers(self, device: torch.device) -> int:
        return default_workers(device)

    def load_data(self) -> DataLoader:
        cfg, info = self.cfg, self.info
        self.train_ds, self.val_ds, self.class_names, self.data_root = classification_datasets(
            cfg.data, cfg.imgsz, info.mean, info.std, num_classes=cfg.num_classes, seed=cfg.seed,
            progress=cfg.progress, augment=cfg.augment,
        )
        if len(self.class_names) < 2:
            raise EdgeDeployError(
                f"{self.data_root} has {len(self.class_names)} class ({', '.join(map(str, self.class_names)) or 'none'}): "
                "a classifier needs at least 2 (with one, the loss is 0 from the start and top-1 is 100% whatever the "
                "weights). Add a sub-folder per class under train/ and val/"
            )
        print(f"data: {Path(self.data_root).resolve()} ({describe_layout(self.data_root)})"
              + "".join(f"; {d.split}: {len(d.skipped)} file(s) skipped (named above)"
                        for d in (self.train_ds, self.val_ds) if getattr(d, "skipped", None)))
        print(f"{len(self.train_ds)} train / {len(self.val_ds)} val images, {len(self.class_names)} classes")
        self.generator = torch.Generator()
        return shuffled_loader(self.train_ds, cfg.batch_size, self.workers, self.device, self.generator)

    def build_model(self, resuming: bool) -> nn.Module:
        from edgedeploy.models.registry import create_model

        # channels_last: ~1.7x faster depthwise/pointwise convs on CPU (oneDNN) and the layout tensor cores want
        model = create_model(self.info.name, num_classes=len(self.class_names)).to(
            self.device, memory_format=torch.channels_last)
        # torchvision's MobileNetV3 uses BN momentum 0.01 (tuned for 600-epoch ImageNet runs): in a short run the
        # running statistics trail the weights so far that eval mode predicts one class (measured: 16.5% eval-mode
        # vs 40% with batch statistics). PyTorch's default 0.1 keeps them current.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
                module.momentum = max(module.momentum, 0.1)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        return model

    def meta(self) -> dict[str, Any]:
        from edgedeploy.data.preprocess import InputConvention

        info = self.info
        return {
            "model_name": info.name, "task": "classify", "num_classes": len(self.class_names),
            "class_names": self.class_names, "imgsz": self.cfg.imgsz, "mean": list(info.mean), "std": list(info.std),
            **record_data(self.cfg.data, self.data_root),
            "preprocess": InputConvention.from_info(info).to_dict(),  # the input convention travels with the weights
        }

    def start_epoch(self, epoch: int, model: nn.Module) -> str:
        # Seed per epoch (order, augmentation, dropout): a resumed run repeats exactly what the interrupted one did
        self.generator.manual_seed(self.cfg.seed * 1000 + epoch)
        torch.manual_seed(self.cfg.seed * 1000 + epoch)
        return ""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float], int]:
        x = batch[0].to(self.device, non_blocking=True, memory_format=torch.channels_last)
        y = batch[1].to(self.device, non_blocking=True)
        logits = model(x)
        loss = self.criterion(logits, y)
        return loss, {"loss": loss.item(), "top1": float((logits.argmax(1) == y).float().mean())}, int(y.shape[0])

    def validate(self, model: nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
        scores = evaluate_classifier(model, self.val_ds, batch_size=max(64, self.cfg.batch_size),
                                     progress=self.cfg.progress)
        return {"val/top1": scores["top1"], "val/top5": scores["top5"]}, {"top1": scores["top1"], "top5": scores["top5"]}

    def describe(self, row: dict[str, Any]) -> str:
        text = f"  train top-1 {row['train/top1']:.3f}" if "train/top1" in row else ""
        return text + (f"  val top-1 {row['val/top1']:.4f}  top-5 {row['val/top5']:.4f}" if "val/top1" in row else "")


def default_workers(dev: torch.device) -> int:
    """Loader processes: augmentation runs single-threaded in workers, while in the main process it would
    fight the training threads for the cores (ColorJitter is ~50x slower there on a busy 2-core CPU).
    """
    cpus = os.cpu_count() or 1
    return min(4, max(1, cpus - 1)) if dev.type == "cuda" else min(2, max(1, cpus // 2))


def _summary(result: TrainResult) -> str:
    return (f"done in {result.wall_s:.0f}s: val top-1 {100 * result.top1:.2f}% (best {100 * result.best_top1:.2f}%), "
            f"top-5 {100 * result.top5:.2f}%\n"
            f"  weights  {result.best}  (EMA; `deploy eval --weights {result.best}`, `deploy export --weights {result.best}`)\n"
            f"  resume   deploy train --resume {result.last}\n"
            f"  metrics  {result.run_dir / 'metrics.csv'}, curves {result.run_dir / 'results.png'}")


CLASSIFY.provides("trainer")(Trainer(ClassifyConfig, SYNTHETIC_PRESET, train_classifier, _summary))
