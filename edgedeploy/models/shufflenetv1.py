"""ShuffleNetV1 (Zhang et al. 2018): pointwise group convolutions with a channel shuffle between them.

Follows the paper and Megvii's reference implementation (megvii-model/ShuffleNet-Series):
- bottleneck channels are a quarter of the unit's output channels;
- the first pointwise conv of the first unit is not grouped (its input has only 24 channels);
- a stride-2 unit concatenates a 3x3 average-pooled shortcut with the main branch, so the branch produces
  `out - in` channels; stride-1 units add the identity.
Channel shuffle is a reshape/transpose/reshape, which exports to plain ONNX Reshape/Transpose.

Shuffle placement (`shuffle=`): ours (`"before_dw"`, the paper's Fig. 2) shuffles between the first pointwise
conv and the depthwise conv with `reshape(g, c // g)`. Megvii's released code (`"after_dw_inverse"`) shuffles
after the depthwise conv with `reshape(c // g, g)`, the inverse permutation. Both give the same parameter and
MAC counts, but for g8 no weight permutation turns one into the other, so official Megvii checkpoints are run
with `shuffle="after_dw_inverse"` (and `classifier_bias=False`: their classifier has no bias).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgedeploy.models.initialisation import init_weights
from edgedeploy.models.registry import register_model

STAGE_REPEATS = (4, 8, 4)

# (stem channels, stage2, stage3, stage4 output channels) per (groups, width); Megvii's reference values.
STAGE_CHANNELS: dict[tuple[int, str], tuple[int, int, int, int]] = {
    (3, "0.5"): (12, 120, 240, 480),
    (3, "1.0"): (24, 240, 480, 960),
    (3, "1.5"): (24, 360, 720, 1440),
    (3, "2.0"): (48, 480, 960, 1920),
    (8, "0.5"): (16, 192, 384, 768),
    (8, "1.0"): (24, 384, 768, 1536),
    (8, "1.5"): (24, 576, 1152, 2304),
    (8, "2.0"): (48, 768, 1536, 3072),
}


SHUFFLE_MODES = ("before_dw", "after_dw_inverse")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def channel_shuffle_inverse(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `channel_shuffle` (Megvii's `reshape(c // g, g)` then swap)."""
    n, c, h, w = x.shape
    return x.reshape(n, c // groups, groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int, groups: int, stride: int, group_first_conv: bool = True,
        shuffle: str = "before_dw",
    ):  # fmt: skip
        super().__init__()
        self.stride = stride
        self.groups = groups
        self.shuffle = shuffle
        mid = out_ch // 4
        branch_out = out_ch - in_ch if stride == 2 else out_ch
        self.reduce = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, groups=groups if group_first_conv else 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
        )
        self.expand = nn.Sequential(
            nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False), nn.BatchNorm2d(branch_out)
        )
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shuffle == "before_dw":
            y = self.depthwise(channel_shuffle(self.reduce(x), self.groups))
        else:
            y = channel_shuffle_inverse(self.depthwise(self.reduce(x)), self.groups)
        y = self.expand(y)
        if self.stride == 2:
            return torch.cat((self.shortcut(x), F.relu(y)), dim=1)
        return F.relu(x + y)


class ShuffleNetV1(nn.Module):
    def __init__(
        self, groups: int = 3, width: str = "1.0", num_classes: int = 1000, shuffle: str = "before_dw",
        classifier_bias: bool = True,
    ):  # fmt: skip
        super().__init__()
        if shuffle not in SHUFFLE_MODES:
            raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
        stem, *stages = STAGE_CHANNELS[(groups, width)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        units: list[nn.Module] = []
        ch = stem
        for stage_idx, (repeats, out) in enumerate(zip(STAGE_REPEATS, stages, strict=True)):
            for i in range(repeats):
                first = i == 0
                units.append(
                    ShuffleUnit(
                        ch, out, groups, stride=2 if first else 1, group_first_conv=not (first and stage_idx == 0),
                        shuffle=shuffle,
                    )  # fmt: skip
                )
                ch = out
        self.features = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = ch
        self.classifier = nn.Linear(ch, num_classes, bias=classifier_bias)
        init_weights(self, linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.stem(x))).flatten(1)
        return self.classifier(x)


# FLOPs in the paper (arXiv:1707.01083, Table 2) and Megvii's README are multiply-adds. The README gives
# parameters only to 0.1M, so the check allows half of that rounding step (`params_precision`).
_SOURCE = "megvii-model/ShuffleNet-Series ShuffleNetV1/README.md (FLOPs = MACs, as in arXiv:1707.01083 Table 2)"


def _register(groups: int, width: str, params: float, macs: float, aliases: tuple[str, ...] = ()) -> None:
    name = f"shufflenetv1_g{groups}_x{width.replace('.', '_')}"

    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        return ShuffleNetV1(groups=groups, width=width, num_classes=num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = f"ShuffleNetV1 {width}x, {groups} groups, at 224x224."
    register_model(
        name, task="classify", family="shufflenetv1", imgsz=224, aliases=aliases,
        published_params=params, published_macs=macs, source=_SOURCE, extra={"params_precision": 0.1e6},
    )(build)  # fmt: skip


_register(3, "0.5", 0.7e6, 38e6)
_register(3, "1.0", 1.9e6, 138e6, aliases=("shufflenetv1",))
_register(3, "1.5", 3.4e6, 292e6)
_register(3, "2.0", 5.4e6, 524e6)
_register(8, "0.5", 1.0e6, 40e6)
_register(8, "1.0", 2.4e6, 138e6)
_register(8, "1.5", 4.3e6, 290e6)
_register(8, "2.0", 6.5e6, 522e6)
