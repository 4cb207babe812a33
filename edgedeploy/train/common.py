"""Task-agnostic training pieces: seeding, run folders, AMP, EMA, optimizer, LR schedules, checkpoints,
metrics. `edgedeploy.train.loop.fit` puts them together into the one training loop every task uses.

Checkpoint format (read back by `edgedeploy.models.checkpoint.load_weights`, EMA weights preferred)::

    {"model": state_dict, "ema": state_dict | None, "ema_updates": int, "optimizer": ..., "scheduler": ...,
     "scaler": ..., "epoch": last completed epoch (0-based index), "best_metric": float,
     "meta": {"model_name", "num_classes", "class_names", "imgsz", "task", ...}}
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler

from edgedeploy.errors import CheckpointError, EdgeDeployError
from edgedeploy.io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text

CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------- reproducibility


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). `deterministic` also asks cuDNN for reproducible kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def run_dir(base: str | os.PathLike = "runs/train", name: str = "exp", exist_ok: bool = False) -> Path:
    """Create and return base/name, or base/name2, base/name3 ... if taken (`exist_ok` reuses base/name)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    if exist_ok:
        (base / name).mkdir(exist_ok=True)
        return base / name
    for i in range(1, 10_000):
        path = base / (name if i == 1 else f"{name}{i}")
        try:
            path.mkdir()  # atomic: two runs started together never share a folder
            return path
        except FileExistsError:
            continue
    raise EdgeDeployError(f"{base}: no free run folder for {name!r}; clean up old runs")


# ------------------------------------------------------------------------------------------------------- AMP


def amp_enabled(device: torch.device, amp: bool = True) -> bool:
    """Mixed precision only on CUDA: CPU autocast (bfloat16) is slower than fp32 for these small models."""
    return bool(amp) and torch.device(device).type == "cuda"


def autocast(device: torch.device, amp: bool = True) -> contextlib.AbstractContextManager:
    if amp_enabled(device, amp):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_grad_scaler(device: torch.device, amp: bool = True) -> torch.amp.GradScaler:
    """A GradScaler that is a transparent no-op when AMP is off (so the loop is the same on CPU and GPU)."""
    return torch.amp.GradScaler("cuda", enabled=amp_enabled(device, amp))


# ------------------------------------------------------------------------------------------------ optimisation


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DataParallel/DDP/torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """Exponential moving average of a model's weights (Polyak averaging, as in YOLOv5/timm).

    The decay ramps up as `decay * (1 - exp(-updates / tau))`, so early, poor weights are forgotten quickly.
    Buffers that are not floating point (BatchNorm's num_batches_tracked) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    @classmethod
    def for_run(cls, model: nn.Module, total_iters: int, horizon: float = 0.05) -> "ModelEMA":
        """An EMA sized to a run of `total_iters` updates: ramp-up over ~a quarter of the run and an averaging
        window (1 / (1 - decay)) of at most `horizon` of it. With the fixed 0.9999 decay a run of a few thousand
        iterations ends with an average that has stopped following the model (measured on LR-ASPP: EMA val mIoU
        frozen at 26 % while the model itself reached 32 %)."""
        window = max(10.0, horizon * total_iters)
        return cls(model, decay=min(0.9999, 1.0 - 1.0 / window), tau=float(min(2000, max(1, total_iters // 4))))

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        source = unwrap(model).state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1.0 - d)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor], updates: int) -> None:
        self.ema.load_state_dict(state)
        self.updates = updates


def build_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW. Biases and norm-layer weights (every 0/1-d parameter) get no weight decay:
    decaying them only shrinks BatchNorm scales and hurts accuracy of small models.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise EdgeDeployError(f"unknown optimizer {name!r}: use sgd or adamw")


class WarmupCosine(LRScheduler):
    """Per-iteration LR: linear warm-up from `warmup_start_factor*lr` to `lr` over `warmup_epochs`, then a
    cosine decay to `lr*final_factor` at the last iteration. Call `step()` after every optimizer step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        iters_per_epoch: int,
        warmup_epochs: float = 1.0,
        final_factor: float = 0.01,
        warmup_start_factor: float = 0.1,
        last_epoch: int = -1,
    ):
        self.total_iters = max(1, int(epochs * iters_per_epoch))
        self.warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), self.total_iters - 1)
        self.final_factor = final_factor
        self.warmup_start_factor = warmup_start_factor
        super().__init__(optimizer, last_epoch)  # `last_epoch` counts iterations here

    def factor(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * it / self.warmup_iters
        span = max(1, self.total_iters - 1 - self.warmup_iters)
        progress = min(1.0, (it - self.warmup_iters) / span)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


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


SCHEDULES = {"cosine": WarmupCosine, "poly": WarmupPoly}


# ----------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    ema: ModelEMA | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: LRScheduler | None,
    epoch: int,
    best_metric: float | None,
    meta: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write a training checkpoint atomically (a crash mid-write leaves the previous file intact).

    `epoch` is the last completed epoch (0-based); `meta` should carry model_name, num_classes, class_names,
    imgsz and task so `deploy eval/export` can rebuild the model without extra flags.
    """
    ckpt = {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "ema_updates": ema.updates if ema is not None else 0,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "best_metric": plain_tree(best_metric),
        "meta": plain_tree(dict(meta)),
        "version": CHECKPOINT_VERSION,
    }
    return atomic_torch_save(ckpt, path)


def load_for_resume(
    path: str | os.PathLike,
    model: nn.Module,
    ema: ModelEMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, float | None, dict[str, Any]]:
    """Restore everything `save_checkpoint` wrote. Returns (start_epoch, best_metric, meta), where
    start_epoch = saved epoch + 1 is the first epoch still to run.
    """
    from edgedeploy.models.checkpoint import check_state_dict, read_checkpoint

    ckpt = read_checkpoint(path)
    if "model" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model'/'epoch'): cannot resume from it")
    check_state_dict(unwrap(model), ckpt["model"])
    unwrap(model).load_state_dict(ckpt["model"])
    if ema is not None:
        if ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"], int(ckpt.get("ema_updates", 0)))
        else:  # the run was trained without EMA: start the average from the current weights
            ema.ema.load_state_dict(unwrap(model).state_dict())
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
        # re-apply the restored iteration's learning rate (the optimizer state carries the old one anyway)
        for group, lr in zip(optimizer.param_groups if optimizer else [], scheduler.get_last_lr()):
            group["lr"] = lr
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    meta = ckpt.get("meta") or {}
    return int(ckpt["epoch"]) + 1, ckpt.get("best_metric"), dict(meta)


# --------------------------------------------------------------------------------------------------- metrics


class MetricsLogger:
    """Per-epoch metrics in `<run>/metrics.csv` and `<run>/metrics.json` (rewritten atomically each epoch, so a
    reader never sees half a row) and training curves via `plot()`. Existing files are picked up on resume.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.csv_path = self.dir / "metrics.csv"
        self.json_path = self.dir / "metrics.json"
        self.rows: list[dict[str, Any]] = []
        if self.json_path.is_file():
            try:
                self.rows = list(json.loads(self.json_path.read_text()))
            except (OSError, ValueError):
                self.rows = []

    def truncate(self, start_epoch: int) -> None:
        """Drop rows of epochs >= start_epoch (a resumed run re-does them)."""
        self.rows = [r for r in self.rows if int(r.get("epoch", -1)) < start_epoch]

    def log(self, row: Mapping[str, Any]) -> None:
        self.rows.append({k: _plain(v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write_text(self.csv_path, buf.getvalue())
        atomic_write_json(self.json_path, self.rows)

    def plot(self, png_path: str | os.PathLike | None = None, x: str = "epoch") -> Path | None:
        """One small panel per numeric metric against `x`. Returns the PNG path (None if nothing to draw)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        png_path = Path(png_path) if png_path else self.dir / "results.png"
        keys = [k for k in _numeric_keys(self.rows) if k != x]
        if not self.rows or not keys:
            return None
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig = Figure(figsize=(3.2 * cols, 2.6 * rows), dpi=100, layout="tight")
        FigureCanvasAgg(fig)
        for i, key in enumerate(keys):
            ax = fig.add_subplot(rows, cols, i + 1)
            pts = [(r[x], r[key]) for r in self.rows if isinstance(r.get(key), (int, float)) and x in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1.5)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel(x, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, format="png")
        return png_path


def plain_tree(v: Any) -> Any:
    """Metadata made of plain Python values only (numpy/torch scalars -> numbers, paths -> str), so the
    checkpoint loads with torch.load(weights_only=True) and never needs an unpickler allow-list."""
    if isinstance(v, Mapping):
        return {str(k) if not isinstance(k, (int, str)) else k: plain_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [plain_tree(x) for x in v]
    if isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim > 0:
        return [plain_tree(x) for x in v.tolist()]
    v = _plain(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)  # Path, enum, argparse.Namespace ... -> its text


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _numeric_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]
    return keys
