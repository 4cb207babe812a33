"""CPU reference preprocessing. Training-time eval, calibration, parity inputs and the runtime's CPU path
all use these, and the GPU kernel in `edgedeploy.runtime` is tested against them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LETTERBOX_PAD = 114


def letterbox(img: np.ndarray, size: int | tuple[int, int], pad_value: int = LETTERBOX_PAD):
    """Resize keeping aspect ratio and pad to `size` (h, w), centred. Returns (image, scale, (pad_x, pad_y)).

    A box in the letterboxed image maps back to the original by `(xy - pad) / scale`.
    """
    import cv2

    h_out, w_out = (size, size) if isinstance(size, int) else size
    h, w = img.shape[:2]
    scale = min(h_out / h, w_out / w)
    nh, nw = int(round(h * scale)), int(round(w * scale))
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else img
    pad_y, pad_x = (h_out - nh) // 2, (w_out - nw) // 2
    out = np.full((h_out, w_out, img.shape[2]), pad_value, dtype=img.dtype)
    out[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized
    return out, scale, (pad_x, pad_y)


def to_input_tensor(
    img_bgr: np.ndarray,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    letterboxed: bool = False,
    dtype=np.float32,
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """HWC uint8 BGR frame -> (1, 3, H, W) normalised RGB array, plus the letterbox scale and padding."""
    import cv2

    if img_bgr.ndim == 2:
        img_bgr = cv2.cvtColor(img_bgr, cv2.COLOR_GRAY2BGR)
    elif img_bgr.shape[2] == 4:
        img_bgr = cv2.cvtColor(img_bgr, cv2.COLOR_BGRA2BGR)
    h_out, w_out = (size, size) if isinstance(size, int) else size
    if letterboxed:
        img, scale, pad = letterbox(img_bgr, (h_out, w_out))
    else:
        img = cv2.resize(img_bgr, (w_out, h_out), interpolation=cv2.INTER_LINEAR)
        scale, pad = 1.0, (0, 0)
    x = img[:, :, ::-1].astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(dtype), scale, pad
