"""`deploy eval`: score a checkpoint, ONNX file or TensorRT engine on a dataset with the same metric code.

The artifact is described once (`models.artifact.describe_artifact`: --model, else what the checkpoint meta or
the JSON sidecar records); the command builds an `EvalRequest` and hands it to the task's evaluator, which
`edgedeploy.eval.classify`, `.detect` and `.segment` register in the task registry.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from edgedeploy import options as opt
from edgedeploy.errors import EdgeDeployError
from edgedeploy.eval import classify, detect, segment  # noqa: F401  (each registers its task's evaluator)
from edgedeploy.eval.request import EvalRequest
from edgedeploy.tasks import get_task


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
    detect.add_detect_eval_arguments(parser)


def _artifact(args: argparse.Namespace) -> str:
    from edgedeploy.errors import EdgeDeployError

    given = [p for p in (args.artifact, args.weights, args.onnx, args.engine) if p]
    if len(given) != 1:
        raise EdgeDeployError(
            "deploy eval: give exactly one artifact (ARTIFACT, --weights CKPT, --onnx FILE or --engine FILE)"
            + (f"; got {', '.join(given)}" if given else "")
        )
    return given[0]


def resolve_eval_data(given: str | None, path: str, meta: Mapping[str, Any]) -> str:
    """--data, else the training data the artifact records (an error naming the path when it is gone), else
    synthetic only for a model trained on it. Prints where the data is and its detected layout."""
    from edgedeploy.data.sources import describe_layout, missing_data_error, recorded_data

    if given:
        data = str(given)
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
    print(f"data: {where}{'' if given else ' (recorded at training)'}")
    return data


def run(args: argparse.Namespace) -> int:
    from edgedeploy.models.checkpoint import reading_once

    with reading_once():  # a checkpoint is read from disk once (its meta, then its weights)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from edgedeploy.models.artifact import describe_artifact

    path = _artifact(args)
    if not Path(path).exists():
        raise EdgeDeployError(f"nothing to evaluate: {path} does not exist")
    desc = describe_artifact(path, model=args.model, imgsz=args.imgsz, num_classes=args.num_classes,
                             ignore_index=args.ignore_index)
    if desc.task is None:
        raise EdgeDeployError(f"{path} does not record its model or task: pass --model NAME")
    request = EvalRequest(
        artifact=desc, data=resolve_eval_data(args.data, path, desc.recorded()), split=args.split, batch=args.batch,
        workers=args.workers, device=args.device, out=args.out, json=args.json, quiet=args.quiet,
        nms=opt.NmsSettings(args.conf_thres, args.iou_thres, args.max_det),
    )
    return int(get_task(desc.task).part("evaluator")(request) or 0)
