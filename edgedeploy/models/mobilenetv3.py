"""MobileNetV3 Large and Small (Howard et al., 2019).

Module names and order follow torchvision's `mobilenet_v3_large/small`, so their state_dicts load with
`strict=True`. `dilated=True` replaces the last stage's stride by dilation (output stride 16), the backbone form
used by LR-ASPP / DeepLabV3 segmentation heads; blocks that downsample carry `_is_cn = True` so a head can find
the stage boundaries the way torchvision's segmentation builders do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

from edgedeploy.models.channels import make_divisible
from edgedeploy.models.initialisation import init_weights
from edgedeploy.models.registry import register_model


@dataclass(frozen=True)
class BlockConfig:
    """One row of Tables 1/2 of the paper: kernel, expansion size, output channels, SE, activation, stride."""

    in_chs: int
    kernel: int
    expanded_chs: int
    out_chs: int
    use_se: bool
    use_hardswish: bool
    stride: int
    dilation: int = 1


class InvertedResidual(nn.Module):
    """Expand -> depthwise -> (squeeze-excite) -> linear projection, with a residual when shapes allow."""

    def __init__(self, cfg: BlockConfig, norm_layer) -> None:
        super().__init__()
        act = nn.Hardswish if cfg.use_hardswish else nn.ReLU
        self.use_res_connect = cfg.stride == 1 and cfg.in_chs == cfg.out_chs
        layers: list[nn.Module] = []
        if cfg.expanded_chs != cfg.in_chs:
            layers.append(
                Conv2dNormActivation(cfg.in_chs, cfg.expanded_chs, 1, norm_layer=norm_layer, activation_layer=act)
            )
        layers.append(
            Conv2dNormActivation(
                cfg.expanded_chs,
                cfg.expanded_chs,
                kernel_size=cfg.kernel,
                stride=1 if cfg.dilation > 1 else cfg.stride,
                dilation=cfg.dilation,
                groups=cfg.expanded_chs,
                norm_layer=norm_layer,
                activation_layer=act,
            )
        )
        if cfg.use_se:
            squeeze = make_divisible(cfg.expanded_chs // 4, 8, rounding="nearest")
            layers.append(SqueezeExcitation(cfg.expanded_chs, squeeze, scale_activation=nn.Hardsigmoid))
        layers.append(
            Conv2dNormActivation(cfg.expanded_chs, cfg.out_chs, 1, norm_layer=norm_layer, activation_layer=None)
        )
        self.block = nn.Sequential(*layers)
        self.out_channels = cfg.out_chs
        self._is_cn = cfg.stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


def mobilenetv3_config(arch: str, width_mult: float = 1.0, dilated: bool = False) -> tuple[list[BlockConfig], int]:
    """Block list and penultimate (classifier hidden) width for "large" or "small"."""
    ch = partial(make_divisible, divisor=8, rounding="nearest")

    def row(in_chs, kernel, exp, out, se, act, stride, dilation=1) -> BlockConfig:
        scale = lambda c: ch(c * width_mult)  # noqa: E731
        return BlockConfig(scale(in_chs), kernel, scale(exp), scale(out), se, act == "HS", stride, dilation)

    d = 2 if dilated else 1
    if arch == "large":
        rows = [
            row(16, 3, 16, 16, False, "RE", 1),
            row(16, 3, 64, 24, False, "RE", 2),  # C1
            row(24, 3, 72, 24, False, "RE", 1),
            row(24, 5, 72, 40, True, "RE", 2),  # C2
            row(40, 5, 120, 40, True, "RE", 1),
            row(40, 5, 120, 40, True, "RE", 1),
            row(40, 3, 240, 80, False, "HS", 2),  # C3
            row(80, 3, 200, 80, False, "HS", 1),
            row(80, 3, 184, 80, False, "HS", 1),
            row(80, 3, 184, 80, False, "HS", 1),
            row(80, 3, 480, 112, True, "HS", 1),
            row(112, 3, 672, 112, True, "HS", 1),
            row(112, 5, 672, 160, True, "HS", 2, d),  # C4
            row(160, 5, 960, 160, True, "HS", 1, d),
            row(160, 5, 960, 160, True, "HS", 1, d),
        ]
        return rows, ch(1280 * width_mult)
    if arch == "small":
        rows = [
            row(16, 3, 16, 16, True, "RE", 2),  # C1
            row(16, 3, 72, 24, False, "RE", 2),  # C2
            row(24, 3, 88, 24, False, "RE", 1),
            row(24, 5, 96, 40, True, "HS", 2),  # C3
            row(40, 5, 240, 40, True, "HS", 1),
            row(40, 5, 240, 40, True, "HS", 1),
            row(40, 5, 120, 48, True, "HS", 1),
            row(48, 5, 144, 48, True, "HS", 1),
            row(48, 5, 288, 96, True, "HS", 2, d),  # C4
            row(96, 5, 576, 96, True, "HS", 1, d),
            row(96, 5, 576, 96, True, "HS", 1, d),
        ]
        return rows, ch(1024 * width_mult)
    raise ValueError(f"unknown MobileNetV3 arch {arch!r}: expected 'large' or 'small'")


class MobileNetV3(nn.Module):
    def __init__(
        self,
        blocks: list[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        # TF-style BatchNorm (eps 1e-3, momentum 0.01), as in the paper's training setup and torchvision.
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [
            Conv2dNormActivation(3, blocks[0].in_chs, 3, stride=2, norm_layer=norm_layer, activation_layer=nn.Hardswish)
        ]
        layers += [InvertedResidual(cfg, norm_layer) for cfg in blocks]
        head_in = blocks[-1].out_chs
        head_out = 6 * head_in
        layers.append(Conv2dNormActivation(head_in, head_out, 1, norm_layer=norm_layer, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(head_out, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        init_weights(self, linear="normal")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def _mobilenetv3(arch: str, num_classes: int, width_mult: float = 1.0, dilated: bool = False, **kwargs) -> MobileNetV3:
    blocks, last_channel = mobilenetv3_config(arch, width_mult=width_mult, dilated=dilated)
    return MobileNetV3(blocks, last_channel, num_classes=num_classes, **kwargs)


_SOURCE = "torchvision model docs (MobileNet_V3_{}_Weights.IMAGENET1K_V1 meta: num_params, GFLOPS=GMACs)"


@register_model(
    "mobilenetv3_large",
    task="classify",
    family="mobilenetv3",
    imgsz=224,
    aliases=("mobilenetv3", "mobilenetv3_large_100"),
    published_params=5_483_032,
    published_macs=0.217e9,
    source=_SOURCE.format("Large"),
    torchvision_name="mobilenet_v3_large",
    extra={"paper_params": 5.4e6, "paper_macs": 219e6},
)
def mobilenetv3_large(num_classes: int = 1000, **kwargs) -> MobileNetV3:
    return _mobilenetv3("large", num_classes, **kwargs)


@register_model(
    "mobilenetv3_small",
    task="classify",
    family="mobilenetv3",
    imgsz=224,
    aliases=("mobilenetv3_small_100",),
    published_params=2_542_856,
    published_macs=0.057e9,
    source=_SOURCE.format("Small"),
    torchvision_name="mobilenet_v3_small",
    extra={"paper_params": 2.5e6, "paper_macs": 56e6},
)
def mobilenetv3_small(num_classes: int = 1000, **kwargs) -> MobileNetV3:
    return _mobilenetv3("small", num_classes, **kwargs)
