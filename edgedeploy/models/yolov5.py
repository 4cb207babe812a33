"""YOLOv5 (Ultralytics v6.x architecture): n / s / m / l / x.

Layout of yolov5s.yaml (v6.0+): 6x6 stride-2 stem conv (no Focus), C3 blocks, SPPF, PANet neck, three
anchor-based heads on P3/P4/P5 (strides 8/16/32), SiLU. Variants differ only by depth/width multipliers.

Interface (shared by every detector, see `detect_common`):

* train mode: ``model(x)`` -> list of 3 raw tensors ``[B, A=3, H_l, W_l, 5 + C]`` (x, y, w, h, obj, classes;
  logits, nothing applied). This is what `edgedeploy.train.detect_losses.YOLOv5Loss` consumes.
* eval mode: ``model(x)`` -> ``(boxes [B, N, 4] xyxy input pixels, scores [B, N, C])``, scores = sigmoid(obj) *
  sigmoid(cls), decoded with xy = (2*sigmoid - 0.5 + cell) * stride, wh = (2*sigmoid)^2 * anchor.
* ``model.strides`` = (8, 16, 32); ``model.anchors`` [3 levels, 3, 2] buffer in INPUT PIXELS (Ultralytics keeps
  them divided by stride; ours are not); ``model.num_classes``.

Published figures (README table, COCO 80 classes, 640): the parameter counts there come from the fused model
(BatchNorm folded into convs), so tests compare `complexity.count_params_bn_folded`; "GFLOPs" there are
2 x MACs as counted by thop, so `published_macs` = GFLOPs / 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from edgedeploy.models.channels import make_divisible
from edgedeploy.models.detect_common import SPPF, ConvBNAct, CSPBlock, decode_yolov5
from edgedeploy.models.registry import register_model

# Ultralytics' default anchors (w, h in pixels) for P3/8, P4/16, P5/32.
DEFAULT_ANCHORS = (
    ((10, 13), (16, 30), (33, 23)),
    ((30, 61), (62, 45), (59, 119)),
    ((116, 90), (156, 198), (373, 326)),
)
STRIDES = (8, 16, 32)


class YOLOv5Head(nn.Module):
    """One 1x1 conv per level predicting A * (5 + C) values per cell."""

    def __init__(self, num_classes: int, in_channels: tuple[int, ...], anchors=DEFAULT_ANCHORS, strides=STRIDES):
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = len(anchors[0])
        self.strides = tuple(strides)
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))  # [L, A, 2] pixels
        self.m = nn.ModuleList(nn.Conv2d(c, self.num_anchors * (5 + num_classes), 1) for c in in_channels)
        self._init_biases()

    def _init_biases(self) -> None:
        # Priors from the YOLOv5 paper notes: ~8 objects per 640 image, class prior ~0.6/(C - 0.99).
        for conv, s in zip(self.m, self.strides):
            b = conv.bias.view(self.num_anchors, -1)
            with torch.no_grad():
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (self.num_classes - 0.99)) if self.num_classes > 1 else 0.0

    def forward(self, feats: list[torch.Tensor]):
        raw = []
        for conv, f in zip(self.m, feats):
            b, _, h, w = f.shape
            raw.append(conv(f).view(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        decoded = [decode_yolov5(r, a, s) for r, a, s in zip(raw, self.anchors, self.strides)]
        return torch.cat([d[0] for d in decoded], 1), torch.cat([d[1] for d in decoded], 1)


class YOLOv5(nn.Module):
    def __init__(self, depth: float, width: float, num_classes: int = 80):
        super().__init__()
        if num_classes < 1:
            from edgedeploy.errors import EdgeDeployError

            raise EdgeDeployError(f"num_classes must be >= 1, got {num_classes}")

        def ch(c: int) -> int:
            return make_divisible(c * width, 8, rounding="ceil")

        def n(k: int) -> int:
            return max(round(k * depth), 1)

        self.num_classes = num_classes
        self.strides = STRIDES
        # Backbone (CSP-Darknet53 with SPPF).
        self.stem = ConvBNAct(3, ch(64), 6, 2, 2)
        self.stage2 = nn.Sequential(ConvBNAct(ch(64), ch(128), 3, 2), CSPBlock(ch(128), ch(128), n(3)))
        self.stage3 = nn.Sequential(ConvBNAct(ch(128), ch(256), 3, 2), CSPBlock(ch(256), ch(256), n(6)))
        self.stage4 = nn.Sequential(ConvBNAct(ch(256), ch(512), 3, 2), CSPBlock(ch(512), ch(512), n(9)))
        self.stage5 = nn.Sequential(ConvBNAct(ch(512), ch(1024), 3, 2), CSPBlock(ch(1024), ch(1024), n(3)),
                                    SPPF(ch(1024), ch(1024), 5))
        # PANet neck: top-down then bottom-up.
        self.lat5 = ConvBNAct(ch(1024), ch(512), 1)
        self.td4 = CSPBlock(ch(1024), ch(512), n(3), shortcut=False)
        self.lat4 = ConvBNAct(ch(512), ch(256), 1)
        self.td3 = CSPBlock(ch(512), ch(256), n(3), shortcut=False)  # -> P3 out
        self.down3 = ConvBNAct(ch(256), ch(256), 3, 2)
        self.bu4 = CSPBlock(ch(512), ch(512), n(3), shortcut=False)  # -> P4 out
        self.down4 = ConvBNAct(ch(512), ch(512), 3, 2)
        self.bu5 = CSPBlock(ch(1024), ch(1024), n(3), shortcut=False)  # -> P5 out
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.head = YOLOv5Head(num_classes, (ch(256), ch(512), ch(1024)))

    @property
    def anchors(self) -> torch.Tensor:
        return self.head.anchors

    def forward(self, x: torch.Tensor):
        c3 = self.stage3(self.stage2(self.stem(x)))
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        p5 = self.lat5(c5)
        p4 = self.lat4(self.td4(torch.cat((self.up(p5), c4), 1)))
        out3 = self.td3(torch.cat((self.up(p4), c3), 1))
        out4 = self.bu4(torch.cat((self.down3(out3), p4), 1))
        out5 = self.bu5(torch.cat((self.down4(out4), p5), 1))
        return self.head([out3, out4, out5])


_SOURCE = "https://github.com/ultralytics/yolov5 README (v6.x, COCO val2017, 640)"
_NOTE = ("params: fused (BN folded into conv), compare count_params_bn_folded(); published GFLOPs are 2 x MACs "
         "(thop), published_macs = GFLOPs / 2")

# name: (depth, width, params, GFLOPs@640)
_VARIANTS = {
    # README rounds n to 1.9M (2.6% granularity); Ultralytics' own fused summary prints 1,867,405.
    "n": (0.33, 0.25, 1_867_405, 4.5),
    "s": (0.33, 0.50, 7.2e6, 16.5),
    "m": (0.67, 0.75, 21.2e6, 49.0),
    "l": (1.00, 1.00, 46.5e6, 109.1),
    "x": (1.33, 1.25, 86.7e6, 205.7),
}


def _register(v: str, depth: float, width: float, params: float, gflops: float) -> None:
    @register_model(
        f"yolov5{v}", task="detect", family="yolov5", imgsz=640, aliases=(f"yolov5_{v}",),
        published_params=params, published_macs=gflops / 2 * 1e9, source=_SOURCE, default_num_classes=80,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), letterbox=True,
        extra={"depth": depth, "width": width, "published_gflops": gflops, "params_counted": "bn_folded",
               "note": _NOTE},
    )
    def build(num_classes: int = 80, **kwargs) -> YOLOv5:
        return YOLOv5(depth, width, num_classes=num_classes, **kwargs)

    build.__name__ = f"yolov5{v}"
    globals()[build.__name__] = build


for _v, _cfg in _VARIANTS.items():
    _register(_v, *_cfg)
