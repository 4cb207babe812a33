"""MobileNetV1 (Howard et al. 2017, "MobileNets"): a 3x3 stem then 13 depthwise-separable blocks.

The width multiplier scales every layer's channels. Published MACs are the paper's Table 6 at 224x224; the
paper rounds parameters to 0.1M, so parameters come from the TF-slim model zoo table, which gives two decimals
(its 1001-class head adds ~1k parameters, well inside the 1% check).

`act="relu6"` gives timm's `mobilenetv1_*` (same layers and shapes, ReLU6 instead of the paper's ReLU); official
timm checkpoints select it automatically (`edgedeploy/models/official/timm.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.ops import Conv2dNormActivation

from edgedeploy.models.initialisation import init_weights
from edgedeploy.models.registry import register_model

# (output channels, stride) of each depthwise-separable block at width 1.0 (paper Table 1).
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)  # fmt: skip


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv + BN + act, then 1x1 pointwise conv + BN + act (act: ReLU, or ReLU6 for timm)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: type[nn.Module] = nn.ReLU):
        super().__init__(
            Conv2dNormActivation(in_ch, in_ch, 3, stride=stride, groups=in_ch, activation_layer=act),
            Conv2dNormActivation(in_ch, out_ch, 1, activation_layer=act),
        )


class MobileNetV1(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, dropout: float = 0.0, act: str = "relu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        act_layer = ACTIVATIONS[act]
        ch = int(32 * width)
        layers: list[nn.Module] = [Conv2dNormActivation(3, ch, 3, stride=2, activation_layer=act_layer)]
        for out, stride in _BLOCKS:
            out = int(out * width)
            layers.append(DepthwiseSeparable(ch, out, stride, act_layer))
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = ch
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch, num_classes))
        init_weights(self, linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


_SOURCE = (
    "MACs: Howard et al. 2017 (arXiv:1704.04861) Table 6; params: tensorflow/models research/slim/nets/mobilenet_v1.md"
)


def _register(width: float, params: float, macs: float, aliases: tuple[str, ...] = ()) -> None:
    name = f"mobilenetv1_{round(width * 100):03d}"

    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        return MobileNetV1(width=width, num_classes=num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = f"MobileNetV1 width {width} at 224x224."
    register_model(
        name, task="classify", family="mobilenetv1", imgsz=224, aliases=aliases,
        published_params=params, published_macs=macs, source=_SOURCE,
    )(build)  # fmt: skip


_register(1.0, 4.24e6, 569e6, aliases=("mobilenetv1",))
_register(0.75, 2.59e6, 325e6)
_register(0.5, 1.34e6, 149e6)
_register(0.25, 0.47e6, 41e6)
