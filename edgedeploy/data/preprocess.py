"""CPU reference preprocessing. Training-time eval, calibration, parity inputs and the runtime's CPU path
all use these, and the GPU kernel in `edgedeploy.runtime` is tested against them.

`InputConvention` says how a model wants its pixels: channel order, scale, mean/std, and how a frame is brought
to the input size (plain resize, letterbox, or shorter-side resize + centre crop). It travels with the weights
(checkpoint meta, sidecars, Triton config) so that an official checkpoint is fed exactly what its original
implementation feeds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from edgedeploy.errors import EdgeDeployError

LETTERBOX_PAD = 114
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelInfo(Protocol):
    """What preprocessing reads of a model's registry entry (`edgedeploy.models.registry.ModelInfo`); data/
    sits below models/, so it names the fields it needs instead of importing the class."""

    mean: Sequence[float]
    std: Sequence[float]
    letterbox: bool
    extra: Mapping[str, Any] | None

_INTERPOLATIONS = ("linear", "cubic", "area", "nearest", "linear_pil", "cubic_pil")
_RESIZES = ("resize", "letterbox", "shorter_crop")


@dataclass(frozen=True)
class InputConvention:
    """x = (pixel[channel_order] * scale - mean) / std, after bringing the frame to the input size by `resize`.

    mean and std are in scaled units (for scale 1/255: fractions of 1; for scale 1: 0-255 units).
    """

    channel_order: str = "rgb"  # "rgb" | "bgr"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # "resize" (stretch) | "letterbox" | "shorter_crop" (shorter side to size / crop_pct, then centre crop)
    resize: str = "resize"
    interpolation: str = "linear"  # cv2 "linear" | "cubic" | "area" | "nearest"; PIL "linear_pil" | "cubic_pil"
    crop_pct: float = 1.0  # shorter_crop only
    letterbox_align: str = "center"  # "center" (Ultralytics) | "topleft" (YOLOX: pad right/bottom only)
    pad_value: int = LETTERBOX_PAD

    def __post_init__(self) -> None:
        problems = []
        if self.channel_order not in ("rgb", "bgr"):
            problems.append(f"channel_order {self.channel_order!r} (rgb|bgr)")
        if self.resize not in _RESIZES:
            problems.append(f"resize {self.resize!r} ({'|'.join(_RESIZES)})")
        if self.interpolation not in _INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r} ({'|'.join(_INTERPOLATIONS)})")
        if self.letterbox_align not in ("center", "topleft"):
            problems.append(f"letterbox_align {self.letterbox_align!r} (center|topleft)")
        if not (self.scale > 0 and 0 < self.crop_pct <= 1 and len(self.mean) == 3 and len(self.std) == 3
                and all(s > 0 for s in self.std) and 0 <= self.pad_value <= 255):
            problems.append("scale > 0, 0 < crop_pct <= 1, 3 means, 3 positive stds, 0 <= pad_value <= 255")
        if problems:
            raise EdgeDeployError("invalid input convention: " + "; ".join(problems))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def letterbox(self) -> bool:
        return self.resize == "letterbox"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputConvention":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdgeDeployError(f"input convention has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in d.items()})

    @classmethod
    def from_info(cls, info: "ModelInfo") -> "InputConvention":
        """The registry's default for a model (what our own training uses): RGB, /255, its mean/std."""
        return cls(mean=tuple(info.mean), std=tuple(info.std), resize="letterbox" if info.letterbox else "resize")

    def unit_mean_std(self) -> tuple[list[float], list[float]]:
        """mean/std in [0, 1] pixel units (the legacy sidecar fields): x = (p/255 - m') / s'."""
        k = self.scale * 255.0
        return [m / k for m in self.mean], [s / k for s in self.std]


# Named conventions of the original projects (`--input-convention NAME`).
PRESETS: dict[str, InputConvention] = {
    "yolox": InputConvention("bgr", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "letterbox", letterbox_align="topleft"),
    "yolox-legacy": InputConvention("rgb", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "letterbox",
                                    letterbox_align="topleft"),
    "yolov5": InputConvention("rgb", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "letterbox", letterbox_align="center"),
}


def preset(name: str) -> InputConvention:
    if name not in PRESETS:
        raise EdgeDeployError(f"unknown input convention {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def convention_for(info: "ModelInfo") -> InputConvention:
    """The convention a (possibly checkpoint-specialised) ModelInfo carries in `extra["preprocess"]`, else the
    registry default."""
    d = (info.extra or {}).get("preprocess")
    return InputConvention.from_dict(d) if d else InputConvention.from_info(info)


def with_convention(info: "ModelInfo", conv: InputConvention | Mapping[str, Any] | None) -> "ModelInfo":
    """A copy of `info` carrying `conv` (what `convention_for` then returns)."""
    import dataclasses

    if conv is None:
        return info
    d = conv.to_dict() if isinstance(conv, InputConvention) else InputConvention.from_dict(conv).to_dict()
    return dataclasses.replace(info, extra={**(info.extra or {}), "preprocess": d})


def _cv2_interp(name: str) -> int:
    import cv2

    return {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA,
            "nearest": cv2.INTER_NEAREST}[name]


def resize_image(img: np.ndarray, wh: tuple[int, int], interpolation: str = "linear") -> np.ndarray:
    """Resize HWC uint8 to (w, h) with the named interpolation (PIL's for the *_pil names)."""
    if (img.shape[1], img.shape[0]) == tuple(wh):
        return img
    if interpolation.endswith("_pil"):
        from PIL import Image

        method = Image.Resampling.BILINEAR if interpolation == "linear_pil" else Image.Resampling.BICUBIC
        return np.asarray(Image.fromarray(img).resize(tuple(wh), method))
    import cv2

    return cv2.resize(img, tuple(wh), interpolation=_cv2_interp(interpolation))


def letterbox_geometry(src_h: int, src_w: int, dst_h: int, dst_w: int, letterbox: bool = True,
                       align: str = "center") -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """(scale, (pad_x, pad_y), (new_h, new_w)) of fitting a src_h x src_w frame into dst_h x dst_w: the one
    geometry the CPU letterbox, the GPU kernel and the Triton steps use. `align="topleft"` pads right/bottom only
    (YOLOX's convention), so the padding offset is (0, 0).

    Without letterbox the frame is stretched to the input size; the "scale" is then per axis and returned as
    (sx, sy) so boxes can still be mapped back.
    """
    if not letterbox:
        return (dst_w / src_w, dst_h / src_h), (0, 0), (dst_h, dst_w)
    scale = min(dst_h / src_h, dst_w / src_w)
    new_h, new_w = int(round(src_h * scale)), int(round(src_w * scale))
    pad = (0, 0) if align == "topleft" else ((dst_w - new_w) // 2, (dst_h - new_h) // 2)
    return scale, pad, (new_h, new_w)


def letterbox(img: np.ndarray, size: int | tuple[int, int], pad_value: int = LETTERBOX_PAD, align: str = "center",
              interpolation: str = "linear"):
    """Resize keeping aspect ratio and pad to `size` (h, w), centred or top-left aligned.
    Returns (image, scale, (pad_x, pad_y)).

    A box in the letterboxed image maps back to the original by `(xy - pad) / scale`.
    """
    h_out, w_out = (size, size) if isinstance(size, int) else size
    scale, (pad_x, pad_y), (nh, nw) = letterbox_geometry(*img.shape[:2], h_out, w_out, True, align)
    resized = resize_image(img, (nw, nh), interpolation)
    out = np.full((h_out, w_out, img.shape[2]), pad_value, dtype=img.dtype)
    out[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized
    return out, scale, (pad_x, pad_y)


def shorter_crop(img: np.ndarray, size: tuple[int, int], crop_pct: float, interpolation: str):
    """Shorter side to min(size)/crop_pct, then centre crop `size` (h, w). Returns (image, scale, (-x0, -y0))."""
    h_out, w_out = size
    h, w = img.shape[:2]
    target = int(min(h_out, w_out) / crop_pct)  # timm: floor(size / crop_pct)
    scale = target / min(h, w)
    nh, nw = (target, int(w * scale)) if h <= w else (int(h * scale), target)
    resized = resize_image(img, (nw, nh), interpolation)
    y0, x0 = int(round((nh - h_out) / 2.0)), int(round((nw - w_out) / 2.0))
    return resized[y0 : y0 + h_out, x0 : x0 + w_out], scale, (-x0, -y0)


def to_input_tensor(
    img_bgr: np.ndarray,
    size: int | tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    letterboxed: bool = False,
    dtype=np.float32,
    convention: InputConvention | None = None,
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """HWC uint8 BGR frame -> (1, 3, H, W) network input, plus the geometry scale and padding.

    With `convention` it decides everything; without it (older callers) RGB, /255, `mean`/`std` and a
    centred letterbox iff `letterboxed`.
    """
    import cv2

    if convention is None:
        convention = InputConvention(mean=tuple(mean if mean is not None else (0.0, 0.0, 0.0)),
                                     std=tuple(std if std is not None else (1.0, 1.0, 1.0)),
                                     resize="letterbox" if letterboxed else "resize")
    c = convention
    if img_bgr.ndim == 2:
        img_bgr = cv2.cvtColor(img_bgr, cv2.COLOR_GRAY2BGR)
    elif img_bgr.shape[2] == 4:
        img_bgr = cv2.cvtColor(img_bgr, cv2.COLOR_BGRA2BGR)
    h_out, w_out = (size, size) if isinstance(size, int) else size
    if c.resize == "letterbox":
        img, scale, pad = letterbox(img_bgr, (h_out, w_out), c.pad_value, c.letterbox_align, c.interpolation)
    elif c.resize == "shorter_crop":
        img, scale, pad = shorter_crop(img_bgr, (h_out, w_out), c.crop_pct, c.interpolation)
    else:
        img = resize_image(img_bgr, (w_out, h_out), c.interpolation)
        scale, pad = 1.0, (0, 0)
    x = img[:, :, ::-1] if c.channel_order == "rgb" else img
    x = x.astype(np.float32)
    x = x / np.float32(255.0) if abs(c.scale - 1 / 255) < 1e-12 else x * np.float32(c.scale)
    x = (x - np.asarray(c.mean, np.float32)) / np.asarray(c.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(dtype), scale, pad
