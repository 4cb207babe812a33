"""`deploy export`: PyTorch -> ONNX (parity-proved) -> FP16 / INT8 Q/DQ ONNX -> TensorRT / TensorRT-RTX engines.

Exit codes: 0 done, 2 an option out of range, 3 engines skipped (no builder installed), 4 parity failure,
130 interrupted, 1 any other error (docs/TROUBLESHOOTING.md).
"""

from __future__ import annotations

import argparse
import sys

from edgedeploy import options as opt
from edgedeploy.tasks import add_all_task_flags, given_task_options
from edgedeploy.errors import EdgeDeployError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registry name, e.g. mobilenetv3_large (see `deploy models`); optional with "
                                        "--weights from `deploy train`, whose checkpoint names its model")
    parser.add_argument("--weights", help="checkpoint (ours, a torchvision state_dict, or an official checkpoint: "
                                          "YOLOX .pth, Ultralytics YOLOv5 .pt, ... see docs/CHECKPOINTS.md); "
                                          "default: re-initialised weights with realistic magnitudes, for the "
                                          "parity proof only")
    parser.add_argument("--input-convention", metavar="NAME",
                        help="input convention overriding the checkpoint's, e.g. yolox-legacy for weights from "
                             "YOLOX < 0.2.0 (RGB, /255, ImageNet mean/std)")
    parser.add_argument("--num-classes", type=opt.NUM_CLASSES.arg, help="classes of the checkpoint's head")
    parser.add_argument("--imgsz", type=opt.IMGSZ.arg, help="square input size (default: the model's)")
    b = parser.add_mutually_exclusive_group()
    b.add_argument("--batch", type=opt.BATCH.arg, default=1, help="static batch size (default 1)")
    b.add_argument("--dynamic-batch", type=opt.dynamic_batch.arg, metavar="MIN:OPT:MAX",
                   help="dynamic batch axis and the TensorRT optimization profile")
    parser.add_argument("--opset", type=opt.OPSET.arg, default=17)
    parser.add_argument("--out", default="exports", help="output folder; artifacts go to OUT/<model>/")
    parser.add_argument("--fp16", action="store_true", help="also write an FP16 ONNX (and engine)")
    parser.add_argument("--fp16-io", choices=("fp32", "fp16"), default="fp32", help="FP16 model's input/output type")
    parser.add_argument("--fp16-keep", type=lambda t: [op.strip() for op in t.split(",") if op.strip()],
                        default=[], metavar="OP[,OP...]",
                        help="more ONNX op types to keep in FP32 in the FP16 model (e.g. MatMul,Add)")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 Q/DQ ONNX (and engine)")
    parser.add_argument("--calib", metavar="DIR|synthetic", help="INT8 calibration images: a folder of images, a "
                        "dataset folder (its train split) or `synthetic` (default: the training images the checkpoint "
                        "records; an error when they are gone)")
    parser.add_argument("--calib-images", type=opt.CALIB_IMAGES.arg, default=64)
    parser.add_argument("--calib-method", choices=opt.CALIB_METHOD.choices, default="auto",
                        help="activation range: percentile (clips rare outliers), minmax (memory-bounded), ema "
                             "(moving-average minmax), entropy (KL, TensorRT's classic); auto = ema for detectors, "
                             "else percentile when its histograms fit in memory, else minmax")
    parser.add_argument("--eval-data", metavar="DIR|synthetic",
                        help="held-out data for FP16/INT8 accuracy: a labelled dataset folder (its val split: top-1, "
                             "mAP or mIoU), a folder of images (agreement only) or `synthetic` (default: the val "
                             "split of the dataset the checkpoint records; an error when it is gone)")
    parser.add_argument("--eval-images", type=opt.EVAL_IMAGES.arg, default=None, metavar="N",
                        help="cap the held-out set at N evenly spaced images (default: the whole split)")
    parser.add_argument("--builder", choices=opt.BUILDER.choices, default="auto")
    parser.add_argument("--workspace", type=opt.WORKSPACE_MB.arg, metavar="MB", help="TensorRT workspace memory-pool limit")
    parser.add_argument("--timing-cache", help="timing cache file (default OUT/<model>/timing.cache)")
    parser.add_argument("--rtol", type=opt.TOLERANCE.arg, help="parity rtol (default 1e-3)")
    parser.add_argument("--atol", type=opt.TOLERANCE.arg, help="parity atol (default 1e-5, the classic recipe's)")
    parser.add_argument("--no-simplify", action="store_true")
    parser.add_argument("--simplifier", choices=("auto", "onnxsim", "onnxslim", "none"), default="auto",
                        help="graph simplifier: auto tries onnxsim, then onnxslim, then none (why is recorded)")
    parser.add_argument("--force", action="store_true", help="rebuild everything, even up-to-date artifacts")
    parser.add_argument("--seed", type=opt.SEED.arg, default=0)
    parser.add_argument("--no-progress", action="store_true")
    add_all_task_flags(parser)  # --nms/--max-det/--iou-thres/--conf-thres/--agnostic, --argmax/--no-upsample


def _model_from_checkpoint(weights: str | None) -> str:
    if not weights:
        raise EdgeDeployError("say what to export: --model NAME (see `deploy models`) and/or --weights CHECKPOINT")
    from edgedeploy.models.checkpoint import read_checkpoint_meta

    name = read_checkpoint_meta(weights).model_name  # ours, or the variant an official checkpoint is
    if not name:
        raise EdgeDeployError(f"{weights} does not name its model (not a `deploy train` checkpoint): add --model NAME")
    return str(name)


def run(args: argparse.Namespace) -> int:
    from edgedeploy.models.checkpoint import reading_once

    with reading_once():  # --weights is read from disk once (model name, meta, weights)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from edgedeploy.export.pipeline import export
    from edgedeploy.export.report import REPORT_NAME

    from edgedeploy.models.registry import get_model_info

    def log(line: str) -> None:
        print(line, flush=True)

    if not args.model:
        args.model = _model_from_checkpoint(args.weights)
    task = get_model_info(args.model).task
    options = given_task_options(args, task, args.model)
    ignore_index = options.pop("ignore_index", None)  # a fact about the data, not an option of the graph

    report = export(
        args.model,
        log=log,
        weights=args.weights,
        input_convention=args.input_convention,
        num_classes=args.num_classes,
        imgsz=args.imgsz,
        batch=args.batch,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        out=args.out,
        simplify=not args.no_simplify,
        simplifier=args.simplifier,
        fp16=args.fp16,
        fp16_io=args.fp16_io,
        fp16_keep=args.fp16_keep,
        int8=args.int8,
        calib=args.calib,
        calib_images=args.calib_images,
        calib_method=args.calib_method,
        eval_data=args.eval_data,
        eval_images=args.eval_images,
        ignore_index=ignore_index,
        builder=args.builder,
        workspace_mb=args.workspace,
        timing_cache=args.timing_cache,
        rtol=args.rtol,
        atol=args.atol,
        force=args.force,
        seed=args.seed,
        progress=not args.no_progress,
        task_options=options,
    )
    print()
    print(report.table())
    print(f"\nreport: {report.out_dir}/{REPORT_NAME}")
    if report.engine_skipped:
        print(f"engines skipped (exit 3): {report.engine_skip_reason}", file=sys.stderr)
    return report.exit_code


__all__ = ["configure", "run", "EdgeDeployError"]
