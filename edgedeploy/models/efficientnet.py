"""EfficientNet B0-B7 (Tan & Le, 2019) and EfficientNetV2 S/M/L (Tan & Le, 2021) from one builder.

A network is a list of stage configs (MBConv or FusedMBConv rows of Table 1 / Table 4 of the papers); B1-B7
scale B0's widths and depths by compound coefficients. Module names and order follow torchvision's
`efficientnet_b*` / `efficientnet_v2_*`, so their state_dicts load with `strict=True`:
`features.0` stem, `features.1..N` stages (each a Sequential of blocks), `features.N+1` 1x1 head conv,
`classifier` Dropout + Linear.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation, StochasticDepth

from edgedeploy.models.channels import make_divisible
from edgedeploy.models.initialisation import init_weights
from edgedeploy.models.registry import register_model


@dataclass
class StageConfig:
    """One stage: `num_layers` blocks, the first with `stride` and `in_chs`, the rest stride 1 and `out_chs`."""

    expand_ratio: float
    kernel: int
    stride: int
    in_chs: int
    out_chs: int
    num_layers: int
    fused: bool = False  # FusedMBConv (V2's early stages): one full conv instead of 1x1 expand + depthwise

    @property
    def block(self) -> Callable[..., nn.Module]:
        return FusedMBConv if self.fused else MBConv


def mbconv(expand_ratio, kernel, stride, in_chs, out_chs, num_layers, width_mult=1.0, depth_mult=1.0) -> StageConfig:
    """An MBConv stage scaled by the compound coefficients (channels to multiples of 8, depth rounded up)."""
    return StageConfig(
        expand_ratio,
        kernel,
        stride,
        make_divisible(in_chs * width_mult, 8, rounding="nearest"),
        make_divisible(out_chs * width_mult, 8, rounding="nearest"),
        int(math.ceil(num_layers * depth_mult)),
    )


def fused_mbconv(expand_ratio, kernel, stride, in_chs, out_chs, num_layers) -> StageConfig:
    return StageConfig(expand_ratio, kernel, stride, in_chs, out_chs, num_layers, fused=True)


class MBConv(nn.Module):
    """1x1 expand -> depthwise -> squeeze-excite -> 1x1 projection; residual with stochastic depth."""

    def __init__(self, cfg: StageConfig, stochastic_depth_prob: float, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.use_res_connect = cfg.stride == 1 and cfg.in_chs == cfg.out_chs
        hidden = make_divisible(cfg.in_chs * cfg.expand_ratio, 8, rounding="nearest")
        layers: list[nn.Module] = []
        if hidden != cfg.in_chs:
            layers.append(Conv2dNormActivation(cfg.in_chs, hidden, 1, norm_layer=norm_layer, activation_layer=nn.SiLU))
        layers.append(
            Conv2dNormActivation(
                hidden, hidden, cfg.kernel, cfg.stride, groups=hidden, norm_layer=norm_layer, activation_layer=nn.SiLU
            )
        )
        # The squeeze width is a quarter of the block's *input* channels (not of the expanded ones).
        squeeze = max(1, cfg.in_chs // 4)
        layers.append(SqueezeExcitation(hidden, squeeze, activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(hidden, cfg.out_chs, 1, norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cfg.out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class FusedMBConv(nn.Module):
    """Full kxk expand conv -> 1x1 projection (or a single kxk conv when not expanding); no squeeze-excite."""

    def __init__(self, cfg: StageConfig, stochastic_depth_prob: float, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.use_res_connect = cfg.stride == 1 and cfg.in_chs == cfg.out_chs
        hidden = make_divisible(cfg.in_chs * cfg.expand_ratio, 8, rounding="nearest")
        conv = partial(Conv2dNormActivation, norm_layer=norm_layer)
        if hidden != cfg.in_chs:
            layers = [
                conv(cfg.in_chs, hidden, cfg.kernel, cfg.stride, activation_layer=nn.SiLU),
                conv(hidden, cfg.out_chs, 1, activation_layer=None),
            ]
        else:
            layers = [conv(cfg.in_chs, cfg.out_chs, cfg.kernel, cfg.stride, activation_layer=nn.SiLU)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cfg.out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class EfficientNet(nn.Module):
    def __init__(
        self,
        stages: list[StageConfig],
        dropout: float,
        num_classes: int = 1000,
        stochastic_depth_prob: float = 0.2,
        norm_layer: Callable[..., nn.Module] | None = None,
        last_channel: int | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        layers: list[nn.Module] = [
            Conv2dNormActivation(3, stages[0].in_chs, 3, stride=2, norm_layer=norm_layer, activation_layer=nn.SiLU)
        ]
        # Stochastic depth grows linearly with the block index over the whole network (0 at the first block).
        total_blocks = sum(s.num_layers for s in stages)
        block_id = 0
        for stage_cfg in stages:
            blocks: list[nn.Module] = []
            for i in range(stage_cfg.num_layers):
                cfg = copy.copy(stage_cfg)
                if i > 0:
                    cfg.in_chs, cfg.stride = cfg.out_chs, 1
                blocks.append(cfg.block(cfg, stochastic_depth_prob * block_id / total_blocks, norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        head_in = stages[-1].out_chs
        head_out = last_channel if last_channel is not None else 4 * head_in
        layers.append(Conv2dNormActivation(head_in, head_out, 1, norm_layer=norm_layer, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(head_out, num_classes))
        init_weights(self, linear="uniform")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_v1_stages(width_mult: float, depth_mult: float) -> list[StageConfig]:
    """B0's stages (Table 1 of the EfficientNet paper) scaled by the compound coefficients."""
    row = partial(mbconv, width_mult=width_mult, depth_mult=depth_mult)
    return [
        row(1, 3, 1, 32, 16, 1),
        row(6, 3, 2, 16, 24, 2),
        row(6, 5, 2, 24, 40, 2),
        row(6, 3, 2, 40, 80, 3),
        row(6, 5, 1, 80, 112, 3),
        row(6, 5, 2, 112, 192, 4),
        row(6, 3, 1, 192, 320, 1),
    ]


def efficientnet_v2_stages(size: str) -> list[StageConfig]:
    """EfficientNetV2 stages (Table 4 of the V2 paper for S; M/L as in the official and torchvision configs)."""
    if size == "s":
        return [
            fused_mbconv(1, 3, 1, 24, 24, 2),
            fused_mbconv(4, 3, 2, 24, 48, 4),
            fused_mbconv(4, 3, 2, 48, 64, 4),
            mbconv(4, 3, 2, 64, 128, 6),
            mbconv(6, 3, 1, 128, 160, 9),
            mbconv(6, 3, 2, 160, 256, 15),
        ]
    if size == "m":
        return [
            fused_mbconv(1, 3, 1, 24, 24, 3),
            fused_mbconv(4, 3, 2, 24, 48, 5),
            fused_mbconv(4, 3, 2, 48, 80, 5),
            mbconv(4, 3, 2, 80, 160, 7),
            mbconv(6, 3, 1, 160, 176, 14),
            mbconv(6, 3, 2, 176, 304, 18),
            mbconv(6, 3, 1, 304, 512, 5),
        ]
    if size == "l":
        return [
            fused_mbconv(1, 3, 1, 32, 32, 4),
            fused_mbconv(4, 3, 2, 32, 64, 7),
            fused_mbconv(4, 3, 2, 64, 96, 7),
            mbconv(4, 3, 2, 96, 192, 10),
            mbconv(6, 3, 1, 192, 224, 19),
            mbconv(6, 3, 2, 224, 384, 25),
            mbconv(6, 3, 1, 384, 640, 7),
        ]
    raise ValueError(f"unknown EfficientNetV2 size {size!r}: expected 's', 'm' or 'l'")


# TF-style BatchNorm for the variants torchvision ported from TF checkpoints (B5-B7) or trained that way (V2).
_BN_TF = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
_BN_V2 = partial(nn.BatchNorm2d, eps=1e-3)

# name: (width_mult, depth_mult, dropout, imgsz, norm_layer, params, GMACs) -- torchvision's published figures.
_V1_VARIANTS = {
    "b0": (1.0, 1.0, 0.2, 224, None, 5_288_548, 0.386),
    "b1": (1.0, 1.1, 0.2, 240, None, 7_794_184, 0.687),
    "b2": (1.1, 1.2, 0.3, 288, None, 9_109_994, 1.088),
    "b3": (1.2, 1.4, 0.3, 300, None, 12_233_232, 1.827),
    "b4": (1.4, 1.8, 0.4, 380, None, 19_341_616, 4.394),
    "b5": (1.6, 2.2, 0.4, 456, _BN_TF, 30_389_784, 10.266),
    "b6": (1.8, 2.6, 0.5, 528, _BN_TF, 43_040_704, 19.068),
    "b7": (2.0, 3.1, 0.5, 600, _BN_TF, 66_347_960, 37.746),
}
# Paper (Table 2) figures, at the paper's resolutions: the same as torchvision's except B2 (260px vs 288px).
_V1_PAPER = {
    "b0": (5.3e6, 0.39e9),
    "b1": (7.8e6, 0.70e9),
    "b2": (9.2e6, 1.0e9),
    "b3": (12e6, 1.8e9),
    "b4": (19e6, 4.2e9),
    "b5": (30e6, 9.9e9),
    "b6": (43e6, 19e9),
    "b7": (66e6, 37e9),
}
# name: (dropout, imgsz, params, GMACs). torchvision evaluates V2 at 384 (S) and 480 (M, L).
_V2_VARIANTS = {
    "s": (0.2, 384, 21_458_488, 8.366),
    "m": (0.3, 480, 54_139_356, 24.582),
    "l": (0.4, 480, 118_515_272, 56.08),
}
_V2_PAPER = {"s": (22e6, 8.8e9), "m": (54e6, 24e9), "l": (120e6, 53e9)}  # Table 7 of the V2 paper


def _efficientnet_v1(variant: str, num_classes: int = 1000, **kwargs) -> EfficientNet:
    width, depth, dropout, _, norm_layer, _, _ = _V1_VARIANTS[variant]
    kwargs.setdefault("dropout", dropout)
    if norm_layer is not None:
        kwargs.setdefault("norm_layer", norm_layer)
    return EfficientNet(efficientnet_v1_stages(width, depth), num_classes=num_classes, **kwargs)


def _efficientnet_v2(size: str, num_classes: int = 1000, **kwargs) -> EfficientNet:
    kwargs.setdefault("dropout", _V2_VARIANTS[size][0])
    kwargs.setdefault("norm_layer", _BN_V2)
    return EfficientNet(efficientnet_v2_stages(size), num_classes=num_classes, last_channel=1280, **kwargs)


def _register_v1(variant: str) -> None:
    name = f"efficientnet_{variant}"
    *_, imgsz, _, params, gmacs = _V1_VARIANTS[variant]

    def build(num_classes: int = 1000, **kwargs) -> EfficientNet:
        return _efficientnet_v1(variant, num_classes, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"EfficientNet-{variant.upper()} (published input {imgsz}px)."
    register_model(
        name,
        task="classify",
        family="efficientnet",
        imgsz=imgsz,
        aliases=("efficientnet",) if variant == "b0" else (),
        published_params=params,
        published_macs=gmacs * 1e9,
        source=f"torchvision model docs (EfficientNet_{variant.upper()}_Weights.IMAGENET1K_V1 meta)",
        torchvision_name=name,
        extra={"paper_params": _V1_PAPER[variant][0], "paper_macs": _V1_PAPER[variant][1]},
    )(build)


def _register_v2(size: str) -> None:
    name = f"efficientnetv2_{size}"
    _, imgsz, params, gmacs = _V2_VARIANTS[size]

    def build(num_classes: int = 1000, **kwargs) -> EfficientNet:
        return _efficientnet_v2(size, num_classes, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"EfficientNetV2-{size.upper()} (published input {imgsz}px)."
    register_model(
        name,
        task="classify",
        family="efficientnetv2",
        imgsz=imgsz,
        aliases=("efficientnetv2",) if size == "s" else (),
        published_params=params,
        published_macs=gmacs * 1e9,
        source=f"torchvision model docs (EfficientNet_V2_{size.upper()}_Weights.IMAGENET1K_V1 meta)",
        torchvision_name=f"efficientnet_v2_{size}",
        extra={"paper_params": _V2_PAPER[size][0], "paper_macs": _V2_PAPER[size][1]},
    )(build)


for _variant in _V1_VARIANTS:
    _register_v1(_variant)
for _size in _V2_VARIANTS:
    _register_v2(_size)

