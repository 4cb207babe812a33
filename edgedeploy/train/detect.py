"""Detector training: `deploy train --model yolox_nano|yolov5n --data DIR|synthetic`.

Mosaic + HSV + flip augmentation (mosaic off for the last `--close-mosaic` epochs, when YOLOX also switches
its L1 box loss on), letterboxed inputs, warm-up + cosine LR, EMA, AMP on CUDA, COCO mAP every epoch on the
EMA weights, `last.pt` / `best.pt` (by mAP@.5:.95), metrics.csv/json, results.png, pr_curve.png, resume.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgedeploy.errors import CheckpointError, DatasetError, EdgeDeployError

log = logging.getLogger("edgedeploy.train")

SYNTHETIC_IMGSZ = 256
DEFAULT_EPOCHS = 30


@dataclass
class DetectTrainConfig:
    model: str = "yolox_nano"
    data: str = "synthetic"
    epochs: int | None = None  # default: 30, or what the resumed run planned
    batch: int = 16
    imgsz: int | None = None  # default: the model's registered size
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    mosaic: float = 1.0  # probability of a 4-image mosaic per sample
    close_mosaic: int | None = None  # last N epochs without mosaic; default ~15% of the run
    hsv: bool = True
    flip: float = 0.5
    ema: bool = True
    amp: bool = True
    device: str | None = None
    workers: int = 2
    seed: int = 0
    weights: str | None = None  # initial weights (same model family)
    resume: str | bool | None = None  # a run folder or its last.pt; True: resume `out`
    out: str | None = None  # run folder; default project/name, name2, ...
    project: str = "runs/train"
    name: str | None = None
    num_classes: int | None = None  # synthetic only: how many shape classes
    progress: bool = True
    eval_interval: int = 1
    max_iters: int | None = None  # stop each epoch after this many iterations (smoke tests)
    synthetic_train: int = 512
    synthetic_val: int = 128
    grad_clip: float = 10.0
    precise_bn: int = 8  # batches to re-estimate BatchNorm statistics before each evaluation (0: off)
    time_limit: float | None = None  # minutes: stop after the epoch in which it runs out (then the final eval)
    extra: dict = field(default_factory=dict)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Detection flags for `deploy train` (flags the shared parser already defines are left alone)."""
    have = set(parser._option_string_actions)
    options = (
        ("--mosaic", {"type": float, "default": 1.0, "help": "detect: probability of 4-image mosaic"}),
        ("--close-mosaic", {"type": int, "default": None, "help": "detect: last N epochs without mosaic (default ~15%%)"}),
        ("--no-hsv", {"action": "store_true", "help": "detect: no HSV colour jitter"}),
        ("--flip", {"type": float, "default": 0.5, "help": "detect: horizontal flip probability"}),
        ("--eval-interval", {"type": int, "default": 1, "help": "detect: evaluate mAP every N epochs"}),
        ("--time-limit", {"type": float, "default": None, "help": "detect: stop training after this many minutes"}),
        ("--precise-bn", {"type": int, "default": 8, "help": "detect: batches to re-estimate BatchNorm stats before eval (0: off)"}),
        ("--synthetic-train", {"type": int, "default": 512, "help": "detect: images in the synthetic train split"}),
        ("--synthetic-val", {"type": int, "default": 128, "help": "detect: images in the synthetic val split"}),
    )
    for flag, kw in options:
        if flag not in have:
            parser.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace | DetectTrainConfig) -> DetectTrainConfig:
    """Map the `deploy train` namespace (whatever subset of flags it has) onto the config."""
    if isinstance(args, DetectTrainConfig):
        return args
    cfg = DetectTrainConfig()
    aliases = {"batch": ("batch", "batch_size"), "workers": ("workers", "num_workers"), "lr": ("lr", "learning_rate"),
               "weight_decay": ("weight_decay", "wd"), "optimizer": ("optimizer", "opt")}
    for f in fields(cfg):
        for name in aliases.get(f.name, (f.name,)):
            value = getattr(args, name, None)
            if value is not None and value is not False:
                setattr(cfg, f.name, value)
                break
    if getattr(args, "quiet", False):
        cfg.progress = False
    if getattr(args, "imgsz", None) is None and str(cfg.data).lower() == "synthetic":
        cfg.imgsz = SYNTHETIC_IMGSZ  # the shapes set does not need the model's 416/640 (and CPUs thank us)
    if getattr(args, "no_hsv", False):
        cfg.hsv = False
    if getattr(args, "no_ema", False):
        cfg.ema = False
    if getattr(args, "no_amp", False):
        cfg.amp = False
    return cfg


# ------------------------------------------------------------------------------------------- data and models


def synthetic_params(cfg: DetectTrainConfig, imgsz: int) -> dict[str, Any]:
    from edgedeploy.data.synthetic_detect import SHAPES

    return {"num_train": cfg.synthetic_train, "num_val": cfg.synthetic_val, "imgsz": imgsz, "seed": cfg.seed,
            "num_classes": int(cfg.num_classes or len(SHAPES))}


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Our checkpoint's meta, or for an official checkpoint its source, variant, classes and input convention."""
    from edgedeploy.models.checkpoint import checkpoint_meta as _meta

    return _meta(path)


def load_finetune_weights(model, resolved, path) -> None:
    """Load resolved weights for fine-tuning. When only the class-dependent prediction layers of the head differ in
    shape (another class count), those are kept freshly initialised, loudly; any other mismatch is an error."""
    from edgedeploy.models.checkpoint import apply_weights

    own = model.state_dict()
    sd = resolved.state_dict
    differ = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if not differ or not all(k.startswith("head.") for k in differ) or set(own) != set(sd):
        apply_weights(model, resolved)  # exact fit, or the usual error naming keys and the fix
        return
    keep = {k: v for k, v in sd.items() if k not in differ}
    model.load_state_dict({**own, **keep}, strict=True)
    before = resolved.meta.get("num_classes") or "another number of"
    print(f"{path}: {before} classes in the checkpoint, {model.num_classes} in the data: the class-dependent head "
          f"layers ({', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}; {len(differ)} tensors) are "
          f"re-initialised and trained from scratch; the other {len(keep)} tensors are loaded from the checkpoint.")


def recalibrate_batchnorm(model, loader, device, batches: int) -> int:
    """Precise BN: replace BatchNorm running statistics by a plain average over `batches` training batches.

    The YOLO recipes use BN momentum 0.03, so running statistics trail the weights by ~30 iterations and start
    from mean 0 / var 1: after a short run (or early in a long one) eval-mode outputs are far off although
    train-mode outputs are right (measured: yolox_nano overfitting 8 images, best score 0.77 in train mode and
    0.0002 in eval mode after 60 iterations). Returns the number of batches used.
    """
    import torch
    import torch.nn as nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    with torch.no_grad():
        for images, _ in loader:
            if used >= batches:
                break
            model(images.to(device))
            used += 1
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return used


def _set_l1(model, loss_fn, enabled: bool) -> bool:
    """YOLOX adds an L1 box loss once mosaic is off; set the flag wherever this loss/model keeps it."""
    changed = False
    for obj in (loss_fn, getattr(model, "head", None), model):
        if obj is not None and hasattr(obj, "use_l1"):
            obj.use_l1 = enabled
            changed = True
    return changed


# ----------------------------------------------------------------------------------------------------- train


def train_detector(args: argparse.Namespace | DetectTrainConfig) -> dict[str, Any]:
    """Train a registered detector; returns a summary dict (run dir, best mAP, paths)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from edgedeploy.data.detect_augment import DetectionTrainSet, collate_detection
    from edgedeploy.io import atomic_write_json
    from edgedeploy.models.registry import create_model, get_model_info
    from edgedeploy.train.common import (
        MetricsLogger, ModelEMA, WarmupCosine, autocast, build_optimizer, load_for_resume, make_grad_scaler,
        run_dir, save_checkpoint, seed_everything,
    )  # fmt: skip
    from edgedeploy.data.yolo_format import open_detection_data
    from edgedeploy.eval.detect import check_family, evaluate_detector, load_detector
    from edgedeploy.eval.predictors import select_device, torch_detect_fn
    from edgedeploy.train.detect_losses import build_detection_loss

    cfg = config_from_args(args)
    info = get_model_info(cfg.model)
    if info.task != "detect":
        raise EdgeDeployError(f"{info.name} is a {info.task} model; detection training needs a detector (yolox_nano, yolov5n, ...)")
    imgsz = int(cfg.imgsz or info.imgsz)
    if imgsz % 32:
        raise EdgeDeployError(f"--imgsz {imgsz}: detectors need a multiple of 32 (stride of the last level); try {round(imgsz / 32) * 32}")
    seed_everything(cfg.seed)
    device = select_device(cfg.device)

    # Resume: the run folder and the config come from the checkpoint being resumed.
    resume_path = None
    synthetic = synthetic_params(cfg, imgsz)
    if cfg.resume:
        if cfg.resume is True and not cfg.out:
            raise CheckpointError("--resume without a path needs --out RUN (the run folder to continue)")
        resume_path = Path(cfg.out if cfg.resume is True else cfg.resume)
        resume_path = resume_path / "last.pt" if resume_path.is_dir() else resume_path
        if not resume_path.is_file():
            raise CheckpointError(f"--resume {cfg.resume}: no last.pt there")
        saved = checkpoint_meta(resume_path)
        check_family(saved, cfg.model, resume_path)
        imgsz = int(saved.get("imgsz", imgsz))
        synthetic = saved.get("synthetic") or synthetic
        cfg.data = saved.get("data", cfg.data)
        cfg.epochs = cfg.epochs or saved.get("epochs")

    cfg.epochs = int(cfg.epochs or DEFAULT_EPOCHS)
    # the data is read before the run folder exists: a dataset problem leaves nothing behind
    train_ds = open_detection_data(cfg.data, "train", imgsz, synthetic)
    val_ds = open_detection_data(cfg.data, "val", imgsz, synthetic)
    if val_ds.names != train_ds.names:
        raise DatasetError(f"train and val splits disagree on class names: {train_ds.names} vs {val_ds.names}")
    if resume_path is not None:
        out = resume_path.parent
    elif cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = run_dir(cfg.project, cfg.name or info.name)
    print(f"data: {train_ds.root} ({train_ds.layout or train_ds.format})")
    print(train_ds.summary())
    print(val_ds.summary())
    names = train_ds.names

    model = create_model(info.name, num_classes=len(names))
    from edgedeploy.data.preprocess import InputConvention

    convention = InputConvention.from_info(info)
    weights_source = ""
    if cfg.weights:
        from edgedeploy.models.checkpoint import resolve_weights

        check_family(checkpoint_meta(cfg.weights), info.name, cfg.weights)
        resolved = resolve_weights(cfg.weights, info.name, model=model)
        load_finetune_weights(model, resolved, cfg.weights)
        if resolved.meta.get("preprocess"):  # official weights keep their input convention (and so does the export)
            convention = InputConvention.from_dict(resolved.meta["preprocess"])
            weights_source = str(resolved.meta.get("source", ""))
            print(f"input convention of {cfg.weights}: {convention.channel_order.upper()}, scale {convention.scale:.6g}, "
                  f"mean {list(convention.mean)}, std {list(convention.std)}")
    model.to(device)
    loss_fn = build_detection_loss(model)

    train_set = DetectionTrainSet(train_ds, imgsz, augment=True, mosaic=cfg.mosaic, hsv=cfg.hsv, flip=cfg.flip, seed=cfg.seed,
                                  convention=convention)
    batch = min(cfg.batch, len(train_set))
    loader = DataLoader(
        train_set, batch_size=batch, shuffle=True, num_workers=cfg.workers, collate_fn=collate_detection,
        drop_last=len(train_set) >= 2 * batch, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    # Plain letterboxed training images (what evaluation sees) for re-estimating BatchNorm statistics.
    calib_loader = DataLoader(
        DetectionTrainSet(train_ds, imgsz, augment=False, convention=convention), batch_size=batch, shuffle=True, num_workers=cfg.workers,
        collate_fn=collate_detection, generator=torch.Generator().manual_seed(cfg.seed + 1),
    )  # fmt: skip
    iters_per_epoch = min(len(loader), cfg.max_iters or len(loader))
    total_iters = cfg.epochs * iters_per_epoch
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler = WarmupCosine(optimizer, cfg.epochs, iters_per_epoch, warmup_epochs=cfg.warmup_epochs)
    # EMA time constant scaled to the run: YOLOv5's 2000 iterations would leave a short run's EMA at its init.
    ema = ModelEMA(model, tau=float(min(2000, max(1, total_iters // 4)))) if cfg.ema else None
    scaler = make_grad_scaler(device, cfg.amp)
    close_mosaic = cfg.close_mosaic if cfg.close_mosaic is not None else max(1, round(0.15 * cfg.epochs)) if cfg.mosaic > 0 else 0

    meta = {
        "model_name": info.name, "family": info.family, "task": "detect", "num_classes": len(names),
        "class_names": list(names), "imgsz": imgsz, "data": _data_ref(cfg.data), "data_as_typed": str(cfg.data), "mean": list(info.mean),
        "std": list(info.std), "letterbox": True, "epochs": cfg.epochs,
        "preprocess": convention.to_dict(), "weights_source": weights_source,
    }  # fmt: skip
    if str(cfg.data).lower() == "synthetic":
        meta["synthetic"] = synthetic  # lets `deploy eval` regenerate exactly this set
    logger = MetricsLogger(out)
    start_epoch, best = 0, None
    if resume_path is not None:
        start_epoch, best, _ = load_for_resume(resume_path, model, ema, optimizer, scheduler, scaler)
        logger.truncate(start_epoch + 1)  # rows count epochs from 1: keep 1..start_epoch
        print(f"resuming {resume_path} at epoch {start_epoch + 1}/{cfg.epochs}")
    best = -1.0 if best is None else float(best)
    print(f"training {info.name} ({len(names)} classes) at {imgsz}px on {device} for {cfg.epochs} epochs -> {out}")

    eval_model = lambda: ema.ema if ema is not None else model  # noqa: E731
    metrics = None
    deadline = time.monotonic() + 60 * cfg.time_limit if cfg.time_limit else None
    for epoch in range(start_epoch, cfg.epochs):
        plain = epoch >= cfg.epochs - close_mosaic
        if plain:
            train_set.close_mosaic()
            _set_l1(model, loss_fn, info.family == "yolox")
        train_set.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(loader, total=iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}{' (no mosaic)' if plain else ''}", unit="it", leave=False, disable=not cfg.progress)
        n = 0
        for images, targets in bar:
            if n >= iters_per_epoch:
                break
            images = images.to(device, non_blocking=True)
            targets = targets.to(device)
            with autocast(device, cfg.amp):
                loss, items = loss_fn(model(images), targets)
            if not torch.isfinite(loss):
                raise EdgeDeployError(f"loss became {loss.item()} at epoch {epoch + 1}: lower --lr (now {cfg.lr}) or check the labels")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            n += 1
            for k, v in _loss_items(loss, items).items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items()})
        bar.close()
        row: dict[str, Any] = {"epoch": epoch + 1}
        row.update({f"train/{k}": v / max(n, 1) for k, v in sums.items()})
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["time/train_s"] = time.perf_counter() - t0

        out_of_time = deadline is not None and time.monotonic() > deadline
        last_epoch = epoch == cfg.epochs - 1 or out_of_time
        if (epoch + 1) % max(1, cfg.eval_interval) == 0 or last_epoch:
            recalibrate_batchnorm(eval_model(), calib_loader, device, cfg.precise_bn)
            metrics = evaluate_detector(
                torch_detect_fn(eval_model(), device, amp=cfg.amp), val_ds, imgsz, mean=info.mean, std=info.std,
                batch_size=max(1, batch), out_dir=out, verbose=False, desc="val", progress=cfg.progress,
                convention=convention,
            )  # fmt: skip
            row.update({"val/mAP50": metrics.map50, "val/mAP50-95": metrics.map})
            if metrics.map > best:
                best = metrics.map
                save_checkpoint(out / "best.pt", model, ema, None, None, epoch, best, meta)
        logger.log(row)
        logger.plot(out / "results.png")
        save_checkpoint(out / "last.pt", model, ema, optimizer, scheduler, epoch, best, meta, scaler=scaler)
        val_text = f"  mAP@.5 {row['val/mAP50']:.4f}  mAP@.5:.95 {row['val/mAP50-95']:.4f}" if "val/mAP50" in row else ""
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row.get('train/loss', float('nan')):.4f}{val_text}  ({row['time/train_s']:.0f} s)")
        if out_of_time and epoch < cfg.epochs - 1:
            print(f"--time-limit {cfg.time_limit:g} min reached after epoch {epoch + 1}: stopping (resume with --resume {out})")
            break

    # Final report on the best weights: the COCO table, per-class AP and the PR curve.
    best_path = out / "best.pt" if (out / "best.pt").is_file() else out / "last.pt"
    final_model = load_detector(best_path, info.name).to(device)
    print(f"\nvalidating {best_path}:")
    metrics = evaluate_detector(torch_detect_fn(final_model, device), val_ds, imgsz, mean=info.mean, std=info.std, batch_size=max(1, batch), out_dir=out, desc="val", progress=cfg.progress, convention=convention)
    print(metrics.class_table())
    atomic_write_json(out / "val_metrics.json", metrics.as_dict())
    summary = {
        "run_dir": str(out), "best": str(best_path), "last": str(out / "last.pt"), "mAP50": metrics.map50,
        "mAP50-95": metrics.map, "epochs": cfg.epochs, "imgsz": imgsz, "model": info.name,
    }  # fmt: skip
    print(f"best mAP@.5 {metrics.map50:.4f}  mAP@.5:.95 {metrics.map:.4f}  weights {best_path}")
    return summary


def _data_ref(data: str | os.PathLike) -> str:
    """How the checkpoint remembers its data: `synthetic`, or an absolute path (eval may run from elsewhere)."""
    return "synthetic" if str(data).lower() == "synthetic" else str(Path(data).resolve())


def _loss_items(loss, items) -> dict[str, float]:
    """{'loss': total, parts...} from whatever the loss returns as its second value (dict or tensor)."""
    import torch

    out = {"loss": float(loss.detach())}
    if isinstance(items, dict):
        out.update({k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in items.items() if k != "loss"})
    elif isinstance(items, torch.Tensor) and items.numel() > 1:
        out.update({f"loss{i}": float(v) for i, v in enumerate(items.detach().flatten())})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def run(args: argparse.Namespace) -> int:
    """Entry point when `deploy train` dispatches a detector here."""
    train_detector(args)
    return 0
