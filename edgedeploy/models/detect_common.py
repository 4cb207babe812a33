"""Building blocks, box decoding and NMS shared by the YOLOv5 and YOLOX detectors.

One output contract for every detector (what export, NMS, evaluation and the runtime consume):

* ``model.train()``: ``model(x)`` returns the raw per-level head outputs the loss needs (see each model file).
* ``model.eval()``: ``model(x)`` returns ``(boxes, scores)``:
  ``boxes`` [B, N, 4] float, xyxy in input pixels; ``scores`` [B, N, C] float in [0, 1]
  (objectness x class probability, sigmoid applied). N = sum over levels of H_l * W_l * anchors.
* ``model.strides``: tuple of level strides (8, 16, 32); ``model.num_classes``.
* ``edgedeploy.runtime.nms.batched_detections(boxes, scores, ...)`` turns that into per-image detections
  ``[K, 6]`` (x1, y1, x2, y2, score, class) with ``torchvision.ops.batched_nms``.

Blocks follow the Ultralytics YOLOv5 v6.x and Megvii YOLOX layouts so parameter counts match the published tables.
"""

from __future__ import annotations


import torch
import torch.nn as nn

# Both projects train with these BN settings (YOLOv5 Conv; YOLOX init_yolo()).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> SiLU, 'same' padding. YOLOv5's `Conv`, YOLOX's `BaseConv`."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, groups: int = 1,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2 if p is None else p, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DWConv(nn.Module):
    """Depthwise k x k ConvBNAct followed by a pointwise ConvBNAct (YOLOX-Nano's `DWConv`)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1):
        super().__init__()
        self.dconv = ConvBNAct(c_in, c_in, k, s, groups=c_in)
        self.pconv = ConvBNAct(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pconv(self.dconv(x))


def conv_block(c_in: int, c_out: int, k: int, s: int = 1, depthwise: bool = False) -> nn.Module:
    return DWConv(c_in, c_out, k, s) if depthwise else ConvBNAct(c_in, c_out, k, s)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 with an optional residual (when shapes allow)."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, expansion: float = 0.5,
                 depthwise: bool = False):
        super().__init__()
        hidden = int(c_out * expansion)
        self.cv1 = ConvBNAct(c_in, hidden, 1)
        self.cv2 = conv_block(hidden, c_out, 3, 1, depthwise)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class CSPBlock(nn.Module):
    """CSP bottleneck with 3 convs: YOLOv5's `C3` and YOLOX's `CSPLayer` (same structure)."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, expansion: float = 0.5,
                 depthwise: bool = False):
        super().__init__()
        hidden = int(c_out * expansion)
        self.cv1 = ConvBNAct(c_in, hidden, 1)
        self.cv2 = ConvBNAct(c_in, hidden, 1)
        self.cv3 = ConvBNAct(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, 1.0, depthwise) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools == pools of 5, 9, 13 (YOLOv5 v6)."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1)
        self.cv2 = ConvBNAct(hidden * 4, c_out, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), 1))


class SPP(nn.Module):
    """Parallel max-pools 5/9/13 (YOLOX's `SPPBottleneck`)."""

    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in kernels)
        self.cv2 = ConvBNAct(hidden * (len(kernels) + 1), c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [p(x) for p in self.pools], 1))


class Focus(nn.Module):
    """Space-to-depth (2x2 pixels -> 4x channels) then a conv: YOLOX's stem. Exports as Slice + Concat."""

    def __init__(self, c_in: int, c_out: int, k: int = 3):
        super().__init__()
        self.conv = ConvBNAct(c_in * 4, c_out, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tl, bl = x[..., ::2, ::2], x[..., 1::2, ::2]
        tr, br = x[..., ::2, 1::2], x[..., 1::2, 1::2]
        return self.conv(torch.cat((tl, bl, tr, br), 1))


# ---------------------------------------------------------------------------------------------------------------
# Grids and decoding. Kept as free functions so the loss, the model and the tests decode identically.


def make_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Cell indices [H, W, 2] as (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack((xs, ys), -1)


def decode_yolov5(raw: torch.Tensor, anchors_px: torch.Tensor, stride: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One YOLOv5 level: raw logits [B, A, H, W, 5 + C] -> (boxes [B, A*H*W, 4] xyxy px, scores [B, A*H*W, C]).

    Grid-sensitivity-free decoding of v6.x: xy = (2*sigmoid - 0.5 + cell) * stride, wh = (2*sigmoid)^2 * anchor.
    `anchors_px` is [A, 2] in input pixels.
    """
    b, a, h, w, _ = raw.shape
    y = raw.sigmoid()
    grid = make_grid(h, w, raw.device, raw.dtype).view(1, 1, h, w, 2)
    xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * stride
    wh = (y[..., 2:4] * 2.0) ** 2 * anchors_px.to(raw.dtype).view(1, a, 1, 1, 2)
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), -1).reshape(b, a * h * w, 4)
    scores = (y[..., 4:5] * y[..., 5:]).reshape(b, a * h * w, -1)
    return boxes, scores


def decode_yolox(raw: torch.Tensor, stride: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One YOLOX level: raw [B, 5 + C, H, W] (reg, obj logit, cls logits) -> (boxes xyxy px, scores).

    Anchor-free: centre = (offset + cell) * stride, size = exp(log_wh) * stride.
    """
    b, _, h, w = raw.shape
    p = raw.flatten(2).transpose(1, 2)  # [B, H*W, 5 + C]
    grid = make_grid(h, w, raw.device, raw.dtype).view(1, h * w, 2)
    xy = (p[..., 0:2] + grid) * stride
    wh = p[..., 2:4].exp() * stride
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), -1)
    scores = p[..., 4:5].sigmoid() * p[..., 5:].sigmoid()
    return boxes, scores
