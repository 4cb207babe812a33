"""YOLOX (Megvii): Nano / Tiny / S / M / L / X.

CSPDarknet backbone (Focus stem, CSP layers, SPP 5/9/13), PAFPN neck, decoupled head (separate cls and reg/obj
branches), anchor-free, one prediction per cell, strides 8/16/32. Nano uses depthwise-separable convs.

Interface (shared by every detector, see `detect_common`):

* train mode: ``model(x)`` -> list of 3 raw tensors ``[B, 5 + C, H_l, W_l]``: channels 0:4 box regression
  (dx, dy, log w, log h in stride units, no activation), 4 objectness logit, 5: class logits.
  `edgedeploy.train.detect_losses.YOLOXLoss` consumes it.
* eval mode: ``model(x)`` -> ``(boxes [B, N, 4] xyxy input pixels, scores [B, N, C])``,
  scores = sigmoid(obj) * sigmoid(cls); centre = (dx + cell) * stride, size = exp(log wh) * stride.
* ``model.strides`` = (8, 16, 32); ``model.num_classes``.

Published figures (YOLOX README, COCO 80 classes): params and GFLOPs come from `thop.profile` on the unfused
model (`yolox/utils/model_utils.get_model_info`: GFLOPs = 2 x thop MACs), so params are compared as counted
(BatchNorm included) and `published_macs` = GFLOPs / 2. thop also counts two ops per BatchNorm output element:
`complexity.count_macs_thop_convention` reproduces that (conv-only MACs are 3.2% under the table for Nano).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from edgedeploy.models.detect_common import SPP, ConvBNAct, CSPBlock, Focus, conv_block, decode_yolox
from edgedeploy.models.registry import register_model

STRIDES = (8, 16, 32)
PRIOR_PROB = 0.01  # initial obj/cls probability (YOLOX head init)


class CSPDarknet(nn.Module):
    def __init__(self, depth: float, width: float, depthwise: bool = False):
        super().__init__()
        c = int(width * 64)
        n = max(round(depth * 3), 1)
        self.stem = Focus(3, c, 3)
        self.dark2 = nn.Sequential(conv_block(c, c * 2, 3, 2, depthwise), CSPBlock(c * 2, c * 2, n, depthwise=depthwise))
        self.dark3 = nn.Sequential(conv_block(c * 2, c * 4, 3, 2, depthwise),
                                   CSPBlock(c * 4, c * 4, n * 3, depthwise=depthwise))
        self.dark4 = nn.Sequential(conv_block(c * 4, c * 8, 3, 2, depthwise),
                                   CSPBlock(c * 8, c * 8, n * 3, depthwise=depthwise))
        self.dark5 = nn.Sequential(conv_block(c * 8, c * 16, 3, 2, depthwise), SPP(c * 16, c * 16),
                                   CSPBlock(c * 16, c * 16, n, shortcut=False, depthwise=depthwise))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


class PAFPN(nn.Module):
    def __init__(self, depth: float, width: float, depthwise: bool = False):
        super().__init__()
        c3, c4, c5 = int(256 * width), int(512 * width), int(1024 * width)
        n = round(3 * depth)
        self.lateral_conv0 = ConvBNAct(c5, c4, 1)
        self.C3_p4 = CSPBlock(2 * c4, c4, n, shortcut=False, depthwise=depthwise)
        self.reduce_conv1 = ConvBNAct(c4, c3, 1)
        self.C3_p3 = CSPBlock(2 * c3, c3, n, shortcut=False, depthwise=depthwise)
        self.bu_conv2 = conv_block(c3, c3, 3, 2, depthwise)
        self.C3_n3 = CSPBlock(2 * c3, c4, n, shortcut=False, depthwise=depthwise)
        self.bu_conv1 = conv_block(c4, c4, 3, 2, depthwise)
        self.C3_n4 = CSPBlock(2 * c4, c5, n, shortcut=False, depthwise=depthwise)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")

    def forward(self, feats):
        x2, x1, x0 = feats
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.C3_p4(torch.cat((self.up(fpn_out0), x1), 1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(torch.cat((self.up(fpn_out1), x2), 1))
        pan_out1 = self.C3_n3(torch.cat((self.bu_conv2(pan_out2), fpn_out1), 1))
        pan_out0 = self.C3_n4(torch.cat((self.bu_conv1(pan_out1), fpn_out0), 1))
        return pan_out2, pan_out1, pan_out0


class YOLOXHead(nn.Module):
    """Decoupled head: per level a 1x1 stem, then two 3x3 convs for classes and two for box + objectness."""

    def __init__(self, num_classes: int, width: float, depthwise: bool = False, strides=STRIDES):
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        hidden = int(256 * width)
        in_ch = [int(c * width) for c in (256, 512, 1024)]
        self.stems = nn.ModuleList(ConvBNAct(c, hidden, 1) for c in in_ch)
        self.cls_convs = nn.ModuleList(
            nn.Sequential(conv_block(hidden, hidden, 3, 1, depthwise), conv_block(hidden, hidden, 3, 1, depthwise))
            for _ in in_ch)
        self.reg_convs = nn.ModuleList(
            nn.Sequential(conv_block(hidden, hidden, 3, 1, depthwise), conv_block(hidden, hidden, 3, 1, depthwise))
            for _ in in_ch)
        self.cls_preds = nn.ModuleList(nn.Conv2d(hidden, num_classes, 1) for _ in in_ch)
        self.reg_preds = nn.ModuleList(nn.Conv2d(hidden, 4, 1) for _ in in_ch)
        self.obj_preds = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in in_ch)
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for conv in list(self.cls_preds) + list(self.obj_preds):
            nn.init.constant_(conv.bias, bias)

    def forward(self, feats):
        raw = []
        for i, f in enumerate(feats):
            x = self.stems[i](f)
            cls = self.cls_preds[i](self.cls_convs[i](x))
            r = self.reg_convs[i](x)
            raw.append(torch.cat((self.reg_preds[i](r), self.obj_preds[i](r), cls), 1))
        if self.training:
            return raw
        decoded = [decode_yolox(r, s) for r, s in zip(raw, self.strides)]
        return torch.cat([d[0] for d in decoded], 1), torch.cat([d[1] for d in decoded], 1)


class YOLOX(nn.Module):
    def __init__(self, depth: float, width: float, num_classes: int = 80, depthwise: bool = False):
        super().__init__()
        if num_classes < 1:
            from edgedeploy.errors import EdgeDeployError

            raise EdgeDeployError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.strides = STRIDES
        self.backbone = CSPDarknet(depth, width, depthwise)
        self.neck = PAFPN(depth, width, depthwise)
        self.head = YOLOXHead(num_classes, width, depthwise)

    def forward(self, x: torch.Tensor):
        return self.head(self.neck(self.backbone(x)))


_SOURCE = "https://github.com/Megvii-BaseDetection/YOLOX README (COCO val2017)"
_NOTE = "params as thop counts them (BN included, unfused); published GFLOPs are 2 x MACs, published_macs = GFLOPs / 2"

# name: (depth, width, depthwise, imgsz, params, GFLOPs at imgsz)
_VARIANTS = {
    "nano": (0.33, 0.25, True, 416, 0.91e6, 1.08),
    "tiny": (0.33, 0.375, False, 416, 5.06e6, 6.45),
    "s": (0.33, 0.50, False, 640, 9.0e6, 26.8),
    "m": (0.67, 0.75, False, 640, 25.3e6, 73.8),
    "l": (1.00, 1.00, False, 640, 54.2e6, 155.6),
    "x": (1.33, 1.25, False, 640, 99.1e6, 281.9),
}


def _register(v: str, depth: float, width: float, depthwise: bool, imgsz: int, params: float, gflops: float) -> None:
    @register_model(
        f"yolox_{v}", task="detect", family="yolox", imgsz=imgsz, aliases=(f"yolox{v}",),
        published_params=params, published_macs=gflops / 2 * 1e9, source=_SOURCE, default_num_classes=80,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), letterbox=True,
        extra={"depth": depth, "width": width, "depthwise": depthwise, "published_gflops": gflops,
               "params_counted": "unfused", "macs_counted": "conv + batchnorm elements (thop)", "note": _NOTE},
    )
    def build(num_classes: int = 80, **kwargs) -> YOLOX:
        return YOLOX(depth, width, num_classes=num_classes, depthwise=depthwise, **kwargs)

    build.__name__ = f"yolox_{v}"
    globals()[build.__name__] = build


for _v, _cfg in _VARIANTS.items():
    _register(_v, *_cfg)
