"""Parameter and MAC counts of a model, from the ops its forward pass really runs.

MACs are counted at the aten level with `torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls,
linear layers, attention), which sees every op the model runs -- no per-model formulas -- so a user-defined
model is counted the same way. FLOPs reported by that counter are 2 x MACs. Element-wise ops, normalisation and
pooling are not counted (counters such as fvcore add them, so published "FLOPs" made with fvcore read a little
higher for norm-heavy models). `count_params_bn_folded` and `count_macs_thop_convention` follow the conventions
of the YOLOv5 / YOLOX tables the detectors are checked against.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def image_hw(imgsz: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an `imgsz` given as one side or as (height, width)."""
    return (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def counted_forward(model: nn.Module, imgsz: int | tuple[int, int] = 224, in_chans: int = 3):
    """Yields (a batch-1 zero input on the model's device, the FlopCounterMode counting) for one forward pass in
    eval mode without gradients; the model's training mode is restored afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = image_hw(imgsz)
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        x = torch.zeros(1, in_chans, h, w, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            yield x, counter
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, imgsz: int | tuple[int, int] = 224, in_chans: int = 3) -> int:
    """MACs of one batch-1 forward pass in eval mode at `imgsz`, on the model's device."""
    with counted_forward(model, imgsz, in_chans) as (x, counter):
        model(x)
    return counter.get_total_flops() // 2


def count_params_bn_folded(model: nn.Module) -> int:
    """Parameters after folding every BatchNorm into the conv before it (what YOLOv5's `model.fuse()` reports):
    each BN's weight+bias (2C) becomes a conv bias (C)."""
    total = sum(p.numel() for p in model.parameters())
    return total - sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def count_macs_thop_convention(model: nn.Module, imgsz: int | tuple[int, int]) -> int:
    """Conv/matmul MACs (`count_macs`) plus two ops per BatchNorm output element (scale + shift), which is how
    `thop.profile` counted the unfused YOLOX models in its README (BN is ~3% of YOLOX-Nano's ops, <0.5% of the
    others)."""
    bn_elements = [0]

    def hook(_m, _i, out):
        bn_elements[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        macs = count_macs(model, image_hw(imgsz))
    finally:
        for hnd in handles:
            hnd.remove()
    return macs + 2 * bn_elements[0]
