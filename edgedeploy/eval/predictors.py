"""Predict functions: the one interface every evaluator scores, whatever runs the model.

A predict function maps a normalised float32 NCHW numpy batch to that batch's outputs. PyTorch models run in
eval mode without gradients; exported artifacts (ONNX files, TensorRT engines) run through the runtime's
`load_engine` / `Engine` API, which takes care of backends, sidecar checks and device placement:

* `torch_predict_fn(model)` / `engine_predict_fn(engine)` / `artifact_predict_fn(path)`: the raw output
  (classification logits, segmentation logits or class ids);
* `torch_detect_fn(model)` / `engine_detect_fn(engine)` / `onnx_detect_fn(path)`: per-image [K, 6] detections
  (x1, y1, x2, y2, score, class), whichever NMS variant an artifact was exported with.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from edgedeploy.errors import EdgeDeployError
from edgedeploy.options import EVAL_NMS

PredictFn = Callable[[np.ndarray], Any]

# Thresholds for mAP evaluation: keep nearly everything (low-score detections still raise recall).
EVAL_CONF, EVAL_IOU, EVAL_MAX_DET = EVAL_NMS.conf_thres, EVAL_NMS.iou_thres, EVAL_NMS.max_det


# ----------------------------------------------------------------------------------------------- raw outputs


def torch_predict_fn(model, device=None, channels_last: bool = False) -> PredictFn:
    """A PyTorch model in eval mode, no gradients; float32 numpy output. `device`: where to move the model
    (default: where it is). `channels_last` feeds NHWC-strided input (what a channels_last model runs fastest on)."""
    import torch

    if device is not None:
        model = model.to(device)
    model = model.eval()
    device = next(model.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return model(xt.to(device, non_blocking=True, memory_format=memory_format)).float().cpu().numpy()

    return predict


def run_engine(engine) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """`fn(x) -> {output name: array}` for the N images of `x` on any runtime `Engine`: the input is cast to the
    engine's input dtype (FP16-input artifacts), fed in chunks of at most its batch, and a fixed-batch engine's
    short last chunk is zero-padded (the padding is dropped from the outputs)."""
    spec = getattr(engine, "input", None)
    dtype = np.dtype(spec.dtype) if spec is not None else np.dtype(np.float32)
    fixed = spec.shape[0] if spec is not None and spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    chunk = fixed or getattr(engine, "max_batch", None)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        n = x.shape[0]
        if chunk and n > chunk:
            parts = [run(x[i : i + chunk]) for i in range(0, n, chunk)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if fixed and n < fixed:
            x = np.concatenate([x, np.zeros((fixed - n, *x.shape[1:]), x.dtype)])
        out = engine.infer(np.ascontiguousarray(x, dtype=dtype))
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    return run


def engine_predict_fn(engine, output: str | None = None) -> PredictFn:
    """The `output` (default: the first) of a runtime `Engine`, batched as `run_engine` does; FP16 outputs as float32."""
    run = run_engine(engine)
    name = output or engine.outputs[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        out = run(x)[name]
        return out.astype(np.float32) if out.dtype == np.float16 else out

    return predict


def artifact_predict_fn(path: str | os.PathLike, model_name: str | None = None, batch: int = 8) -> tuple[PredictFn, int]:
    """(predict_fn, batch size) over an ONNX file or TensorRT engine opened with `load_engine`. The batch is the
    engine's fixed batch, else `batch` capped at its maximum batch."""
    from edgedeploy.runtime.loader import load_engine

    engine = load_engine(path, model=model_name)
    fixed = engine.input.shape[0]
    size = fixed if isinstance(fixed, int) and fixed > 0 else min(batch, engine.max_batch or batch)
    return engine_predict_fn(engine), size


# ------------------------------------------------------------------------------------------------- detection


def torch_detect_fn(
    model, device=None, conf_thres: float = EVAL_CONF, iou_thres: float = EVAL_IOU, max_det: int = EVAL_MAX_DET,
    amp: bool = False,
) -> PredictFn:
    """A PyTorch detector in eval mode; NMS runs on the model's device."""
    import torch

    from edgedeploy.runtime.nms import batched_detections

    device = device or next(model.parameters()).device

    def predict(x: np.ndarray) -> list:
        model.eval()
        with torch.inference_mode():
            xt = torch.from_numpy(x).to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp and xt.device.type == "cuda"):
                boxes, scores = model(xt)
            return batched_detections(boxes.float(), scores.float(), conf_thres=conf_thres, iou_thres=iou_thres,
                                      max_det=max_det)

    return predict


def engine_detect_fn(
    engine, conf_thres: float = EVAL_CONF, iou_thres: float = EVAL_IOU, max_det: int = EVAL_MAX_DET
) -> PredictFn:
    """Detections from any runtime `Engine` (ONNX Runtime, TensorRT, ...), batched as `run_engine` does."""
    run = run_engine(engine)

    def predict(x: np.ndarray) -> list[np.ndarray]:
        return detections_from_outputs(run(x), conf_thres, iou_thres, max_det)

    return predict


def onnx_detect_fn(path: str | os.PathLike, **kwargs) -> PredictFn:
    """An ONNX detector through ONNX Runtime (with or without NMS in the graph)."""
    from edgedeploy.runtime.loader import load_engine

    return engine_detect_fn(load_engine(path, backend="onnxruntime"), **kwargs)


def detections_from_outputs(
    outputs: Mapping[str, np.ndarray], conf_thres: float = EVAL_CONF, iou_thres: float = EVAL_IOU, max_det: int = EVAL_MAX_DET
) -> list[np.ndarray]:
    """Per-image [K, 6] detections from an artifact's named outputs, whichever NMS variant it was exported with:

    * no NMS: `boxes` [B, N, 4] + `scores` [B, N, C]   -> NMS on the host (`runtime.nms.batched_detections`, as
      for PyTorch);
    * NMS in the graph, padded: one [B, K, 6] output, or EfficientNMS-style num_dets [B, 1] + boxes [B, K, 4]
      + scores [B, K] + classes [B, K].
    """
    import torch

    arrays = {k: np.asarray(v) for k, v in outputs.items()}
    three_d = [a for a in arrays.values() if a.ndim == 3]
    # Our exporter's names first (a 4-class model has scores [B,N,4] too), then shapes for other tools' files.
    box_arr = arrays.get("boxes", arrays.get("det_boxes"))
    box_arr = box_arr if box_arr is not None and box_arr.ndim == 3 else next((a for a in three_d if a.shape[-1] == 4), None)
    score_arr = arrays.get("scores")
    if score_arr is None or score_arr.ndim != 3:
        score_arr = next((a for a in three_d if box_arr is not None and a is not box_arr and a.shape[:2] == box_arr.shape[:2]), None)
    if box_arr is not None and score_arr is not None and len(arrays) == 2:
        from edgedeploy.runtime.nms import batched_detections

        dets = batched_detections(torch.from_numpy(box_arr.astype(np.float32)), torch.from_numpy(score_arr.astype(np.float32)),
                                  conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
        return [d.numpy() for d in dets]
    packed = next((a for a in three_d if a.shape[-1] == 6), None)
    if packed is not None and len(arrays) == 1:
        return [d[d[:, 4] > conf_thres][:max_det].astype(np.float32) for d in packed]
    if box_arr is not None:
        counts = next((a for a in arrays.values() if a.ndim == 2 and a.shape[1] == 1), None)
        two_d = [a for a in arrays.values() if a.ndim == 2 and a.shape[1] == box_arr.shape[1]]
        floats = [arrays[k] for k in ("scores", "det_scores") if k in arrays and arrays[k].ndim == 2]
        floats = floats or [a for a in two_d if a.dtype.kind == "f"]
        ints = [arrays[k] for k in ("classes", "det_classes") if k in arrays and arrays[k].ndim == 2]
        ints = ints or [a for a in two_d if a.dtype.kind in "iu"]
        if counts is not None and floats and ints:
            out = []
            for b in range(box_arr.shape[0]):
                n = int(counts[b, 0])
                out.append(np.concatenate([box_arr[b, :n], floats[0][b, :n, None], ints[0][b, :n, None]], 1).astype(np.float32))
            return out
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    raise EdgeDeployError(
        f"cannot read detections from outputs {shapes}: expected boxes [B,N,4] + scores [B,N,C] (export --nms none), "
        "one [B,K,6] output, or num_dets/boxes/scores/classes (NMS in the graph)"
    )
