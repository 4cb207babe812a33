"""Send camera/video frames to a Triton server running a `deploy triton` repository, over gRPC.

    tritonserver --model-repository runs/triton &
    python examples/triton_client.py --model yolox_nano_pipeline --source video.mp4

The `<name>_pipeline` ensemble takes raw BGR frames (preprocessing runs in the server) and returns the model's
outputs plus `scale_pad`, which maps boxes back to frame pixels: (xy - pad) / scale.
Not exercised end to end in this project's CI (no Triton server there); `build_request` is unit-tested.
"""

from __future__ import annotations

import argparse

import numpy as np


def build_request(frames: list[np.ndarray], client_module):
    """Batch same-sized BGR uint8 frames into one `frame` input. `client_module` is tritonclient.grpc."""
    if not frames or any(f.shape != frames[0].shape or f.dtype != np.uint8 or f.ndim != 3 for f in frames):
        raise ValueError("frames must be a non-empty list of same-sized HxWx3 uint8 images")
    batch = np.stack(frames)
    inp = client_module.InferInput("frame", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    return [inp]


def to_frame_pixels(boxes: np.ndarray, scale_pad: np.ndarray) -> np.ndarray:
    scale, px, py = scale_pad
    return (boxes - np.array([px, py, px, py], np.float32)) / scale


def main() -> None:
    import cv2
    import tritonclient.grpc as grpcclient

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="localhost:8001")
    ap.add_argument("--model", required=True, help="e.g. yolox_nano_pipeline")
    ap.add_argument("--source", default="0", help="camera index or video file")
    args = ap.parse_args()

    client = grpcclient.InferenceServerClient(args.url)
    cap = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
    outputs = [o.name for o in client.get_model_metadata(args.model).outputs]
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        result = client.infer(args.model, build_request([frame], grpcclient))
        out = {name: result.as_numpy(name) for name in outputs}
        if "boxes" in out and "num_dets" in out:
            n = int(out["num_dets"][0, 0])
            boxes = to_frame_pixels(out["boxes"][0, :n], out["scale_pad"][0])
            print(f"{n} detections, first: {boxes[:1].round(1).tolist()}")
        else:
            print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
