"""Ultralytics YOLOv5 (v6.0+) `.pt` files: a pickled dict whose "model" (or "ema") is a whole `DetectionModel`,
usually FP16. Read by `safe_pickle.restricted_load` with the yolov5 classes as inert stand-ins (no yolov5 code is
needed or run), then flattened to its state dict `model.<layer index>.*`.

Layer index -> ours (yolov5{n,s,m,l,x}.yaml): 0 stem, 1-2 stage2, 3-4 stage3, 5-6 stage4, 7-9 stage5, 10 lat5,
13 td4, 14 lat4, 17 td3, 18 down3, 20 bu4, 21 down4, 23 bu5, 24 head (11/12/15/16/19/22 are Upsample/Concat,
no weights). Inside a layer the names (conv/bn, C3 cv1/cv2/cv3/m.N, SPPF cv1/cv2) are the same as ours.
`model.24.anchors` is stored divided by the level stride; ours are in input pixels (x 8/16/32).

Input convention (`detect.py`, `utils/augmentations.letterbox`): RGB, / 255, no mean/std, letterbox centred,
pad 114, cv2 INTER_LINEAR.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from edgedeploy.models.official import Converted, register_converter
from edgedeploy.models.safe_pickle import StandIn, module_state_dict

STANDIN_PREFIXES = ("models", "utils", "torch.nn.modules")

_LAYERS = {0: "stem", 1: "stage2.0", 2: "stage2.1", 3: "stage3.0", 4: "stage3.1", 5: "stage4.0", 6: "stage4.1",
           7: "stage5.0", 8: "stage5.1", 9: "stage5.2", 10: "lat5", 13: "td4", 14: "lat4", 17: "td3", 18: "down3",
           20: "bu4", 21: "down4", 23: "bu5", 24: "head"}
_WIDTHS = {16: "n", 32: "s", 48: "m", 64: "l", 80: "x"}  # stem channels = make_divisible(64 * width, 8)
_DEPTHS = {"n": 1, "s": 1, "m": 2, "l": 3, "x": 4}  # bottlenecks in layer 2 (round(3 * depth))
STRIDES = (8, 16, 32)

CONVENTION = {"channel_order": "rgb", "scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
              "resize": "letterbox", "interpolation": "linear", "letterbox_align": "center", "pad_value": 114}


def _model_object(ckpt: Mapping[str, Any]) -> StandIn | None:
    for key in ("ema", "model"):  # yolov5's attempt_load prefers the EMA
        obj = ckpt.get(key)
        if isinstance(obj, StandIn) and obj._qualname.startswith("models."):
            return obj
    return None


def identify(sd: Mapping[str, torch.Tensor]) -> str | None:
    w = sd.get("model.0.conv.weight")
    if w is None or w.shape[-1] != 6:  # v6+ stem is a 6x6 conv (< v6.0 used Focus)
        return None
    name = _WIDTHS.get(int(w.shape[0]))
    if name is None or "model.24.anchors" not in sd or any(k.startswith("model.25.") for k in sd):
        return None
    n = len({k.split(".")[3] for k in sd if k.startswith("model.2.m.")})
    return f"yolov5{name}" if n == _DEPTHS[name] else None


@register_converter("ultralytics-yolov5")
def convert(ckpt: Mapping[str, Any], model_name: str) -> Converted | None:
    obj = _model_object(ckpt)
    if obj is not None:
        sd = module_state_dict(obj)
        names = obj.__dict__.get("names")
    elif "model.24.anchors" in ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd, names = dict(ckpt), None  # `model.state_dict()` saved from a DetectionModel
    else:
        return None
    if not any(k.startswith("model.24.") for k in sd):
        return None
    variant = identify(sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        idx = int(parts[1]) if len(parts) > 2 and parts[0] == "model" and parts[1].isdigit() else None
        if idx not in _LAYERS:
            out["unmapped." + k] = v  # reported by the strict load as an unexpected key
            continue
        v = v.float() if v.is_floating_point() else v
        if idx == 24 and parts[2] == "anchors":
            v = v * torch.tensor(STRIDES, dtype=v.dtype).view(-1, 1, 1)  # stride units -> input pixels
        out[".".join([_LAYERS[idx]] + parts[2:])] = v
    num_classes = int(sd["model.24.m.0.weight"].shape[0]) // 3 - 5 if "model.24.m.0.weight" in sd else None
    class_names = [str(n) for n in (names.values() if isinstance(names, dict) else names or [])]
    notes = [f"Ultralytics YOLOv5 checkpoint ({variant or 'unknown width/depth'}, {num_classes} classes), read "
             "without yolov5 code: layers mapped by index, anchors converted from stride units to pixels",
             "input convention: Ultralytics (RGB, /255, no mean/std, centred letterbox pad 114)"]
    return Converted(state_dict=out, source="ultralytics-yolov5", model_kwargs={"num_classes": num_classes},
                     preprocess=dict(CONVENTION), variant=variant, notes=notes, class_names=class_names)
