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
    parser.add_argument("--model", required=True, help="registry name, e.g. mobilenetv3_large (see `deploy models`)")
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
    parser.add_argument("--int8", action="store_true", help="also write an INT8 Q/DQ ONNX (and engine)")
    parser.add_argument("--calib", default="synthetic", metavar="DIR|synthetic", help="INT8 calibration images")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--eval-data", default="synthetic", metavar="DIR|synthetic",
                        help="held-out images for FP16/INT8 accuracy (ImageFolder layout gives top-1)")
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--builder", choices=("auto", "tensorrt", "tensorrt-rtx", "none"), default="auto")
    parser.add_argument("--workspace", type=int, metavar="MB", help="TensorRT workspace memory-pool limit")
    parser.add_argument("--timing-cache", help="timing cache file (default OUT/<model>/timing.cache)")
    parser.add_argument("--rtol", type=float, help="parity rtol (default: task's, 1e-3 for classify)")
    parser.add_argument("--atol", type=float, help="parity atol (default: task's, 1e-4 for classify)")
    parser.add_argument("--no-simplify", action="store_true")
    parser.add_argument("--force", action="store_true", help="rebuild everything, even up-to-date artifacts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from edgedeploy.export.pipeline import export
    from edgedeploy.export.report import REPORT_NAME

    def log(line: str) -> None:
        print(line, flush=True)

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
        fp16=args.fp16,
        fp16_io=args.fp16_io,
        int8=args.int8,
        calib=args.calib,
        calib_images=args.calib_images,
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
    )
    print()
    print(report.table())
    print(f"\nreport: {report.out_dir}/{REPORT_NAME}")
    if report.engine_skipped:
        print(f"engines skipped (exit 3): {report.engine_skip_reason}", file=sys.stderr)
    return report.exit_code


__all__ = ["configure", "run", "EdgeDeployError"]
