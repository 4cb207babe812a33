"""Embed the edgedeploy runtime in your own capture loop (no threads, no CameraApp).

    python examples/camera_app.py yolox_s.fp16.engine 0            # camera 0
    python examples/camera_app.py model.onnx clip.mp4 --save out.mp4

The pipeline takes the BGR frames OpenCV gives you and returns results in those frames' pixels.
"""

import argparse
import time

import cv2

from edgedeploy.runtime import Detections, load_pipeline
from edgedeploy.runtime.camera import draw_overlay, draw_result, open_source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", help=".engine / .onnx with its sidecar")
    ap.add_argument("source", help="camera index, video file or rtsp:// URL")
    ap.add_argument("--save", help="write the annotated video here")
    ap.add_argument("--max-frames", type=int, default=0)
    args = ap.parse_args()

    pipeline = load_pipeline(args.artifact)  # Classifier, Detector or Segmenter, from the sidecar's task
    cap, writer, n, t0 = open_source(args.source), None, 0, time.perf_counter()
    try:
        while not args.max_frames or n < args.max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            t = time.perf_counter()
            result = pipeline(frame)  # your code gets boxes/classes/masks here
            latency_ms = (time.perf_counter() - t) * 1e3
            if isinstance(result, Detections) and len(result):
                print(f"frame {n}: {len(result)} objects, first {result.labels()[0]} at {result.boxes[0].round()}")
            draw_result(frame, result)
            draw_overlay(frame, (n + 1) / (time.perf_counter() - t0), latency_ms)
            if args.save:
                if writer is None:
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(args.save, cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (w, h))
                writer.write(frame)
            n += 1
    except KeyboardInterrupt:
        pass
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        pipeline.close()
    print(f"{n} frames, {n / (time.perf_counter() - t0):.1f} FPS")


if __name__ == "__main__":
    main()
