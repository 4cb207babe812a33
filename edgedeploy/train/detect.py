"""Detector training: `deploy train --model yolox_nano|yolov5n --data DIR|synthetic`.

Mosaic + HSV + flip augmentation (mosaic off for the last `--close-mosaic` epochs, when YOLOX also switches
its L1 box loss on), letterboxed inputs, warm-up + cosine LR, EMA, AMP on CUDA, COCO mAP every epoch on the
EMA weights, `last.pt` / `best.pt` (by mAP@.5:.95), metrics.csv/json, results.png, pr_curve.png, resume.
`DetectSpec` is what detection plugs into the shared loop, `edgedeploy.train.loop.fit`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from edgedeploy.errors import DatasetError
from edgedeploy.tasks import DETECT
from edgedeploy.train.config import DetectConfig, Trainer, as_config
from edgedeploy.train.loop import TaskSpec, fit

# Overrides of `--data synthetic` (DetectConfig holds the defaults): the shapes set does not need the model's
# 416/640 px, and CPUs thank us.
SYNTHETIC_PRESET: dict[str, Any] = {"imgsz": 256}


# ------------------------------------------------------------------------------------------- data and models


def synthetic_params(cfg: DetectConfig, imgsz: int) -> dict[str, Any]:
    from edgedeploy.data.synthetic_detect import SHAPES

    return {"num_train": cfg.synthetic_train, "num_val": cfg.synthetic_val, "imgsz": imgsz, "seed": cfg.seed,
            "num_classes": int(cfg.num_classes or len(SHAPES))}


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


def train_detector(model: str | DetectConfig = "yolox_nano", data: str | os.PathLike = "synthetic",
                   **options: Any) -> dict[str, Any]:
    """Train a registered detector; returns a summary dict (run dir, best/last paths, mAP of the best weights).

    Pass a `DetectConfig`, or a model name, data and `DetectConfig` fields as keyword arguments (those not given
    take the synthetic preset with `data="synthetic"`, else the config's defaults).
    """
    cfg = as_config(DetectConfig, SYNTHETIC_PRESET, model, data, **options)
    spec = DetectSpec(cfg)
    run = fit(spec)
    return spec.final_report(run.cfg)


class DetectSpec(TaskSpec):
    """YOLO losses on mosaic/HSV/flip-augmented letterboxed images; COCO mAP@.5:.95 of the EMA weights (after
    precise BN) picks best.pt. The last `close_mosaic` epochs train on plain images (YOLOX adds its L1 loss)."""

    task = "detect"
    metric = "val/mAP50-95"
    nan_hint = " or check the labels"

    def load_data(self):
        import torch
        from torch.utils.data import DataLoader

        from edgedeploy.data.detect_augment import DetectionTrainSet, collate_detection
        from edgedeploy.data.preprocess import InputConvention
        from edgedeploy.data.sources import open_detection_data
        from edgedeploy.models.artifact import check_family

        cfg, info = self.cfg, self.info
        self.synthetic = synthetic_params(cfg, cfg.imgsz)
        self.train_ds = open_detection_data(cfg.data, "train", cfg.imgsz, self.synthetic)
        self.val_ds = open_detection_data(cfg.data, "val", cfg.imgsz, self.synthetic)
        if self.val_ds.names != self.train_ds.names:
            raise DatasetError(f"train and val splits disagree on class names: {self.train_ds.names} vs {self.val_ds.names}")
        print(f"data: {self.train_ds.root} ({self.train_ds.layout or self.train_ds.format})")
        print(self.train_ds.summary())
        print(self.val_ds.summary())
        # the model is built here: its initial weights may bring the input convention the loaders need
        from edgedeploy.models.registry import create_model

        self.model = create_model(info.name, num_classes=len(self.train_ds.names))
        self.convention = InputConvention.from_info(info)
        self.weights_source = ""
        if cfg.weights:  # official weights keep their input convention (and so does the export)
            from edgedeploy.models.checkpoint import resolve_weights

            from edgedeploy.models.checkpoint import read_checkpoint_meta

            check_family(read_checkpoint_meta(cfg.weights).model_name, info.name, cfg.weights)
            self.resolved = resolve_weights(cfg.weights, info.name, model=self.model)
            load_finetune_weights(self.model, self.resolved, cfg.weights)
            if self.resolved.meta.get("preprocess"):
                self.convention = InputConvention.from_dict(self.resolved.meta["preprocess"])
                self.weights_source = str(self.resolved.meta.get("source", ""))
                c = self.convention
                print(f"input convention of {cfg.weights}: {c.channel_order.upper()}, scale {c.scale:.6g}, "
                      f"mean {list(c.mean)}, std {list(c.std)}")
        self.train_set = DetectionTrainSet(self.train_ds, cfg.imgsz, augment=True, mosaic=cfg.mosaic, hsv=cfg.hsv,
                                           flip=cfg.flip, seed=cfg.seed, convention=self.convention)
        self.batch = min(cfg.batch_size, len(self.train_set))
        # Plain letterboxed training images (what evaluation sees) for re-estimating BatchNorm statistics.
        self.calib_loader = DataLoader(
            DetectionTrainSet(self.train_ds, cfg.imgsz, augment=False, convention=self.convention), batch_size=self.batch,
            shuffle=True, num_workers=self.workers, collate_fn=collate_detection,
            generator=torch.Generator().manual_seed(cfg.seed + 1),
        )  # fmt: skip
        self.close_mosaic = (cfg.close_mosaic if cfg.close_mosaic is not None
                             else max(1, round(0.15 * cfg.epochs)) if cfg.mosaic > 0 else 0)
        return DataLoader(
            self.train_set, batch_size=self.batch, shuffle=True, num_workers=self.workers, collate_fn=collate_detection,
            drop_last=len(self.train_set) >= 2 * self.batch, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),
        )  # fmt: skip

    def build_model(self, resuming: bool):
        from edgedeploy.train.detect_losses import build_detection_loss

        model = self.model.to(self.device)
        self.loss_fn = build_detection_loss(model)
        return model

    def make_ema(self, model, total_iters: int):
        from edgedeploy.train.common import ModelEMA

        # time constant scaled to the run: YOLOv5's 2000 iterations would leave a short run's EMA at its init
        return ModelEMA(model, tau=float(min(2000, max(1, total_iters // 4))))

    def meta(self) -> dict[str, Any]:
        cfg, info, names = self.cfg, self.info, self.train_ds.names
        meta = {
            "model_name": info.name, "family": info.family, "task": "detect", "num_classes": len(names),
            "class_names": list(names), "imgsz": cfg.imgsz, "data": _data_ref(cfg.data), "data_as_typed": str(cfg.data),
            "mean": list(info.mean), "std": list(info.std), "letterbox": True, "epochs": cfg.epochs,
            "preprocess": self.convention.to_dict(), "weights_source": self.weights_source,
        }  # fmt: skip
        if str(cfg.data).lower() == "synthetic":
            meta["synthetic"] = self.synthetic  # lets `deploy eval` regenerate exactly this set
        return meta

    def start_epoch(self, epoch: int, model) -> str:
        plain = epoch >= self.cfg.epochs - self.close_mosaic
        if plain:
            self.train_set.close_mosaic()
            _set_l1(model, self.loss_fn, self.info.family == "yolox")
        self.train_set.set_epoch(epoch)
        return " (no mosaic)" if plain else ""

    def loss(self, model, batch):
        images = batch[0].to(self.device, non_blocking=True)
        loss, items = self.loss_fn(model(images), batch[1].to(self.device))
        return loss, _loss_items(loss, items), 1

    def validate(self, model, epoch: int):
        from edgedeploy.eval.predictors import torch_detect_fn

        recalibrate_batchnorm(model, self.calib_loader, self.device, self.cfg.precise_bn)
        metrics = self.evaluate(torch_detect_fn(model, self.device, amp=self.cfg.amp), verbose=False)
        return {"val/mAP50": metrics.map50, "val/mAP50-95": metrics.map}, {}

    def evaluate(self, predict, verbose: bool):
        """COCO mAP of `predict` on the val split: the one place training calls the detection evaluator."""
        from edgedeploy.eval.detect import evaluate_detector

        return evaluate_detector(predict, self.val_ds, self.cfg.imgsz, mean=self.info.mean, std=self.info.std,
                                 batch_size=max(1, self.batch), out_dir=self.out, verbose=verbose, desc="val",
                                 progress=self.cfg.progress, convention=self.convention)

    def describe(self, row: dict[str, Any]) -> str:
        return f"  mAP@.5 {row['val/mAP50']:.4f}  mAP@.5:.95 {row['val/mAP50-95']:.4f}" if "val/mAP50" in row else ""

    def final_report(self, cfg: DetectConfig) -> dict[str, Any]:
        """The COCO table, per-class AP and the PR curve of the best weights; the summary `train_detector` returns."""
        from edgedeploy.eval.detect import load_detector
        from edgedeploy.eval.predictors import torch_detect_fn
        from edgedeploy.io import atomic_write_json

        out = self.out
        best_path = out / "best.pt" if (out / "best.pt").is_file() else out / "last.pt"
        final_model = load_detector(best_path, self.info.name).to(self.device)
        print(f"\nvalidating {best_path}:")
        metrics = self.evaluate(torch_detect_fn(final_model, self.device), verbose=True)
        print(metrics.class_table())
        atomic_write_json(out / "val_metrics.json", metrics.as_dict())
        print(f"best mAP@.5 {metrics.map50:.4f}  mAP@.5:.95 {metrics.map:.4f}  weights {best_path}")
        return {
            "run_dir": str(out), "best": str(best_path), "last": str(out / "last.pt"), "mAP50": metrics.map50,
            "mAP50-95": metrics.map, "epochs": cfg.epochs, "imgsz": cfg.imgsz, "model": self.info.name,
        }  # fmt: skip


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


DETECT.provides("trainer")(Trainer(DetectConfig, SYNTHETIC_PRESET, train_detector, None))
