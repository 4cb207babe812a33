"""`deploy run`: a model on a camera, video file or RTSP stream, with FPS/latency overlay and a final summary.

    deploy run --engine yolox_s.fp16.engine --source 0 --show
    deploy run --engine model.onnx --source clip.mp4 --save out.mp4
    deploy run --model mobilenetv3_small --weights ckpt.pt --source rtsp://camera/stream
"""

from __future__ import annotations

import argparse

from edgedeploy import options as opt
from edgedeploy.tasks import DETECT, TASKS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", help="artifact to run: .engine (TensorRT), .onnx (ONNX Runtime) or .pt (with --model "
                        "when no sidecar names the model)")
    parser.add_argument("--model", help="registry model name: run with PyTorch (add --weights for a checkpoint)")
    parser.add_argument("--weights", help="checkpoint for --model")
    parser.add_argument("--source", required=True, help="camera index (0), video file, or rtsp:// / http:// URL")
    parser.add_argument("--show", action="store_true", help="display the annotated stream (press q to quit)")
    parser.add_argument("--save", help="write the annotated stream to this video file (.mp4 / .avi)")
    parser.add_argument("--backend", choices=["tensorrt", "onnxruntime", "torch"], help="override the backend")
    parser.add_argument("--device", help="cpu | cuda (ONNX Runtime / PyTorch backends)")
    parser.add_argument("--imgsz", type=opt.IMGSZ.arg, help="input size for --model (default: the model's)")
    parser.add_argument("--num-classes", type=opt.NUM_CLASSES.arg, help="classes in the checkpoint, when no sidecar says")
    parser.add_argument("--max-frames", type=opt.MAX_FRAMES.arg, help="stop after this many frames")
    parser.add_argument("--cuda-graph", action="store_true", help="TensorRT: replay inference as a CUDA graph")
    parser.add_argument("--no-gpu-preprocess", action="store_true", help="TensorRT: preprocess on the CPU instead")
    parser.add_argument("--reconnect", type=opt.RECONNECT.arg, default=5, help="reopen attempts when a live source drops")
    DETECT.add_flags(parser, defaults={"conf_thres": opt.SERVE_NMS.conf_thres, "iou_thres": opt.SERVE_NMS.iou_thres},
                     only=("conf_thres", "iou_thres", "max_det"))


def build_pipeline(args: argparse.Namespace):
    from edgedeploy.runtime.pipelines import Detector, load_pipeline

    from edgedeploy.errors import EdgeDeployError

    det_kwargs = {"conf_thres": args.conf_thres, "iou_thres": args.iou_thres, "max_det": args.max_det}
    if not args.engine and not args.model:
        raise EdgeDeployError("give --engine ARTIFACT (.engine/.onnx/.pt) or --model NAME")
    if args.model and not args.engine:
        from edgedeploy.models.registry import get_model_info

        cls = TASKS[get_model_info(args.model).task].part("pipeline")
        kwargs = det_kwargs if cls is Detector else {}
        return cls.from_model(args.model, weights=args.weights, imgsz=args.imgsz, num_classes=args.num_classes,
                              device=args.device, **kwargs)
    return load_pipeline(args.engine, model=args.model, num_classes=args.num_classes, imgsz=args.imgsz,
                         backend=args.backend, device=args.device, cuda_graph=args.cuda_graph,
                         gpu_preprocess=False if args.no_gpu_preprocess else None, **det_kwargs)


def run(args: argparse.Namespace) -> int:
    from edgedeploy.runtime.camera import CameraApp

    pipeline = build_pipeline(args)
    try:
        app = CameraApp(pipeline, args.source, show=args.show, save=args.save, max_frames=args.max_frames,
                        reconnect_attempts=args.reconnect)
        summary = app.run()
    finally:
        pipeline.close()
    print(summary.format())
    if summary.end_reason == "interrupted":  # Ctrl-C: summary printed and video finalised, as scripts expect 130
        from edgedeploy.errors import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED
    return 0 if summary.end_reason != "source lost" else 1
