"""`deploy train`: one command for every task, dispatched by the model's registry task.

classify -> edgedeploy.train.classify.train_classifier
detect   -> edgedeploy.train.detect.train_detector(args)
segment  -> edgedeploy.train.segment.train_segmenter(args)

The shared flags live here. A task module may define `add_task_arguments(parser)` to add its own flags (only
new ones; prefix their help with the task); it is imported while the parser is built, so it should import
torch lazily.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from pathlib import Path

from edgedeploy import options as opt

TASK_TRAINERS = {
    "detect": ("edgedeploy.train.detect", "train_detector"),
    "segment": ("edgedeploy.train.segment", "train_segmenter"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registry name, e.g. mobilenetv3_small (`deploy models` lists them)")
    parser.add_argument(
        "--data", default="synthetic",
        help="dataset folder (classify: ImageFolder DATA/train/<class>/*.jpg, DATA/val/...) or `synthetic` "
        "(default: built-in generated set with a preset that trains in minutes on a CPU)",
    )
    parser.add_argument("--epochs", type=opt.EPOCHS.arg, default=None, help="default: task/preset dependent")
    parser.add_argument("--batch", "--batch-size", dest="batch", type=opt.BATCH.arg, default=None, help="batch size")
    parser.add_argument("--imgsz", type=opt.IMGSZ.arg, default=None, help="square training size in pixels")
    parser.add_argument("--lr", type=opt.LR.arg, default=None, help="peak learning rate after warm-up")
    parser.add_argument("--opt", dest="opt", choices=("sgd", "adamw"), default=None, help="optimizer")
    parser.add_argument("--weight-decay", type=opt.WEIGHT_DECAY.arg, default=None)
    parser.add_argument(
        "--label-smoothing", type=opt.LABEL_SMOOTHING.arg, default=None, help="classify: cross-entropy smoothing (0.1; 0 for synthetic)"
    )
    parser.add_argument("--no-ema", action="store_true", help="no exponential moving average of the weights")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision (AMP is used on CUDA only)")
    parser.add_argument("--workers", type=opt.WORKERS.arg, default=None, help="data-loader processes")
    parser.add_argument("--out", default=None, help="run folder (default: runs/train/<model>, <model>2, ...)")
    parser.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="LAST_PT",
        help="continue an interrupted run: `--resume RUN/last.pt`, or `--out RUN --resume`",
    )
    parser.add_argument("--num-classes", type=opt.NUM_CLASSES.arg, default=None, help="must match the dataset; synthetic: shapes")
    parser.add_argument("--seed", type=opt.SEED.arg, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for task, (module, _) in TASK_TRAINERS.items():
        if importlib.util.find_spec(module) is None:
            continue
        add = getattr(importlib.import_module(module), "add_task_arguments", None)
        if add is not None:
            add(parser.add_argument_group(f"{task} options"))


def _model_from_checkpoint(path: str | Path) -> str | None:
    from edgedeploy.models.checkpoint import read_checkpoint

    path = Path(path)
    path = path / "last.pt" if path.is_dir() else path
    return (read_checkpoint(path).get("meta") or {}).get("model_name")


def run(args: argparse.Namespace) -> int:
    from edgedeploy.errors import EdgeDeployError
    from edgedeploy.models.registry import get_model_info

    model_name = args.model
    if model_name is None and args.resume:
        resume_from = args.resume if args.resume is not True else (Path(args.out) / "last.pt" if args.out else None)
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
    for d in ([Path(args.out)] if args.out else []) + [Path("runs/train")]:
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

    if info.task == "classify":
        return _train_classify(args)
    if info.task in TASK_TRAINERS:
        module, fn = TASK_TRAINERS[info.task]
        try:
            trainer = getattr(importlib.import_module(module), fn)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise EdgeDeployError(f"training {info.task} models is not available in this build") from e
        result = trainer(args)
        return result if isinstance(result, int) else 0
    raise EdgeDeployError(f"{info.name}: no trainer for task {info.task!r}")


def _train_classify(args: argparse.Namespace) -> int:
    from edgedeploy.train.classify import train_classifier

    result = train_classifier(
        args.model,
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch,
        imgsz=args.imgsz,
        lr=args.lr,
        optimizer=args.opt,
        label_smoothing=args.label_smoothing,
        ema=not args.no_ema,
        amp=not args.no_amp,
        workers=args.workers,
        out_dir=args.out,
        resume=args.resume,
        num_classes=args.num_classes,
        seed=args.seed,
        device=args.device,
        weight_decay=args.weight_decay,
        progress=not args.quiet,
    )
    print(
        f"done in {result.wall_s:.0f}s: val top-1 {100 * result.top1:.2f}% (best {100 * result.best_top1:.2f}%), "
        f"top-5 {100 * result.top5:.2f}%\n"
        f"  weights  {result.best}  (EMA; `deploy eval --weights {result.best}`, `deploy export --weights {result.best}`)\n"
        f"  resume   deploy train --resume {result.last}\n"
        f"  metrics  {result.run_dir / 'metrics.csv'}, curves {result.run_dir / 'results.png'}"
    )
    return 0
