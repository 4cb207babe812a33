"""Parameter and MAC counting from the model's actual graph.

MACs are counted at the aten level with `torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls,
linear layers, attention), which sees every op the model really runs -- no per-model formulas -- so a
user-defined model is profiled the same way. FLOPs reported by that counter are 2 x MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ProfileSummary:
    params: int
    macs: int
    imgsz: tuple[int, int]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, imgsz: int | tuple[int, int] = 224, in_chans: int = 3) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, in_chans, h, w)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def profile_summary(model: nn.Module, imgsz: int | tuple[int, int] = 224) -> ProfileSummary:
    size = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    return ProfileSummary(params=count_params(model), macs=count_macs(model, size), imgsz=size)
