"""Detection post-processing for engines exported without NMS (`--nms none`): candidates -> final detections.

Runs on whatever device the candidate tensors are on. With the PyTorch backend on CUDA, or a TensorRT engine
whose output buffers are viewed as CUDA tensors (zero-copy through `__cuda_array_interface__`), the filtering
and `torchvision.ops.batched_nms` run on the GPU and only the final detections come back to the host.
The whole batch goes through one `batched_nms` call (boxes offset per image and class), so batch > 1 costs
one kernel sequence, not one per image.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
    (`scale` a float) or the stretch (`scale` = (sx, sy)) that `letterbox_geometry` describes."""
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad[0]) / sx).clip(0, w)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad[1]) / sy).clip(0, h)
    return boxes


def batched_detections(
    boxes: Any,
    scores: Any,
    *,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 100,
    agnostic: bool = False,
) -> list[Any]:
    """boxes [B,N,4] xyxy, scores [B,N,C] -> per image a tensor [K,6] (x1, y1, x2, y2, score, class),
    sorted by score, on the input's device."""
    import torch
    from torchvision.ops import batched_nms

    boxes, scores = as_torch(boxes), as_torch(scores)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"expected boxes [B,N,4] and scores [B,N,C], got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    b, _, c = scores.shape
    best, cls = scores.float().max(dim=2)  # one class per candidate (YOLOX/YOLOv5 inference convention)
    keep = best > conf_thres
    img_idx, cand_idx = keep.nonzero(as_tuple=True)
    cand_boxes = boxes[img_idx, cand_idx].float()
    cand_scores = best[img_idx, cand_idx]
    cand_cls = cls[img_idx, cand_idx]
    groups = img_idx if agnostic else img_idx * c + cand_cls
    kept = batched_nms(cand_boxes, cand_scores, groups, iou_thres)  # sorted by decreasing score
    out_rows = torch.cat([cand_boxes[kept], cand_scores[kept, None], cand_cls[kept, None].float()], dim=1)
    out_img = img_idx[kept]
    results = []
    for i in range(b):
        results.append(out_rows[out_img == i][:max_det])
    return results
