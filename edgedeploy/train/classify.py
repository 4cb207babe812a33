"""Image-classification training and evaluation.

`train_classifier` trains any registered classify model on an ImageFolder tree or on the built-in synthetic
shapes (`data="synthetic"`): SGD/AdamW with warm-up + cosine per iteration, label smoothing, EMA weights
(evaluated and saved as the deployable weights), AMP on CUDA, top-1/top-5 each epoch, atomic `last.pt` /
`best.pt`, exact `resume`, metrics.csv/json and results.png in the run folder.

Each epoch is scored by `edgedeploy.eval.classify.evaluate_classifier`, the code `deploy eval` scores
exported artifacts with.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler

from edgedeploy.data.imagefolder import classification_datasets
from edgedeploy.data.sources import describe_layout, record_data
from edgedeploy.errors import CheckpointError, EdgeDeployError
from edgedeploy.eval.classify import evaluate_classifier
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

# Defaults of `--data synthetic`: mobilenetv3_small reaches >= 90% val top-1 within 5 minutes on a 2-core CPU,
# data generation included (measured figures in docs/TRAINING.md). From-scratch MobileNets sit on a loss
# plateau for the first epochs; AdamW, light augmentation and no label smoothing get them off it fastest.
SYNTHETIC_PRESET: dict[str, Any] = {
    "imgsz": 64,
    "epochs": 18,
    "batch_size": 64,
    "lr": 3e-3,
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "label_smoothing": 0.0,
    "augment": "light",
}
# Defaults for user data (ImageNet-style recipe for small models, scaled to short runs).
DEFAULTS: dict[str, Any] = {
    "epochs": 30, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "weight_decay": 5e-5,
    "label_smoothing": 0.1, "augment": "standard",
}
SGD_LR = 0.05
SGD_WEIGHT_DECAY = 5e-5
ADAMW_LR = 2e-3
ADAMW_WEIGHT_DECAY = 0.05


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


def _resolve_defaults(data: str, **given: Any) -> dict[str, Any]:
    """Explicit arguments win; otherwise the synthetic preset or the user-data defaults."""
    base = dict(SYNTHETIC_PRESET if str(data).lower() == "synthetic" else DEFAULTS)
    # switching optimizer without an --lr takes that optimizer's usual lr / weight decay
    if given.get("optimizer") == "adamw" and given.get("lr") is None and base["optimizer"] != "adamw":
        base.update(lr=ADAMW_LR, weight_decay=ADAMW_WEIGHT_DECAY)
    if given.get("optimizer") == "sgd" and given.get("lr") is None and base["optimizer"] != "sgd":
        base.update(lr=SGD_LR, weight_decay=SGD_WEIGHT_DECAY)
    return {k: (v if v is not None else base.get(k)) for k, v in given.items()}


def train_classifier(
    model_name: str,
    data: str | os.PathLike = "synthetic",
    epochs: int | None = None,
    batch_size: int | None = None,
    imgsz: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    label_smoothing: float | None = None,
    ema: bool = True,
    amp: bool = True,
    workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | None = None,
    weight_decay: float | None = None,
    warmup_epochs: float = 1.0,
    progress: bool = True,
) -> TrainResult:
    """Train a registered classification model; returns where the checkpoints are and the accuracy reached.

    `None` arguments take the synthetic preset (`data="synthetic"`) or the user-data defaults. `out_dir` is the
    run folder (default runs/train/<model>, <model>2, ...). `resume=True` continues `out_dir/last.pt`;
    `resume=PATH` continues that checkpoint in its folder with the arguments it was started with.
    """
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
        saved = _saved_train_args(resume_path)
        # the run continues exactly as started: its recorded arguments override the defaults
        model_name, data, seed = saved["model_name"], saved["data"], saved["seed"]
        epochs, batch_size, imgsz, lr = saved["epochs"], saved["batch_size"], saved["imgsz"], saved["lr"]
        optimizer, weight_decay, label_smoothing = saved["optimizer"], saved["weight_decay"], saved["label_smoothing"]
        ema, warmup_epochs, num_classes = saved["ema"], saved["warmup_epochs"], saved["num_classes"]
        out_dir = resume_path.parent

    info = get_model_info(model_name)
    if info.task != "classify":
        raise EdgeDeployError(f"{info.name} is a {info.task} model; train_classifier trains classify models only")
    cfg = _resolve_defaults(
        str(data), epochs=epochs, batch_size=batch_size, imgsz=imgsz, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, label_smoothing=label_smoothing,
    )
    label_smoothing = cfg["label_smoothing"]
    augment_level = (SYNTHETIC_PRESET if str(data).lower() == "synthetic" else DEFAULTS)["augment"]
    cfg["imgsz"] = cfg["imgsz"] or info.imgsz
    if cfg["optimizer"] not in ("sgd", "adamw"):
        raise EdgeDeployError(f"--opt {cfg['optimizer']!r}: use sgd or adamw")
    seed_everything(seed)
    dev = select_device(device)
    if workers is None:
        workers = default_workers(dev)

    train_ds, val_ds, class_names, data_root = classification_datasets(
        data, cfg["imgsz"], info.mean, info.std, num_classes=num_classes, seed=seed, progress=progress,
        augment=augment_level,
    )
    if len(class_names) < 2:
        raise EdgeDeployError(
            f"{data_root} has {len(class_names)} class ({', '.join(map(str, class_names)) or 'none'}): a classifier "
            "needs at least 2 (with one, the loss is 0 from the start and top-1 is 100% whatever the weights). "
            "Add a sub-folder per class under train/ and val/"
        )
    out = Path(out_dir) if out_dir is not None else run_dir("runs/train", info.name)
    out.mkdir(parents=True, exist_ok=True)

    # channels_last: ~1.7x faster depthwise/pointwise convs on CPU (oneDNN) and the layout tensor cores want
    model = create_model(info.name, num_classes=len(class_names)).to(dev, memory_format=torch.channels_last)
    # torchvision's MobileNetV3 uses BN momentum 0.01 (tuned for 600-epoch ImageNet runs): in a short run the
    # running statistics trail the weights so far that eval mode predicts one class (measured: 16.5% eval-mode
    # vs 40% with batch statistics). PyTorch's default 0.1 keeps them current.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, 0.1)
    ema_model = ModelEMA(model) if ema else None
    opt = build_optimizer(model, cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    generator = torch.Generator()
    loader = DataLoader(
        train_ds,
        batch_size=cfg["batch_size"],
        sampler=RandomSampler(train_ds, generator=generator),
        num_workers=workers,
        drop_last=len(train_ds) > cfg["batch_size"],  # a 1-image last batch breaks BatchNorm
        pin_memory=dev.type == "cuda",
        generator=generator,  # worker seeds too: augmentation is reproducible per epoch
    )
    scheduler = WarmupCosine(opt, cfg["epochs"], len(loader), warmup_epochs=min(warmup_epochs, cfg["epochs"] / 2))
    scaler = make_grad_scaler(dev, amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    logger = MetricsLogger(out)
    train_args = {
        "model_name": info.name, "data": str(data), "seed": seed, "epochs": cfg["epochs"],
        "batch_size": cfg["batch_size"], "imgsz": cfg["imgsz"], "lr": cfg["lr"], "optimizer": cfg["optimizer"],
        "weight_decay": cfg["weight_decay"], "label_smoothing": label_smoothing, "ema": bool(ema),
        "warmup_epochs": warmup_epochs, "num_classes": num_classes,
    }
    from edgedeploy.data.preprocess import InputConvention

    meta = {
        "model_name": info.name, "task": "classify", "num_classes": len(class_names), "class_names": class_names,
        "imgsz": cfg["imgsz"], "mean": list(info.mean), "std": list(info.std), **record_data(data, data_root),
        "train_args": train_args,
        "preprocess": InputConvention.from_info(info).to_dict(),  # the input convention travels with the weights
    }

    start_epoch, best_top1 = 0, -1.0
    if resume_path is not None:
        start_epoch, best, _ = load_for_resume(resume_path, model, ema_model, opt, scheduler, scaler)
        best_top1 = best if best is not None else -1.0
        if start_epoch >= cfg["epochs"]:
            raise EdgeDeployError(
                f"{resume_path} already finished all {cfg['epochs']} epochs; start a new run to train longer"
            )
        logger.truncate(start_epoch)
        print(f"resuming {resume_path} at epoch {start_epoch + 1}/{cfg['epochs']}")

    print(f"data: {Path(data_root).resolve()} ({describe_layout(data_root)})"
          + "".join(f"; {d.split}: {len(d.skipped)} file(s) skipped (named above)" for d in (train_ds, val_ds)
                    if getattr(d, "skipped", None)))
    print(
        f"training {info.name} on {data_root} ({len(train_ds)} train / {len(val_ds)} val images, "
        f"{len(class_names)} classes) at {cfg['imgsz']}px on {dev}, {cfg['epochs']} epochs -> {out}"
    )
    last_eval: dict[str, Any] = {"top1": float("nan"), "top5": float("nan")}
    for epoch in range(start_epoch, cfg["epochs"]):
        t_epoch = time.perf_counter()
        # Seed per epoch (order, augmentation, dropout): a resumed run repeats exactly what the interrupted one did
        generator.manual_seed(seed * 1000 + epoch)
        torch.manual_seed(seed * 1000 + epoch)
        loss, acc = _train_one_epoch(
            model, loader, criterion, opt, scheduler, scaler, ema_model, dev, amp, epoch, cfg["epochs"], progress
        )
        eval_model = ema_model.ema if ema_model is not None else model
        last_eval = evaluate_classifier(eval_model, val_ds, batch_size=max(64, cfg["batch_size"]), progress=progress)
        improved = last_eval["top1"] > best_top1
        best_top1 = max(best_top1, last_eval["top1"])
        row = {
            "epoch": epoch, "train/loss": loss, "train/top1": acc, "val/top1": last_eval["top1"],
            "val/top5": last_eval["top5"], "lr": opt.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t_epoch,
        }
        logger.log(row)
        logger.plot(out / "results.png")
        meta_now = {**meta, "epoch": epoch, "top1": last_eval["top1"], "top5": last_eval["top5"]}
        save_checkpoint(out / "last.pt", model, ema_model, opt, scheduler, epoch, best_top1, meta_now, scaler=scaler)
        if improved:
            save_checkpoint(out / "best.pt", model, ema_model, None, None, epoch, best_top1, meta_now)
        print(
            f"epoch {epoch + 1}/{cfg['epochs']}: loss {loss:.4f}  train top-1 {acc:.3f}  "
            f"val top-1 {last_eval['top1']:.4f}  top-5 {last_eval['top5']:.4f}  ({row['epoch_s']:.1f}s)"
        )

    return TrainResult(
        run_dir=out,
        last=out / "last.pt",
        best=out / "best.pt",
        best_top1=best_top1,
        top1=last_eval["top1"],
        top5=last_eval["top5"],
        epochs=cfg["epochs"],
        wall_s=time.perf_counter() - t_start,
        class_names=list(class_names),
        metrics=list(logger.rows),
    )


def default_workers(dev: torch.device) -> int:
    """Loader processes: augmentation runs single-threaded in workers, while in the main process it would
    fight the training threads for the cores (ColorJitter is ~50x slower there on a busy 2-core CPU).
    """
    cpus = os.cpu_count() or 1
    return min(4, max(1, cpus - 1)) if dev.type == "cuda" else min(2, max(1, cpus // 2))


def _train_one_epoch(model, loader, criterion, opt, scheduler, scaler, ema, dev, amp, epoch, epochs, progress):
    from tqdm import tqdm

    model.train()
    total_loss = 0.0
    seen = hits = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, disable=not progress)
    for x, y in bar:
        x = x.to(dev, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(dev, non_blocking=True)
        with autocast(dev, amp):
            logits = model(x)
            loss = criterion(logits, y)
        if not torch.isfinite(loss):
            raise EdgeDeployError(
                f"loss became {loss.item()} at epoch {epoch + 1}: lower --lr (now {opt.param_groups[0]['lr']:.3g})"
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        total_loss += loss.item() * y.shape[0]
        hits += int((logits.argmax(1) == y).sum())
        seen += y.shape[0]
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", lr=f"{opt.param_groups[0]['lr']:.3g}")
    return total_loss / max(1, seen), hits / max(1, seen)


def _saved_train_args(path: Path) -> dict[str, Any]:
    from edgedeploy.models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    args = (ckpt.get("meta") or {}).get("train_args")
    if not isinstance(args, dict) or ckpt.get("epoch") is None:
        raise CheckpointError(f"{path} is not a classification training checkpoint of `deploy train`: cannot resume")
    return args
