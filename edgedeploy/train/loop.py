"""The training loop every task runs: `fit(spec)`.

A `TaskSpec` supplies what differs per task (data and loaders, model, loss, the validation metric, checkpoint
meta); the loop owns the rest: optimiser and LR schedule (warm-up, then cosine or poly per iteration), AMP with a
GradScaler, EMA weights (validated and saved), gradient clipping, exact resume from `last.pt`, `best.pt` by the
task's metric, metrics.csv/json and results.png, the time limit and progress bars.

Epoch numbering: logs, progress bars and metrics rows count epochs from 1 (`"epoch": 1` is the first epoch).
A checkpoint's `epoch` field is the 0-based index of the last completed epoch (`load_for_resume` returns the
next index to run), as it has always been.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgedeploy.errors import CheckpointError, EdgeDeployError
from edgedeploy.runtime.engine import select_device
from edgedeploy.train.common import (
    SCHEDULES,
    MetricsLogger,
    ModelEMA,
    autocast,
    build_optimizer,
    load_for_resume,
    make_grad_scaler,
    run_dir,
    save_checkpoint,
    seed_everything,
)
from edgedeploy.train.config import DEFAULT_EPOCHS, TrainConfig


def shuffled_loader(dataset, batch_size: int, workers: int, device: torch.device, generator: torch.Generator,
                    seed_workers: bool = True) -> torch.utils.data.DataLoader:
    """A training loader: shuffled by `generator` (the spec reseeds it per epoch), no 1-image last batch (it breaks
    BatchNorm), pinned memory on CUDA. `seed_workers`: the workers' augmentation seeds come from `generator` too
    (each epoch then draws one number from it before sampling)."""
    from torch.utils.data import DataLoader, RandomSampler

    return DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator),
                      num_workers=workers, drop_last=len(dataset) > batch_size, pin_memory=device.type == "cuda",
                      generator=generator if seed_workers else None)


class TaskSpec(abc.ABC):
    """What one task plugs into `fit`. The hooks run in this order: `load_data`, `build_model`, `make_ema`,
    `meta`, then per epoch `start_epoch`, `loss` per batch, `validate`. `fit` sets `cfg` (resolved: epochs and
    imgsz filled in, restored on resume), `info`, `device`, `workers` and `out` on the spec before using it."""

    task = ""  # the registry task this spec trains
    metric = ""  # row key of the score that picks best.pt, e.g. "val/top1"
    nan_hint = ""  # appended to the non-finite loss error

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info: Any = None
        self.device = torch.device("cpu")
        self.workers = 0
        self.out = Path(".")

    def default_workers(self, device: torch.device) -> int:
        return 0

    @abc.abstractmethod
    def load_data(self) -> torch.utils.data.DataLoader:
        """Open the datasets (before the run folder exists) and return the training loader."""
        raise NotImplementedError

    @abc.abstractmethod
    def build_model(self, resuming: bool) -> nn.Module:
        """The model on `self.device` (initial weights loaded unless resuming)."""
        raise NotImplementedError

    def make_ema(self, model: nn.Module, total_iters: int) -> ModelEMA:
        return ModelEMA(model)

    @abc.abstractmethod
    def meta(self) -> dict[str, Any]:
        """Checkpoint meta: model_name, task, num_classes, class_names, imgsz, ... (`train_args` is added)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, model: nn.Module) -> str:
        """Per-epoch seeding and recipe switches; returns a note for the progress bar."""
        return ""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss to backpropagate, values to average over the epoch, batch weight), run under autocast."""
        raise NotImplementedError

    @abc.abstractmethod
    def validate(self, model: nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
        """(row entries "val/..." including `metric`, extra checkpoint meta) for the weights to deploy."""
        raise NotImplementedError

    def describe(self, row: dict[str, Any]) -> str:
        """The validation part of an epoch's printed line."""
        return ""


@dataclass
class Fit:
    """What `fit` leaves: the run folder, the resolved config, the best metric and the last validation."""

    cfg: TrainConfig
    run_dir: Path
    best: float
    val: dict[str, float]
    extra: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


def resume_checkpoint(resume: bool | str, out_dir: str | None) -> Path:
    """The last.pt to continue: `resume=True` -> out_dir/last.pt; a run folder -> its last.pt; or the file."""
    if resume is True:
        if not out_dir:
            raise EdgeDeployError("--resume needs the run to continue: pass --out RUN_DIR or --resume RUN_DIR/last.pt")
        path = Path(out_dir) / "last.pt"
    else:
        path = Path(resume)
    path = path / "last.pt" if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    return path


def recorded_config(path: Path) -> dict[str, Any]:
    """The `train_args` a `deploy train` checkpoint was started with."""
    from edgedeploy.models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    meta = ckpt.get("meta") or {}
    args = meta.get("train_args")
    if not isinstance(args, dict) or ckpt.get("epoch") is None:
        raise CheckpointError(f"{path} does not record its training arguments (not a `deploy train` checkpoint): "
                              "cannot resume it")
    return {**args, "model": args.get("model") or meta.get("model_name")}


def fit(spec: TaskSpec) -> Fit:
    """Train `spec.cfg.model` as the spec says; see the module docstring."""
    from edgedeploy.models.registry import get_model_info

    t_start = time.perf_counter()
    cfg = spec.cfg
    resume_path = resume_checkpoint(cfg.resume, cfg.out_dir) if cfg.resume else None
    if resume_path is not None:
        cfg = cfg.restored(recorded_config(resume_path))  # the run continues as it was started
    info = get_model_info(cfg.model)
    if info.task != spec.task:
        raise EdgeDeployError(f"{info.name} is a {info.task} model; {spec.task} training needs a {spec.task} model "
                              "(`deploy models` lists them)")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise EdgeDeployError(f"--opt {cfg.optimizer!r}: use sgd or adamw")
    if cfg.lr_schedule not in SCHEDULES:
        raise EdgeDeployError(f"--lr-schedule {cfg.lr_schedule!r}: use {' or '.join(SCHEDULES)}")
    epochs = int(cfg.epochs or DEFAULT_EPOCHS)
    from edgedeploy.models.artifact import describe_artifact

    imgsz = describe_artifact(model=info.name, imgsz=cfg.imgsz).imgsz  # the registry's default; validated once
    cfg = spec.cfg = replace(cfg, epochs=epochs, imgsz=imgsz)
    seed_everything(cfg.seed)
    spec.info, spec.device = info, select_device(cfg.device)
    spec.workers = cfg.workers if cfg.workers is not None else spec.default_workers(spec.device)

    loader = spec.load_data()  # a dataset problem stops the run before its folder exists
    if resume_path is not None:
        out = resume_path.parent
    elif cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = run_dir(cfg.project, cfg.name or info.name)
    spec.out = out
    model = spec.build_model(resuming=resume_path is not None)
    iters = min(len(loader), cfg.max_iters or len(loader))
    ema = spec.make_ema(model, epochs * iters) if cfg.ema else None
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler = SCHEDULES[cfg.lr_schedule](optimizer, epochs, iters, warmup_epochs=min(cfg.warmup_epochs, epochs / 2))
    scaler = make_grad_scaler(spec.device, cfg.amp)
    logger = MetricsLogger(out)
    meta = {**spec.meta(), "train_args": cfg.recorded()}

    start, best = 0, -1.0
    if resume_path is not None:
        start, saved_best, _ = load_for_resume(resume_path, model, ema, optimizer, scheduler, scaler)
        best = float(saved_best) if saved_best is not None else -1.0
        if start >= epochs:
            raise EdgeDeployError(f"{resume_path} already finished all {epochs} epochs; pass a larger --epochs to "
                                  "train longer, or start a new run")
        logger.truncate(start + 1)  # keep the rows of epochs 1..start
        print(f"resuming {resume_path} at epoch {start + 1}/{epochs}")
    print(f"training {info.name} at {cfg.imgsz}px on {spec.device}, {epochs} epochs, {cfg.optimizer} lr {cfg.lr:g} "
          f"{cfg.lr_schedule} -> {out}")

    deadline = time.monotonic() + 60 * cfg.time_limit if cfg.time_limit is not None else None
    val: dict[str, float] = {}
    extra: dict[str, Any] = {}
    for epoch in range(start, epochs):
        t_epoch = time.perf_counter()
        desc = f"epoch {epoch + 1}/{epochs}{spec.start_epoch(epoch, model)}"
        train = train_one_epoch(spec, model, loader, optimizer, scheduler, scaler, ema, iters, desc)
        row: dict[str, Any] = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in train.items()}}
        out_of_time = deadline is not None and time.monotonic() > deadline
        last = epoch == epochs - 1 or out_of_time
        if (epoch + 1) % max(1, cfg.eval_interval) == 0 or last:
            val, extra = spec.validate(ema.ema if ema is not None else model, epoch)
            row.update(val)
            if val[spec.metric] > best:
                best = val[spec.metric]
                save_checkpoint(out / "best.pt", model, ema, None, None, epoch, best, {**meta, **extra})
        row.update(lr=optimizer.param_groups[0]["lr"], epoch_s=time.perf_counter() - t_epoch)
        logger.log(row)
        logger.plot(out / "results.png")
        save_checkpoint(out / "last.pt", model, ema, optimizer, scheduler, epoch, best, {**meta, **extra},
                        scaler=scaler)
        print(f"epoch {epoch + 1}/{epochs}: loss {row.get('train/loss', float('nan')):.4f}{spec.describe(row)}  "
              f"({row['epoch_s']:.1f}s)")
        if out_of_time and epoch < epochs - 1:
            print(f"--time-limit {cfg.time_limit:g} min reached after epoch {epoch + 1}: stopping "
                  f"(continue with --resume {out})")
            break
    return Fit(cfg=cfg, run_dir=out, best=best, val=val, extra=extra, rows=list(logger.rows),
               wall_s=time.perf_counter() - t_start)


def train_one_epoch(spec: TaskSpec, model, loader, optimizer, scheduler, scaler, ema, iters: int,
                    desc: str) -> dict[str, float]:
    """One pass over at most `iters` batches; returns the batch-weighted means of the spec's loss values."""
    from tqdm import tqdm

    cfg = spec.cfg
    model.train()
    sums: dict[str, float] = {}
    weight = 0
    bar = tqdm(loader, total=iters, desc=desc, unit="it", leave=False, disable=not cfg.progress)
    for i, batch in enumerate(bar):
        if i >= iters:
            break
        with autocast(spec.device, cfg.amp):
            loss, values, n = spec.loss(model, batch)
        if not torch.isfinite(loss):
            raise EdgeDeployError(f"loss became {loss.item()} in {desc}: lower --lr "
                                  f"(now {optimizer.param_groups[0]['lr']:.3g}){spec.nan_hint}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        weight += n
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * n
        bar.set_postfix({k: f"{v / weight:.3f}" for k, v in sums.items()} | {"lr": f"{optimizer.param_groups[0]['lr']:.3g}"})
    bar.close()
    return {k: v / max(weight, 1) for k, v in sums.items()}
