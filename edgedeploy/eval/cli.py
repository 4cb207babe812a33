"""`deploy eval`: score a checkpoint, ONNX file or TensorRT engine on a dataset with the same metric code.

The task comes from --model, else from what the artifact records (checkpoint meta or the JSON sidecar):
classify is handled here; detect and segment go to `edgedeploy.eval.detect.run_eval_cli` and
`edgedeploy.eval.segment.run_eval_cli`, which read the same namespace.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from edgedeploy import options as opt
from edgedeploy.errors import EdgeDeployError

TASK_EVALUATORS = {
    "detect": "edgedeploy.eval.detect",
    "segment": "edgedeploy.eval.segment",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", nargs="?", default=None, help="checkpoint (.pt), ONNX (.onnx) or engine (.engine)")
    parser.add_argument("--weights", default=None, help="same as the positional ARTIFACT")
    parser.add_argument("--onnx", default=None, help="evaluate this ONNX file (ONNX Runtime)")
    parser.add_argument("--engine", default=None, help="evaluate this TensorRT engine")
    parser.add_argument("--model", default=None, help="registry name (default: recorded in the artifact)")
    parser.add_argument("--data", default=None, help="dataset folder or `synthetic` (default: the training data)")
    parser.add_argument("--split", default="val", help="dataset split to evaluate")
    parser.add_argument("--imgsz", type=opt.IMGSZ.arg, default=None, help="default: the training size recorded in the artifact")
    parser.add_argument("--batch", "--batch-size", dest="batch", type=opt.BATCH.arg, default=None)
    parser.add_argument("--num-classes", type=opt.NUM_CLASSES.arg, default=None, help="default: recorded in the checkpoint")
    parser.add_argument("--ignore-index", type=int, default=None,
                        help="segmentation: mask value left out of mIoU (default: recorded at training, else 255)")
    parser.add_argument("--workers", type=opt.WORKERS.arg, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (PyTorch checkpoints)")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from edgedeploy.eval.detect import add_detect_eval_arguments

    add_detect_eval_arguments(parser.add_argument_group("detection models"))


def _artifact(args: argparse.Namespace) -> str:
    from edgedeploy.errors import EdgeDeployError

    given = [p for p in (args.artifact, args.weights, args.onnx, args.engine) if p]
    if len(given) != 1:
        raise EdgeDeployError(
            "deploy eval: give exactly one artifact (ARTIFACT, --weights CKPT, --onnx FILE or --engine FILE)"
            + (f"; got {', '.join(given)}" if given else "")
        )
    return given[0]


def _artifact_meta(path: str) -> dict:
    """What the artifact says about itself: checkpoint meta, or the export sidecar (empty if neither)."""
    from edgedeploy.errors import EdgeDeployError

    if not Path(path).exists():
        raise EdgeDeployError(f"nothing to evaluate: {path} does not exist")
    if Path(path).suffix.lower() in (".pt", ".pth", ".ckpt"):
        from edgedeploy.models.checkpoint import read_checkpoint

        return dict(read_checkpoint(path).get("meta") or {})
    from edgedeploy.engines.sidecar import read_sidecar

    side = read_sidecar(path, required=False)
    if side is None:
        return {}
    return {
        "model_name": side.model, "task": side.task, "class_names": list(side.class_names),
        "imgsz": side.input_shape[-1] if isinstance(side.input_shape[-1], int) else None,
        "mean": list(side.mean), "std": list(side.std), "batch": side.input_shape[0],
        **sidecar_data_meta(side),
    }


def sidecar_data_meta(side) -> dict:
    """The checkpoint-style data fields (`data`, `data_as_typed`, `synthetic`, `ignore_index`) an export sidecar
    carries, so an exported artifact is evaluated on the data its checkpoint was trained on."""
    data = dict(getattr(side, "data", None) or {})
    out: dict = {}
    if data.get("synthetic"):
        out["data"], out["train_args"] = "synthetic", {"data": "synthetic"}
        if data.get("path") and data["path"] != "synthetic":
            out["data"] = data["path"]  # the generated folder (regenerated when gone)
        if data.get("synthetic_params"):
            out["synthetic"] = data["synthetic_params"]
    elif data.get("path"):
        out["data"] = data["path"]
    if data.get("as_typed"):
        out["data_as_typed"] = data["as_typed"]
    if "ignore_index" in (side.postprocess or {}):
        out["ignore_index"] = side.postprocess["ignore_index"]
    return out


def resolve_eval_data(args: argparse.Namespace, path: str, meta: dict) -> str:
    """--data, else the training data the artifact records (an error naming the path when it is gone), else
    synthetic only for a model trained on it. Prints where the data is and its detected layout."""
    from edgedeploy.data.sources import describe_layout, missing_data_error, recorded_data

    if args.data:
        data = str(args.data)
    else:
        rec = recorded_data(meta)
        if rec.found:
            data = str(rec.path)
        elif rec.synthetic:
            data = "synthetic"
        else:
            raise missing_data_error(path, rec, "--data DIR (or --data synthetic)")
    if data != "synthetic" and not Path(data).exists():
        raise EdgeDeployError(f"--data {data}: not found (a dataset folder, a data YAML / COCO json, or `synthetic`)")
    where = "synthetic (generated)" if data == "synthetic" else f"{Path(data).resolve()} ({describe_layout(data)})"
    print(f"data: {where}{'' if args.data else ' (recorded at training)'}")
    return data


def run(args: argparse.Namespace) -> int:
    from edgedeploy.models.registry import get_model_info

    path = _artifact(args)
    # the names the detection/segmentation evaluators read
    args.artifact = args.weights = path
    args.batch_size = args.batch
    meta = _artifact_meta(path)
    args.data = resolve_eval_data(args, path, meta)
    args.recorded_meta = meta  # what the artifact recorded (checkpoint meta or sidecar), for the task evaluators
    model_name = args.model or meta.get("model_name")
    task = get_model_info(model_name).task if model_name else meta.get("task")
    if task is None:
        raise EdgeDeployError(f"{path} does not record its model or task: pass --model NAME")
    if task == "classify":
        return _eval_classify(args, path, model_name, meta)
    if task in TASK_EVALUATORS:
        return int(importlib.import_module(TASK_EVALUATORS[task]).run_eval_cli(args) or 0)
    raise EdgeDeployError(f"no evaluator for task {task!r}")


def _eval_classify(args: argparse.Namespace, path: str, model_name: str | None, meta: dict) -> int:
    from edgedeploy.data.imagefolder import classification_datasets
    from edgedeploy.errors import EdgeDeployError
    from edgedeploy.eval.classify import evaluate_classifier, predictor_for_artifact
    from edgedeploy.io import atomic_write_json
    from edgedeploy.models.registry import get_model_info

    if model_name is None:
        raise EdgeDeployError(f"{path} does not record its model: pass --model NAME")
    info = get_model_info(model_name)
    imgsz = args.imgsz or meta.get("imgsz") or info.imgsz
    data = args.data
    saved = meta.get("train_args") or {}
    num_classes = len(meta["class_names"]) if data == "synthetic" and meta.get("class_names") else None
    if args.split != "val":
        raise EdgeDeployError("classification eval reads the val split of the dataset (--split val)")
    # open the artifact first: a corrupt file fails in a second, not after the dataset is read or generated
    predict, batch = predictor_for_artifact(path, model_name, args.num_classes, args.device)
    _, val, class_names, root = classification_datasets(
        data, imgsz, meta.get("mean") or info.mean, meta.get("std") or info.std, num_classes=num_classes,
        seed=int(saved.get("seed", 0)), augment=False, progress=not args.quiet,
    )
    trained = meta.get("class_names")
    if trained and list(trained) != list(class_names):
        raise EdgeDeployError(
            f"{path} was trained on classes {trained}, but {root} has {class_names}: labels would not line up"
        )
    scores = evaluate_classifier(predict, val, batch_size=args.batch or batch, workers=args.workers,
                                 progress=not args.quiet)
    print(
        f"{Path(path).name} on {root} ({scores['n']} val images): top-1 {100 * scores['top1']:.2f}%  "
        f"top-5 {100 * scores['top5']:.2f}%"
    )
    for label, acc in scores["per_class_top1"].items():
        print(f"  {class_names[label]:<20} {100 * acc:6.2f}%")
    if args.json:
        atomic_write_json(args.json, {"artifact": str(path), "data": str(root), **scores})
    return 0
