"""`deploy export`: PyTorch -> ONNX (parity-proved) -> FP16 / INT8 Q/DQ ONNX -> TensorRT / TensorRT-RTX engines.

Exit codes: 0 done, 3 engines skipped (no builder installed), 4 parity failure, 1 any other error.
"""

from __future__ import annotations

import argparse
import sys

from edgedeploy.errors import EdgeDeployError


def _dynamic_batch(text: str) -> tuple[int, int, int]:
    try:
        mn, opt, mx = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX (e.g. 1:8:16), got {text!r}") from None
    return mn, opt, mx


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registry name, e.g. mobilenetv3_large (see `deploy models`); optional with "
                                        "--weights from `deploy train`, whose checkpoint names its model")
    parser.add_argument("--weights", help="checkpoint (ours or a torchvision state_dict); default: re-initialised "
                                          "weights with realistic magnitudes, for the parity proof only")
    parser.add_argument("--num-classes", type=int, help="classes of the checkpoint's head")
    parser.add_argument("--imgsz", type=int, help="square input size (default: the model's)")
    b = parser.add_mutually_exclusive_group()
    b.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    b.add_argument("--dynamic-batch", type=_dynamic_batch, metavar="MIN:OPT:MAX",
                   help="dynamic batch axis and the TensorRT optimization profile")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--out", default="exports", help="output folder; artifacts go to OUT/<model>/")
    parser.add_argument("--fp16", action="store_true", help="also write an FP16 ONNX (and engine)")
    parser.add_argument("--fp16-io", choices=("fp32", "fp16"), default="fp32", help="FP16 model's input/output type")
    parser.add_argument("--fp16-keep", type=lambda t: [op.strip() for op in t.split(",") if op.strip()],
                        default=[], metavar="OP[,OP...]",
                        help="more ONNX op types to keep in FP32 in the FP16 model (e.g. MatMul,Add)")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 Q/DQ ONNX (and engine)")
    parser.add_argument("--calib", metavar="DIR|synthetic", help="INT8 calibration images (default: the "
                        "checkpoint's training images when it records them, else synthetic)")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--calib-method", choices=("auto", "minmax", "ema", "percentile", "entropy"), default="auto",
                        help="activation range: percentile (clips rare outliers), minmax (memory-bounded), ema "
                             "(moving-average minmax), entropy (KL, TensorRT's classic); auto = ema for detectors, "
                             "else percentile when its histograms fit in memory, else minmax")
    parser.add_argument("--eval-data", metavar="DIR|synthetic",
                        help="held-out images for FP16/INT8 accuracy (ImageFolder layout gives top-1; default: the "
                             "checkpoint's val split when it records its dataset, else synthetic)")
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--builder", choices=("auto", "tensorrt", "tensorrt-rtx", "none"), default="auto")
    parser.add_argument("--workspace", type=int, metavar="MB", help="TensorRT workspace memory-pool limit")
    parser.add_argument("--timing-cache", help="timing cache file (default OUT/<model>/timing.cache)")
    parser.add_argument("--rtol", type=float, help="parity rtol (default: task's, 1e-3 for classify)")
    parser.add_argument("--atol", type=float, help="parity atol (default: task's, 1e-4 for classify)")
    parser.add_argument("--no-simplify", action="store_true")
    parser.add_argument("--simplifier", choices=("auto", "onnxsim", "onnxslim", "none"), default="auto",
                        help="graph simplifier: auto tries onnxsim, then onnxslim, then none (why is recorded)")
    parser.add_argument("--force", action="store_true", help="rebuild everything, even up-to-date artifacts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    d = parser.add_argument_group("detection models")
    d.add_argument("--nms", choices=("none", "onnx", "trt"), help="NMS in the graph: ONNX NonMaxSuppression "
                   "(default), TensorRT's EfficientNMS/NMS layer, or none (decoded boxes + scores)")
    d.add_argument("--max-det", type=int, help="detections kept per image (default 100)")
    d.add_argument("--iou-thres", type=float, help="NMS IoU threshold (default 0.45)")
    d.add_argument("--conf-thres", type=float, help="score threshold (default 0.25)")
    d.add_argument("--agnostic", action="store_true", default=None, help="class-agnostic NMS")
    g = parser.add_argument_group("segmentation models")
    g.add_argument("--argmax", action="store_true", default=None, help="output class ids (in-graph argmax), not logits")
    g.add_argument("--no-upsample", dest="upsample", action="store_false", default=None,
                   help="keep logits at 1/8 resolution (no in-graph resize to the input size)")


def _model_from_checkpoint(weights: str | None) -> str:
    if not weights:
        raise EdgeDeployError("say what to export: --model NAME (see `deploy models`) and/or --weights CHECKPOINT")
    from edgedeploy.models.checkpoint import read_checkpoint

    name = (read_checkpoint(weights).get("meta") or {}).get("model_name")
    if not name:
        raise EdgeDeployError(f"{weights} does not name its model (not a `deploy train` checkpoint): add --model NAME")
    return str(name)


TASK_FLAGS = {
    "detect": ("nms", "max_det", "iou_thres", "conf_thres", "agnostic"),
    "segment": ("argmax", "upsample"),
}


def task_options(args: argparse.Namespace, task: str) -> dict:
    """The task-specific flags that were given; one meant for another task is an error, not silently ignored."""
    options = {}
    for flag_task, names in TASK_FLAGS.items():
        for name in names:
            value = getattr(args, name, None)
            if value is None:
                continue
            if flag_task != task:
                flag = "--no-upsample" if name == "upsample" else "--" + name.replace("_", "-")
                raise EdgeDeployError(f"{flag} applies to {flag_task} models; {args.model} is a {task} model")
            options[name] = value
    return options


def run(args: argparse.Namespace) -> int:
    from edgedeploy.export.pipeline import export
    from edgedeploy.export.report import REPORT_NAME

    from edgedeploy.models.registry import get_model_info

    def log(line: str) -> None:
        print(line, flush=True)

    if not args.model:
        args.model = _model_from_checkpoint(args.weights)
    options = task_options(args, get_model_info(args.model).task)

    report = export(
        args.model,
        log=log,
        weights=args.weights,
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
