"""Megvii YOLOX checkpoints (`tools/train.py` / released `.pth`): `{"model": state_dict, "start_epoch", ...}`.

Their layout -> ours: `backbone.backbone.*` (CSPDarknet) -> `backbone.*`, `backbone.*` (PAFPN) -> `neck.*`,
block convs `conv1/conv2/conv3` -> `cv1/cv2/cv3`; everything else (Focus `stem.conv`, `DWConv` `dconv/pconv`,
SPP, head) has the same names. Values are kept as they are (FP16 files are cast to float32).

Input convention: YOLOX >= 0.2.0 (`ValTransform(legacy=False)`) feeds BGR pixels 0-255, no normalisation,
letterboxed top-left (pad right/bottom, 114), cv2 INTER_LINEAR. Weights released before 0.2.0 ("legacy") were
trained on RGB / 255 with ImageNet mean/std (the change is YOLOX commit c9fe0aa, 2021-08-19). The weights are
the same keys and shapes; the trainer's file around them sometimes tells: a `best_ap` entry (added after the
change) means current, an `amp` entry (apex, removed by that change) means legacy. Otherwise the current convention
is assumed and `--input-convention yolox-legacy` selects the other.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from edgedeploy.models.official import Converted, register_converter

_MARK = "backbone.backbone.stem.conv.conv.weight"

# width -> variant; nano is the only depthwise one.
_WIDTHS = {0.25: "nano", 0.375: "tiny", 0.5: "s", 0.75: "m", 1.0: "l", 1.25: "x"}
_DEPTHS = {"nano": 1, "tiny": 1, "s": 1, "m": 2, "l": 3, "x": 4}  # bottlenecks in dark2 (round(3 * depth))

LEGACY_CONVENTION = {"channel_order": "rgb", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                     "std": [0.229, 0.224, 0.225], "resize": "letterbox", "interpolation": "linear",
                     "letterbox_align": "topleft", "pad_value": 114}
CONVENTION = {"channel_order": "bgr", "scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
              "resize": "letterbox", "interpolation": "linear", "letterbox_align": "topleft", "pad_value": 114}


def _state_dict(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    sd = ckpt.get("model", ckpt)
    if isinstance(sd, Mapping) and _MARK in sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
        return dict(sd)
    return None


def _rename(key: str) -> str:
    if key.startswith("backbone.backbone."):
        key = "backbone." + key[len("backbone.backbone."):]
    elif key.startswith("backbone."):
        key = "neck." + key[len("backbone."):]
    return ".".join({"conv1": "cv1", "conv2": "cv2", "conv3": "cv3"}.get(p, p) for p in key.split("."))


def identify(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The registry name of a YOLOX state dict (by stem width, depthwise convs and CSP depth), or None."""
    width = sd[_MARK].shape[0] / 64
    name = _WIDTHS.get(width)
    if name is None:
        return None
    depthwise = any(".dconv." in k for k in sd)
    if depthwise != (name == "nano"):
        return None
    n = len({k.split(".")[5] for k in sd if k.startswith("backbone.backbone.dark2.1.m.")})
    return f"yolox_{name}" if n == _DEPTHS[name] else None


@register_converter("megvii-yolox")
def convert(ckpt: Mapping[str, Any], model_name: str) -> Converted | None:
    sd = _state_dict(ckpt)
    if sd is None:
        return None
    variant = identify(sd)
    num_classes = int(sd["head.cls_preds.0.weight"].shape[0]) if "head.cls_preds.0.weight" in sd else None
    out = {_rename(k): v.float() if v.is_floating_point() else v for k, v in sd.items()}
    notes = [f"Megvii YOLOX checkpoint ({variant or 'unknown width/depth'}, {num_classes} classes): "
             f"{len(out)} tensors renamed to this project's layout, values unchanged"]
    legacy = "amp" in ckpt and "best_ap" not in ckpt
    if legacy:
        notes.append("input convention: legacy YOLOX (the file has an apex `amp` state: trained before 2021-08-19) "
                     "-> RGB, /255, ImageNet mean/std, top-left letterbox pad 114")
    elif "best_ap" in ckpt:
        notes.append("input convention: YOLOX >= 0.2.0 (the file has `best_ap`) -> BGR, 0-255, no mean/std, "
                     "top-left letterbox pad 114")
    else:
        notes.append("input convention: assumed YOLOX >= 0.2.0 (BGR, 0-255, no mean/std, top-left letterbox pad "
                     "114); for weights from before 2021-08-19 (the 'legacy models' of the YOLOX README) pass "
                     "`--input-convention yolox-legacy` (RGB, /255, ImageNet mean/std)")
    return Converted(state_dict=out, source="megvii-yolox", model_kwargs={"num_classes": num_classes},
                     preprocess=dict(LEGACY_CONVENTION if legacy else CONVENTION), variant=variant, notes=notes)
