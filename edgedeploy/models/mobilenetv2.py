"""MobileNetV2 (Sandler et al., 2018) with a width multiplier.

Module names and order follow torchvision's `mobilenet_v2`, so its state_dicts (and checkpoints trained with
torchvision's reference scripts) load with `strict=True`: `features.{i}` holds the stem, the inverted-residual
blocks and the 1x1 head conv; `classifier` is Dropout + Linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.ops import Conv2dNormActivation

from edgedeploy.models.channels import make_divisible
from edgedeploy.models.initialisation import init_weights
from edgedeploy.models.registry import register_model

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat) -- Table 2 of the paper.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, with a residual when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(in_chs, hidden, kernel_size=1, activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, out_chs, 1, bias=False),  # linear bottleneck: no activation after the projection
            nn.BatchNorm2d(out_chs),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_chs = make_divisible(32 * width_mult, rounding="nearest")
        # The head keeps 1280 channels for narrow models (only widened above 1.0), as in the paper.
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), rounding="nearest")
        layers: list[nn.Module] = [Conv2dNormActivation(3, in_chs, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            out_chs = make_divisible(c * width_mult, rounding="nearest")
            for i in range(n):
                layers.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t))
                in_chs = out_chs
        layers.append(Conv2dNormActivation(in_chs, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self, linear="normal")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


_TV_SOURCE = "torchvision model docs (MobileNet_V2_Weights.IMAGENET1K_V1 meta: num_params, GFLOPS=GMACs)"
# torchvision publishes only width 1.0. The other widths' MACs come from the MobileNetV2 authors' TF-slim table;
# its parameter counts use another convention (BatchNorm without a scale, 1001 classes) and are ~1% lower than
# the same architecture counted in PyTorch, so they are kept in `extra` for reference, not checked against.
_TF_SLIM_SOURCE = "TF-slim MobileNetV2 README (tensorflow/models research/slim/nets/mobilenet), MACs at 224"


def _width_info(width_mult: float, tf_slim_params: float) -> dict:
    # No torchvision *name* has this layout, but torchvision's builder does with width_mult (used by the tests).
    return {
        "width_mult": width_mult,
        "tf_slim_params": tf_slim_params,
        "torchvision_builder": ("mobilenet_v2", {"width_mult": width_mult}),
    }


@register_model(
    "mobilenetv2_100",
    task="classify",
    family="mobilenetv2",
    imgsz=224,
    aliases=("mobilenetv2",),
    published_params=3_504_872,
    published_macs=0.301e9,
    source=_TV_SOURCE,
    torchvision_name="mobilenet_v2",
    extra={"width_mult": 1.0, "paper_params": 3.4e6, "paper_macs": 300e6, "tf_slim_params": 3.47e6},
)
def mobilenetv2_100(num_classes: int = 1000, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=1.0, **kwargs)


@register_model(
    "mobilenetv2_050",
    task="classify",
    family="mobilenetv2",
    imgsz=224,
    published_macs=97e6,
    source=_TF_SLIM_SOURCE,
    extra=_width_info(0.5, 1.95e6),
)
def mobilenetv2_050(num_classes: int = 1000, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=0.5, **kwargs)


@register_model(
    "mobilenetv2_075",
    task="classify",
    family="mobilenetv2",
    imgsz=224,
    published_macs=209e6,
    source=_TF_SLIM_SOURCE,
    extra=_width_info(0.75, 2.61e6),
)
def mobilenetv2_075(num_classes: int = 1000, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=0.75, **kwargs)


@register_model(
    "mobilenetv2_140",
    task="classify",
    family="mobilenetv2",
    imgsz=224,
    published_macs=582e6,
    source=_TF_SLIM_SOURCE,
    extra=_width_info(1.4, 6.06e6),
)
def mobilenetv2_140(num_classes: int = 1000, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=1.4, **kwargs)
