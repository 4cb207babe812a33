"""`deploy profile`: parameters, MACs, the heaviest layers and peak activation memory of a model or ONNX file."""

from __future__ import annotations

import argparse
import json

from edgedeploy import options as opt


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", metavar="FILE.onnx", help="an exported ONNX file (same as --onnx)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", help="registered model name (see `deploy models`)")
    src.add_argument("--onnx", metavar="FILE", help="an exported ONNX file (MACs read from the graph)")
    parser.add_argument(
        "--imgsz",
        type=opt.IMGSZ.arg,
        default=None,
        help="square input size (default: the model's own; for ONNX, fills dynamic H/W)",
    )
    parser.add_argument("--num-classes", type=opt.NUM_CLASSES.arg, default=None, help="head size (default: the model's own)")
    parser.add_argument("--top", type=opt.TOP.arg, default=15, help="layers to list, heaviest first (0 = all)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from edgedeploy.benchmarks.profiler import profile_model, profile_onnx
    from edgedeploy.errors import EdgeDeployError

    if args.file:
        if args.model or args.onnx:
            raise EdgeDeployError(f"deploy profile: give one of FILE, --onnx FILE or --model NAME (got {args.file} too)")
        if not args.file.lower().endswith(".onnx"):
            raise EdgeDeployError(f"deploy profile {args.file}: expected an .onnx file (or --model NAME)")
        args.onnx = args.file
    if not (args.model or args.onnx):
        raise EdgeDeployError("deploy profile: give an ONNX file (`deploy profile model.onnx`) or --model NAME")
    if args.onnx:
        profile = profile_onnx(args.onnx, imgsz=args.imgsz)
        label = args.onnx
    else:
        from edgedeploy.models import create_model
        from edgedeploy.models.artifact import describe_artifact

        desc = describe_artifact(model=args.model, imgsz=args.imgsz)  # unknown names raise with the nearest matches
        model = create_model(desc.model, num_classes=args.num_classes)
        profile = profile_model(model, desc.imgsz)
        label = desc.model
    if args.json:
        print(json.dumps({"model": label, **profile.to_dict(top=args.top)}, indent=2))
    else:
        print(label)
        print(profile.format(top=args.top))
    return 0
