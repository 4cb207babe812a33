"""ShuffleNetV2 (Ma et al., 2018) at 0.5x / 1.0x / 1.5x / 2.0x width.

Module names and order follow torchvision's `shufflenet_v2_x*`, so their state_dicts load with `strict=True`:
`conv1`, `maxpool`, `stage2..4` (each a Sequential of units), `conv5`, `fc`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgedeploy.models.registry import register_model

_STAGE_REPEATS = (4, 8, 4)
# Output channels of conv1, stage2, stage3, stage4, conv5 for each width (Table 5 of the paper).
_STAGE_CHANNELS = {
    "x0_5": (24, 48, 96, 192, 1024),
    "x1_0": (24, 116, 232, 464, 1024),
    "x1_5": (24, 176, 352, 704, 1024),
    "x2_0": (24, 244, 488, 976, 2048),
}


def channel_shuffle_order(channels: int, groups: int) -> list[int]:
    """Input channel feeding each output channel of a channel shuffle (torchvision's view-transpose-view).

    Output channel `i * groups + g` takes input channel `g * (channels // groups) + i`, interleaving the groups so
    information flows between the two branches of the next unit. Applied as one indexing op with a constant
    permutation, it exports to a single ONNX Gather instead of a Shape/Slice/Reshape/Transpose chain.
    """
    per_group = channels // groups
    return [g * per_group + i for i in range(per_group) for g in range(groups)]


def _depthwise(chs: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(chs, chs, 3, stride, 1, bias=False, groups=chs)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits channels in half and transforms one half; stride 2 transforms both copies."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleNetV2 unit stride must be 1 or 2, got {stride}")
        branch_chs = out_chs // 2
        if stride == 1 and in_chs != 2 * branch_chs:
            raise ValueError(f"a stride-1 unit needs in_chs == out_chs (even), got {in_chs} -> {out_chs}")
        self.stride = stride
        self.branch_chs = branch_chs
        self.shuffle = channel_shuffle_order(2 * branch_chs, 2)
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(in_chs, stride),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, branch_chs, 1, bias=False),
                nn.BatchNorm2d(branch_chs),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()  # identity half; kept (empty) so module indices match torchvision
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_chs if stride > 1 else branch_chs, branch_chs, 1, bias=False),
            nn.BatchNorm2d(branch_chs),
            nn.ReLU(inplace=True),
            _depthwise(branch_chs, stride),
            nn.BatchNorm2d(branch_chs),
            nn.Conv2d(branch_chs, branch_chs, 1, bias=False),
            nn.BatchNorm2d(branch_chs),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            # Static split sizes (not chunk) keep the exported Split free of shape arithmetic.
            kept, transformed = x.split([self.branch_chs, self.branch_chs], dim=1)
            out = torch.cat((kept, self.branch2(transformed)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return out[:, self.shuffle]


class ShuffleNetV2(nn.Module):
    def __init__(self, stage_channels: tuple[int, ...], num_classes: int = 1000) -> None:
        super().__init__()
        stem_chs = stage_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_chs, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_chs), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chs = stem_chs
        stages = []
        for repeats, out_chs in zip(_STAGE_REPEATS, stage_channels[1:4]):
            units = [InvertedResidual(in_chs, out_chs, 2)]
            units += [InvertedResidual(out_chs, out_chs, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_chs = out_chs
        self.stage2, self.stage3, self.stage4 = stages
        head_chs = stage_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(in_chs, head_chs, 1, bias=False), nn.BatchNorm2d(head_chs), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(head_chs, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


_SOURCE = "torchvision model docs (ShuffleNet_V2_{}_Weights.IMAGENET1K_V1 meta: num_params, GFLOPS=GMACs)"


def _register(width: str, params: int, macs: float, paper: tuple[float, float], aliases: tuple[str, ...] = ()):
    def decorate(fn):
        return register_model(
            f"shufflenetv2_{width}",
            task="classify",
            family="shufflenetv2",
            imgsz=224,
            aliases=aliases,
            published_params=params,
            published_macs=macs,
            source=_SOURCE.format(width.upper()),
            torchvision_name=f"shufflenet_v2_{width}",
            extra={"paper_params": paper[0], "paper_macs": paper[1]},
        )(fn)

    return decorate


@_register("x0_5", 1_366_792, 0.04e9, (1.4e6, 41e6))
def shufflenetv2_x0_5(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(_STAGE_CHANNELS["x0_5"], num_classes)


@_register("x1_0", 2_278_604, 0.145e9, (2.3e6, 146e6), aliases=("shufflenetv2",))
def shufflenetv2_x1_0(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(_STAGE_CHANNELS["x1_0"], num_classes)


@_register("x1_5", 3_503_624, 0.296e9, (3.5e6, 299e6))
def shufflenetv2_x1_5(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(_STAGE_CHANNELS["x1_5"], num_classes)


@_register("x2_0", 7_393_996, 0.583e9, (7.4e6, 591e6))
def shufflenetv2_x2_0(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(_STAGE_CHANNELS["x2_0"], num_classes)
