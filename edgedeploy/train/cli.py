"""`deploy train`: one command for every task, dispatched by the model's registry task.

All flags are defined here, named as the config fields they set; `build_config` turns them into the task's
typed config (`ClassifyConfig`, `DetectConfig`, `SegmentConfig` in edgedeploy.train.config), which is all the
training code sees. The task's `trainer` part in the task registry (edgedeploy.tasks) names its config, preset
and training function; a flag of another task's config is an error, not ignored.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import fields
from pathlib import Path

from edgedeploy import options as opt
from edgedeploy.tasks import get_task


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registry name, e.g. mobilenetv3_small (`deploy models` lists them)")
    parser.add_argument(
        "--data", default="synthetic",
        help="dataset folder (classify: ImageFolder DATA/train/<class>/*.jpg, DATA/val/...) or `synthetic` "
        "(default: built-in generated set with a preset that trains in minutes on a CPU)",
    )
    parser.add_argument("--epochs", type=opt.EPOCHS.arg, default=None, help="default: 30, or the synthetic preset's")
    parser.add_argument("--batch", "--batch-size", dest="batch_size", type=opt.BATCH.arg, default=None, help="batch size")
    parser.add_argument("--imgsz", type=opt.IMGSZ.arg, default=None, help="square training size in pixels")
    parser.add_argument("--lr", type=opt.LR.arg, default=None, help="peak learning rate after warm-up")
    parser.add_argument("--opt", dest="optimizer", choices=("sgd", "adamw"), default=None, help="optimizer")
    parser.add_argument("--weight-decay", type=opt.WEIGHT_DECAY.arg, default=None)
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="no exponential moving average of the weights")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision (AMP is used on CUDA only)")
    parser.add_argument("--workers", type=opt.WORKERS.arg, default=None, help="data-loader processes")
    parser.add_argument("--out", dest="out_dir", default=None, help="run folder (default: runs/train/<model>, <model>2, ...)")
    parser.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="LAST_PT",
        help="continue an interrupted run: `--resume RUN/last.pt`, or `--out RUN --resume` (with --epochs N: "
        "extend a finished run to N epochs)",
    )
    parser.add_argument("--weights", default=None, help="detect/segment: initial weights to fine-tune from")
    parser.add_argument("--num-classes", type=opt.NUM_CLASSES.arg, default=None, help="must match the dataset; synthetic: shapes")
    parser.add_argument("--seed", type=opt.SEED.arg, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--eval-interval", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--time-limit", type=float, default=None, help="stop after the epoch in which this many minutes run out")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    c = parser.add_argument_group("classify options")
    c.add_argument(
        "--label-smoothing", type=opt.LABEL_SMOOTHING.arg, default=None, help="classify: cross-entropy smoothing (0.1; 0 for synthetic)"
    )
    d = parser.add_argument_group("detect options")
    d.add_argument("--mosaic", type=float, default=None, help="detect: probability of 4-image mosaic (1.0)")
    d.add_argument("--close-mosaic", type=int, default=None, help="detect: last N epochs without mosaic (default ~15%%)")
    d.add_argument("--no-hsv", dest="hsv", action="store_false", default=None, help="detect: no HSV colour jitter")
    d.add_argument("--flip", type=float, default=None, help="detect: horizontal flip probability (0.5)")
    d.add_argument("--precise-bn", type=int, default=None, help="detect: batches to re-estimate BatchNorm stats before eval (8; 0: off)")
    d.add_argument("--synthetic-train", type=int, default=None, help="detect: images in the synthetic train split (512)")
    d.add_argument("--synthetic-val", type=int, default=None, help="detect: images in the synthetic val split (128)")
    s = parser.add_argument_group("segment options")
    s.add_argument("--ignore-index", type=int, default=None, help="segment: mask value left out of loss and metrics (255)")
    s.add_argument("--lr-schedule", choices=("poly", "cosine"), default=None, help="segment: learning-rate decay (poly)")
    s.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="segment: random rescale of the shorter side relative to --imgsz before cropping "
                   "(default 0.5 2.0; synthetic preset 0.75 1.25)")


COMMON_FLAGS = ("model", "data", "epochs", "batch_size", "imgsz", "lr", "optimizer", "weight_decay", "ema", "amp",
                "workers", "out_dir", "resume", "num_classes", "seed", "device", "eval_interval", "time_limit",
                "progress")
TASK_FLAGS = ("weights", "label_smoothing", "mosaic", "close_mosaic", "hsv", "flip", "precise_bn", "synthetic_train",
              "synthetic_val", "ignore_index", "lr_schedule", "scale_range")


def trainer_for(task: str):
    """The task's `trainer` part (its module registers it when imported)."""
    importlib.import_module(f"edgedeploy.train.{task}")
    return get_task(task).part("trainer")


def build_config(args: argparse.Namespace, task: str):
    """The task's typed config from the parsed flags (flags left unset take the config's defaults or the
    synthetic preset). A flag given that the task's config has no field for is an error."""
    from edgedeploy.errors import EdgeDeployError

    trainer = trainer_for(task)
    names = {f.name for f in fields(trainer.config)}
    values = vars(args)
    given = {k: values[k] for k in COMMON_FLAGS}
    for dest in TASK_FLAGS:
        if values.get(dest) is None:
            continue
        if dest not in names:
            raise EdgeDeployError(f"--{dest.replace('_', '-')} does not apply to {task} models ({args.model})")
        given[dest] = tuple(values[dest]) if dest == "scale_range" else values[dest]
    return trainer.build(**given)


def _model_from_checkpoint(path: str | Path) -> str | None:
    from edgedeploy.models.checkpoint import read_checkpoint_meta

    path = Path(path)
    path = path / "last.pt" if path.is_dir() else path
    return read_checkpoint_meta(path).model_name


def run(args: argparse.Namespace) -> int:
    from edgedeploy.errors import EdgeDeployError
    from edgedeploy.models.registry import get_model_info

    model_name = args.model
    if model_name is None and args.resume:
        resume_from = args.resume if args.resume is not True else (Path(args.out_dir) / "last.pt" if args.out_dir else None)
        model_name = _model_from_checkpoint(resume_from) if resume_from else None
    if model_name is None:
        raise EdgeDeployError("deploy train: pass --model NAME (`deploy models` lists them)")
    args.model = model_name
    info = get_model_info(model_name)
    before = _output_snapshot(args)
    try:
        return _dispatch(args, info)
    except BaseException:
        _remove_new_empty_dirs(before)  # a failed run leaves no new empty run folder behind
        raise


def _output_snapshot(args: argparse.Namespace) -> list[tuple[Path, set[str], list[Path]]]:
    """For the explicit --out and the default runs/train base: the sub-folders there now, and which of the
    folder and its parents do not exist yet."""
    from edgedeploy.io import missing_dirs

    snap = []
    for d in ([Path(args.out_dir)] if args.out_dir else []) + [Path("runs/train")]:
        d = d.absolute()
        snap.append((d, {p.name for p in d.iterdir()} if d.is_dir() else set(), missing_dirs(d)))
    return snap


def _remove_new_empty_dirs(before: list[tuple[Path, set[str], list[Path]]]) -> None:
    """rmdir the run folders (and parents) this run created that are still empty; anything holding a file stays."""
    from edgedeploy.io import remove_empty_dirs

    for d, names, missing in before:
        new = [p for p in d.iterdir() if p.is_dir() and p.name not in names] if d.is_dir() else []
        remove_empty_dirs(new + missing)


def _dispatch(args: argparse.Namespace, info) -> int:
    from edgedeploy.errors import EdgeDeployError

    cfg = build_config(args, info.task)
    trainer = trainer_for(info.task)
    result = trainer.train(cfg)
    if trainer.summary is not None:
        print(trainer.summary(result))
    return 0
