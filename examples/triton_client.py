"""Send camera/video frames to a Triton server running a `deploy triton` repository, over gRPC.

    tritonserver --model-repository runs/triton &
    python examples/triton_client.py --model yolox_nano_pipeline --source video.mp4

A detector's `<name>_pipeline` ensemble takes raw BGR frames (preprocessing, the model, NMS and the mapping back to
frame pixels all run in the server) and returns final detections, padded to max_det: num_dets [B,1],
det_boxes [B,max_det,4] (x1, y1, x2, y2 in frame pixels), det_scores [B,max_det], det_classes [B,max_det].
Other ensembles return the model's outputs plus `scale_pad`.
Not exercised against a running server in this project's CI (none there); `build_request` and
`final_detections` are unit-tested, and the ensemble's steps are run locally in tests/test_triton.py.
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


def final_detections(out: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The detector ensemble's padded outputs -> per frame (boxes [K,4] frame pixels, scores [K], classes [K])."""
    result = []
    for i, n in enumerate(out["num_dets"].reshape(-1).tolist()):
        result.append((out["det_boxes"][i, :n], out["det_scores"][i, :n], out["det_classes"][i, :n]))
    return result


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
        if "num_dets" in out and "det_boxes" in out:
            ((boxes, scores, classes),) = final_detections(out)
            for box, score, cls in zip(boxes.round(1).tolist(), scores.tolist(), classes.tolist()):
                print(f"class {cls} score {score:.2f} box {box}")
            print(f"-- {len(scores)} detections")
        else:
            print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
