"""Detection post-processing for engines exported without NMS (`--nms none`): candidates -> final detections.

Runs on whatever device the candidate tensors are on. With the PyTorch backend on CUDA, or a TensorRT engine
whose output buffers are viewed as CUDA tensors (zero-copy through `__cuda_array_interface__`), the filtering
and `torchvision.ops.batched_nms` run on the GPU and only the final detections come back to the host.
Each image goes through its own `batched_nms` call (exactly the per-image reference the mAP is scored with;
one batched call would shift boxes by image offsets, which moves IoUs in float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgedeploy.options import SERVE_NMS


def as_torch(x: Any, device: str | None = None):
    """numpy array, torch tensor or CUDA-array-interface object -> torch tensor (no copy where possible)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return torch.as_tensor(x, device=device or "cuda")
    return torch.from_numpy(np.ascontiguousarray(x))


def boxes_to_frame(boxes: Any, scale: Any, pad: tuple[float, float], h: int, w: int) -> np.ndarray:
    """xyxy boxes in input-tensor pixels -> original frame pixels, clipped to the frame: undo the letterbox
    (`scale` a float) or the stretch (`scale` = (sx, sy)) that `data.preprocess.letterbox_geometry` describes."""
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad[0]) / sx).clip(0, w)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad[1]) / sy).clip(0, h)
    return boxes


def batched_detections(
    boxes: Any,
    scores: Any,
    *,
    conf_thres: float = SERVE_NMS.conf_thres,
    iou_thres: float = SERVE_NMS.iou_thres,
    max_det: int = SERVE_NMS.max_det,
    agnostic: bool = False,
) -> list[Any]:
    """boxes [B,N,4] xyxy, scores [B,N,C] -> per image a tensor [K,6] (x1, y1, x2, y2, score, class), sorted by
    score, K <= max_det, on the input's device. The one host/device NMS: it serves the runtime and scores mAP.

    Each box keeps its best class (score = max over classes, the YOLOX/YOLOv5 inference convention); boxes with
    score > conf_thres go through `torchvision.ops.batched_nms` per image (per class; one class for all when
    `agnostic`). The exported `--nms onnx` graph implements the same, which its parity test checks.
    """
    import torch
    from torchvision.ops import batched_nms

    from edgedeploy.errors import InputError

    boxes, scores = as_torch(boxes), as_torch(scores)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise InputError(f"expected boxes [B,N,4] and scores [B,N,C], got {tuple(boxes.shape)} and "
                         f"{tuple(scores.shape)}: pass a detector's eval-mode (decoded) outputs")
    best, cls = scores.float().max(dim=2)
    keep = best > conf_thres
    results = []
    for bx, sc, cl, k in zip(boxes, best, cls, keep):
        bx, sc, cl = bx[k].float(), sc[k], cl[k]
        idx = batched_nms(bx, sc, torch.zeros_like(cl) if agnostic else cl, iou_thres)[:max_det]
        results.append(torch.cat([bx[idx], sc[idx, None], cl[idx, None].float()], dim=1))
    return results
