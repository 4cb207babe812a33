"""The weight initialisation of the classifier families, as torchvision writes it for each of them."""

from __future__ import annotations

import math

import torch.nn as nn

_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def init_weights(model: nn.Module, linear: str) -> None:
    """Convolutions Kaiming-normal (fan_out, ReLU gain), normalisation layers identity, biases zero, and Linear
    layers by `linear`: "normal" N(0, 0.01) (MobileNetV1-V3, ShuffleNet), "uniform" U(+-1/sqrt(out_features))
    (EfficientNet), "trunc_normal" std 0.02 (MobileViT)."""
    if linear not in ("normal", "uniform", "trunc_normal"):
        raise ValueError(f"linear={linear!r}: use 'normal', 'uniform' or 'trunc_normal'")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, _NORMS):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Linear):
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
            elif linear == "uniform":
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.trunc_normal_(m.weight, std=0.02)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
