"""LR-ASPP semantic segmentation ("Searching for MobileNetV3", Howard et al. 2019) on a dilated MobileNetV3.

State-dict compatible with torchvision's `lraspp_mobilenet_v3_large` (same key names and shapes, so its
COCO-VOC weights load strictly and give the same outputs). Two differences that matter for deployment:

* the attention branch pools with `x.mean((2, 3), keepdim=True)` instead of `nn.AdaptiveAvgPool2d(1)`: the same
  numbers, but it exports as a ReduceMean over H, W, which ONNX and TensorRT accept at any input size (an
  adaptive pool with a computed kernel fails to export when the output size does not divide the input size);
* `forward` returns a tensor, not torchvision's `{"out": ...}` dict, so an exporter sees one named output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgedeploy.models.registry import register_model

# Where the two taps sit in `mobilenet_v3_*.features` (torchvision picks them the same way: C2 at output
# stride 8 for the low branch, the final 1x1 conv at output stride 16 -- the last stage is dilated -- for the high).
_TAPS = {"large": (4, 16), "small": (2, 12)}


class GlobalMeanPool(nn.Module):
    """`AdaptiveAvgPool2d(1)` written as a mean over H, W: exports as ReduceMean, valid at any input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class LRASPPHead(nn.Module):
    """High branch: 1x1 conv-BN-ReLU gated by a global-pooling sigmoid attention; low branch: 1x1 conv on the
    stride-8 features. Attribute names match torchvision's `LRASPPHead` so state dicts are interchangeable."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            GlobalMeanPool(),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(nn.Module):
    """`backbone` is a MobileNetV3 `features` Sequential cut after the high tap; `low_index`/`high_index` name
    the layers whose outputs feed the head.

    `upsample=True` (default, as torchvision) returns logits at the input resolution; `upsample=False` returns
    them at 1/8 -- cheaper to export and to copy off the GPU when the caller resizes (or argmaxes) itself.
    """

    def __init__(
        self,
        backbone: nn.Sequential,
        low_index: int,
        high_index: int,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        inter_channels: int = 128,
        upsample: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= low_index < high_index == len(backbone) - 1:
            raise ValueError(f"taps must satisfy 0 <= low < high == last backbone layer, got {low_index}, {high_index}")
        self.backbone = backbone
        self.low_index = low_index
        self.classifier = LRASPPHead(low_channels, high_channels, num_classes, inter_channels)
        self.num_classes = num_classes
        self.upsample = upsample

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = x
        for i, layer in enumerate(self.backbone):
            x = layer(x)
            if i == self.low_index:
                low = x
        return low, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.features(x)
        out = self.classifier(low, high)
        if self.upsample:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _dilated_features(arch: str) -> nn.Sequential:
    """MobileNetV3 `features` with the last stage dilated (output stride 16 instead of 32), torchvision's layout."""
    from edgedeploy.models.mobilenetv3 import mobilenetv3_large, mobilenetv3_small

    builder = {"large": mobilenetv3_large, "small": mobilenetv3_small}[arch]
    return builder(dilated=True).features


def build_lraspp(arch: str, num_classes: int = 21, inter_channels: int = 128, upsample: bool = True) -> LRASPP:
    if arch not in _TAPS:
        raise ValueError(f"unknown LR-ASPP backbone {arch!r}; choose from {sorted(_TAPS)}")
    features = _dilated_features(arch)
    low, high = _TAPS[arch]
    backbone = nn.Sequential(*list(features)[: high + 1])
    return LRASPP(
        backbone,
        low_index=low,
        high_index=high,
        low_channels=features[low].out_channels,
        high_channels=features[high].out_channels,
        num_classes=num_classes,
        inter_channels=inter_channels,
        upsample=upsample,
    )


_SOURCE = (
    "torchvision LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1 meta: num_params 3,221,538, "
    "_ops 2.086 GFLOPS at 520x520 (counted as MACs)"
)


@register_model(
    "lraspp_mobilenetv3_large",
    task="segment",
    family="lraspp",
    imgsz=520,
    aliases=("lraspp_mobilenetv3", "lraspp"),
    default_num_classes=21,
    published_params=3_221_538,
    published_macs=2.086e9,
    source=_SOURCE,
    torchvision_name="lraspp_mobilenet_v3_large",
)
def lraspp_mobilenetv3_large(num_classes: int = 21, **kwargs) -> LRASPP:
    return build_lraspp("large", num_classes=num_classes, **kwargs)


@register_model(
    "lraspp_mobilenetv3_small",
    task="segment",
    family="lraspp",
    imgsz=520,
    default_num_classes=21,
    source="no published figure (torchvision ships LR-ASPP for the Large backbone only); same head on the "
    "dilated MobileNetV3-Small features",
)
def lraspp_mobilenetv3_small(num_classes: int = 21, **kwargs) -> LRASPP:
    return build_lraspp("small", num_classes=num_classes, **kwargs)
