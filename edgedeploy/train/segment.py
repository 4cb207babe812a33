"""Training for semantic segmentation (LR-ASPP): `deploy train --model lraspp_mobilenetv3 --data DIR|synthetic`.

Cross-entropy with an ignore index, poly (torchvision's recipe) or cosine learning rate, augmentation that
moves image and mask together (random scale, crop, flip; masks resized nearest), AMP on CUDA, EMA weights,
atomic last/best checkpoints, per-epoch mIoU on the validation split at the images' own resolution, curves in
results.png. `train_segmentation(...)` is the Python API; `train_segmenter(args)` the CLI entry point.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, RandomSampler

from edgedeploy.errors import CheckpointError, EdgeDeployError
from edgedeploy.eval.predictors import select_device
from edgedeploy.train.common import (
    MetricsLogger,
    ModelEMA,
    WarmupCosine,
    autocast,
    build_optimizer,
    load_for_resume,
    make_grad_scaler,
    run_dir,
    save_checkpoint,
    seed_everything,
)

# Small images, from scratch: AdamW converges in a few CPU minutes where SGD needs many more epochs.
# Measured on a 2-core CPU (one core): lraspp_mobilenetv3_small from scratch, 60 epochs of 240 images at 128 px,
# val mIoU 39.2 % in 5.5 min (docs/SEGMENTATION.md); mild scale jitter, since the shapes already vary in size.
SYNTHETIC_PRESET = {"epochs": 60, "batch_size": 8, "imgsz": 128, "lr": 6e-3, "optimizer": "adamw",
                    "weight_decay": 1e-4, "scale_range": (0.75, 1.25)}
# torchvision's LR-ASPP recipe (references/segmentation): SGD, poly, 30 epochs, lr 0.02 at batch 32, weight decay
# 1e-6; the lr is scaled linearly to one device's batch of 8.
DEFAULTS = {"epochs": 30, "batch_size": 8, "imgsz": None, "lr": 0.005, "optimizer": "sgd", "weight_decay": 1e-6,
            "scale_range": (0.5, 2.0)}
SCHEDULES = ("poly", "cosine")


class WarmupPoly(LRScheduler):
    """Per-iteration `lr * (1 - t/T) ** power` after a linear warm-up (DeepLab's "poly" policy)."""

    def __init__(self, optimizer, epochs: int, iters_per_epoch: int, warmup_epochs: float = 1.0,
                 power: float = 0.9, warmup_start_factor: float = 0.1, last_epoch: int = -1):
        self.total_iters = max(1, int(epochs * iters_per_epoch))
        self.warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), self.total_iters - 1)
        self.power = power
        self.warmup_start_factor = warmup_start_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * it / self.warmup_iters
        return max(0.0, 1.0 - it / self.total_iters) ** self.power

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


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


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Segmentation-only flags for `deploy train` (skipped when the shared CLI already defines them)."""
    taken = set(getattr(parser, "_option_string_actions", {}))

    def add(flag: str, **kw) -> None:
        if flag not in taken:
            parser.add_argument(flag, **kw)

    add("--ignore-index", type=int, default=255, help="segmentation: mask value left out of loss and metrics")
    add("--lr-schedule", choices=SCHEDULES, default="poly", help="segmentation: learning-rate decay")
    add("--scale-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="segmentation: random rescale of the shorter side relative to --imgsz before cropping "
             "(default 0.5 2.0; synthetic preset 0.75 1.25)")


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


def train_segmentation(
    model_name: str = "lraspp_mobilenetv3",
    data: str | os.PathLike = "synthetic",
    epochs: int | None = None,
    batch_size: int | None = None,
    imgsz: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    weight_decay: float | None = None,
    lr_schedule: str = "poly",
    warmup_epochs: float = 1.0,
    ignore_index: int = 255,
    scale_range: tuple[float, float] | None = None,
    ema: bool = True,
    amp: bool = True,
    workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    weights: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | None = None,
    max_train_images: int | None = None,
    max_val_images: int | None = None,
    synthetic: dict | None = None,
    progress: bool = True,
) -> SegmentTrainResult:
    """Train a registered segmentation model; returns where the checkpoints are and the mIoU reached.

    `None` arguments take the synthetic preset (`data="synthetic"`) or the user-data defaults (imgsz: the
    model's, 520 for LR-ASPP). `resume=True` continues `out_dir/last.pt`, `resume=PATH` that checkpoint, with
    the arguments it was started with. `weights` initialises from a checkpoint (torchvision's included).
    """
    from edgedeploy.data.sources import record_data
    from edgedeploy.data.voc import dataset_summary, mask_palette, open_segmentation_data
    from edgedeploy.eval.predictors import torch_predict_fn
    from edgedeploy.eval.segment import evaluate_segmenter
    from edgedeploy.models.registry import create_model, get_model_info

    t_start = time.perf_counter()
    resume_path: Path | None = None
    if resume:
        resume_path = Path(resume) if not isinstance(resume, bool) else (Path(out_dir) / "last.pt" if out_dir else None)
        if resume_path is None:
            raise EdgeDeployError("--resume needs the run to continue: pass --out RUN_DIR or --resume RUN_DIR/last.pt")
        if resume_path.is_dir():
            resume_path = resume_path / "last.pt"
        if not resume_path.is_file():
            raise CheckpointError(f"nothing to resume: {resume_path} does not exist")
        from edgedeploy.models.checkpoint import read_checkpoint

        saved = (read_checkpoint(resume_path).get("meta") or {}).get("train_args")
        if not saved:
            raise CheckpointError(f"{resume_path} does not record its training arguments: cannot resume it")
        model_name, data, seed, epochs = saved["model_name"], saved["data"], saved["seed"], saved["epochs"]
        batch_size, imgsz, lr, optimizer = saved["batch_size"], saved["imgsz"], saved["lr"], saved["optimizer"]
        weight_decay, lr_schedule, ignore_index = saved["weight_decay"], saved["lr_schedule"], saved["ignore_index"]
        scale_range, ema, num_classes = tuple(saved["scale_range"]), saved["ema"], saved["num_classes"]
        warmup_epochs, synthetic = saved["warmup_epochs"], saved.get("synthetic")
        max_train_images, max_val_images = saved.get("max_train_images"), saved.get("max_val_images")
        out_dir = resume_path.parent

    info = get_model_info(model_name)
    if info.task != "segment":
        raise EdgeDeployError(f"{info.name} is a {info.task} model; train_segmentation trains segment models only")
    if lr_schedule not in SCHEDULES:
        raise EdgeDeployError(f"--lr-schedule {lr_schedule!r}: use {' or '.join(SCHEDULES)}")
    is_synthetic = str(data) == "synthetic"
    base = SYNTHETIC_PRESET if is_synthetic else DEFAULTS
    given = {"epochs": epochs, "batch_size": batch_size, "imgsz": imgsz, "lr": lr, "optimizer": optimizer,
             "weight_decay": weight_decay, "scale_range": scale_range}
    cfg = {k: (v if v is not None else base[k]) for k, v in given.items()}
    scale_range = tuple(cfg.pop("scale_range"))
    cfg["imgsz"] = int(cfg["imgsz"] or info.imgsz)
    seed_everything(seed)
    dev = select_device(device)
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if dev.type == "cuda" else 0

    syn = dict(synthetic or {})
    if is_synthetic:
        syn.setdefault("imgsz", cfg["imgsz"])
        syn.setdefault("progress", progress)
    common = dict(imgsz=cfg["imgsz"], num_classes=num_classes, ignore_index=ignore_index, seed=seed,
                  synthetic_kwargs=syn)
    train_ds = open_segmentation_data(data, "train", train=True, scale_range=tuple(scale_range), **common)
    val_ds = open_segmentation_data(data, "val", train=False, class_names=train_ds.class_names, **common)
    if max_train_images:
        train_ds.pairs = train_ds.pairs[:max_train_images]
    if max_val_images:
        val_ds.pairs = val_ds.pairs[:max_val_images]
    train_ds.check(progress=progress, desc="checking train masks")
    val_ds.check(progress=progress, desc="checking val masks")
    class_names = train_ds.class_names

    out = Path(out_dir) if out_dir is not None else run_dir("runs/train", info.name)
    out.mkdir(parents=True, exist_ok=True)
    model = create_model(info.name, num_classes=len(class_names))
    _set_bn_momentum(model, 0.1)
    if weights and resume_path is None:
        reset = _init_from_weights(model, weights)
        print(f"initialised from {weights}" + (f" (re-initialised {len(reset)} output tensors)" if reset else ""))
    model.to(dev)
    opt = build_optimizer(model, cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    generator = torch.Generator()
    loader = DataLoader(
        train_ds,
        batch_size=cfg["batch_size"],
        sampler=RandomSampler(train_ds, generator=generator),
        num_workers=workers,
        drop_last=len(train_ds) > cfg["batch_size"],  # a 1-image last batch breaks BatchNorm
        pin_memory=dev.type == "cuda",
        persistent_workers=False,  # the dataset's epoch (augmentation seed) must reach the workers
    )
    ema_model = ModelEMA.for_run(model, cfg["epochs"] * len(loader)) if ema else None
    sched_cls = WarmupPoly if lr_schedule == "poly" else WarmupCosine
    scheduler = sched_cls(opt, cfg["epochs"], len(loader), warmup_epochs=min(warmup_epochs, cfg["epochs"] / 2))
    scaler = make_grad_scaler(dev, amp)
    criterion = _loss_fn(ignore_index)
    logger = MetricsLogger(out)
    train_args = {
        "model_name": info.name, "data": str(data), "seed": seed, **cfg, "lr_schedule": lr_schedule,
        "ignore_index": ignore_index, "scale_range": list(scale_range), "ema": bool(ema),
        "warmup_epochs": warmup_epochs, "num_classes": num_classes, "synthetic": synthetic,
        "max_train_images": max_train_images, "max_val_images": max_val_images,
    }
    meta = {
        "model_name": info.name, "task": "segment", "num_classes": len(class_names), "class_names": class_names,
        "imgsz": cfg["imgsz"], "ignore_index": ignore_index, "mean": list(info.mean), "std": list(info.std),
        **record_data(data, train_ds.pairs[0][0].parent.parent.parent if is_synthetic else None),
        "palette": mask_palette(train_ds.pairs[0][1], len(class_names)),  # None for grey masks
        "train_args": train_args,
    }

    start_epoch, best_miou = 0, -1.0
    if resume_path is not None:
        start_epoch, best, _ = load_for_resume(resume_path, model, ema_model, opt, scheduler, scaler)
        best_miou = best if best is not None else -1.0
        if start_epoch >= cfg["epochs"]:
            raise EdgeDeployError(f"{resume_path} already finished all {cfg['epochs']} epochs; start a new run")
        logger.truncate(start_epoch)
        print(f"resuming {resume_path} at epoch {start_epoch + 1}/{cfg['epochs']}")

    print(f"data: {train_ds.root} ({train_ds.layout}), ignore index {ignore_index}")
    print(f"training {info.name} on {data}: train {dataset_summary(train_ds)}; val {len(val_ds)} images; "
          f"{cfg['imgsz']}px crops on {dev}, {cfg['epochs']} epochs, {cfg['optimizer']} lr {cfg['lr']:g} "
          f"{lr_schedule} -> {out}")
    scores = None
    for epoch in range(start_epoch, cfg["epochs"]):
        t_epoch = time.perf_counter()
        generator.manual_seed(seed * 1000 + epoch)  # same order and augmentation per epoch: resumable
        train_ds.epoch = epoch
        loss = _train_one_epoch(model, loader, criterion, opt, scheduler, scaler, ema_model, dev, amp, epoch,
                                cfg["epochs"], progress)
        eval_model = ema_model.ema if ema_model is not None else model
        scores = evaluate_segmenter(torch_predict_fn(eval_model, dev), val_ds, batch_size=cfg["batch_size"],
                                    progress=progress, desc=f"val {epoch + 1}/{cfg['epochs']}")
        model.train()
        improved = scores.miou > best_miou
        best_miou = max(best_miou, scores.miou)
        row = {"epoch": epoch, "train/loss": loss, "val/miou": scores.miou, "val/pixel_acc": scores.pixel_acc,
               "val/mean_acc": scores.mean_acc, "lr": opt.param_groups[0]["lr"],
               "epoch_s": time.perf_counter() - t_epoch}
        logger.log(row)
        logger.plot(out / "results.png")
        meta_now = {**meta, "epoch": epoch, "miou": scores.miou, "pixel_acc": scores.pixel_acc,
                    "iou": scores.as_dict()["iou"]}
        save_checkpoint(out / "last.pt", model, ema_model, opt, scheduler, epoch, best_miou, meta_now, scaler=scaler)
        if improved:
            save_checkpoint(out / "best.pt", model, ema_model, None, None, epoch, best_miou, meta_now)
        print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {loss:.4f}  val mIoU {100 * scores.miou:.2f}  "
              f"pixel acc {100 * scores.pixel_acc:.2f}  ({row['epoch_s']:.1f}s)")
    if scores is not None:
        print(scores.table())
    return SegmentTrainResult(
        run_dir=out, last=out / "last.pt", best=out / "best.pt", best_miou=best_miou,
        miou=scores.miou if scores else float("nan"), pixel_acc=scores.pixel_acc if scores else float("nan"),
        epochs=cfg["epochs"], wall_s=time.perf_counter() - t_start, class_names=list(class_names),
        iou=scores.as_dict()["iou"] if scores else {}, metrics=list(logger.rows),
    )


def _train_one_epoch(model, loader, criterion, opt, scheduler, scaler, ema, dev, amp, epoch, epochs, progress):
    from tqdm import tqdm

    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
    for x, y in bar:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast(dev, amp):
            loss = criterion(model(x), y)
        if not math.isfinite(loss.item()):
            raise EdgeDeployError(
                f"loss became {loss.item()} at epoch {epoch + 1}: lower --lr, or check the masks' ignore index"
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        total += loss.item() * len(x)
        count += len(x)
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    return total / max(count, 1)


def _arg(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            return v
    return default


def train_segmenter(args: argparse.Namespace) -> int:
    """`deploy train` for task "segment": maps the shared CLI's flags onto train_segmentation."""
    no_ema = bool(getattr(args, "no_ema", False))
    no_amp = bool(getattr(args, "no_amp", False))
    result = train_segmentation(
        model_name=_arg(args, "model", default="lraspp_mobilenetv3"),
        data=_arg(args, "data", default="synthetic"),
        epochs=_arg(args, "epochs"),
        batch_size=_arg(args, "batch_size", "batch"),
        imgsz=_arg(args, "imgsz"),
        lr=_arg(args, "lr"),
        optimizer=_arg(args, "optimizer", "opt"),
        weight_decay=_arg(args, "weight_decay"),
        lr_schedule=_arg(args, "lr_schedule", default="poly"),
        ignore_index=_arg(args, "ignore_index", default=255),
        scale_range=_arg(args, "scale_range"),
        ema=_arg(args, "ema", default=not no_ema),
        amp=_arg(args, "amp", default=not no_amp),
        workers=_arg(args, "workers"),
        out_dir=_arg(args, "out", "out_dir"),
        resume=_arg(args, "resume", default=False),
        weights=_arg(args, "weights"),
        num_classes=_arg(args, "num_classes"),
        seed=_arg(args, "seed", default=0),
        device=_arg(args, "device"),
        progress=not bool(getattr(args, "quiet", False)),
    )
    print(f"best val mIoU {100 * result.best_miou:.2f} -> {result.best}  (last: {result.last}, "
          f"curves: {result.run_dir / 'results.png'})")
    return 0
