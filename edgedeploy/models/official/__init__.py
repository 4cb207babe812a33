"""Official checkpoints of other projects (YOLOX, Ultralytics YOLOv5, timm, ml-cvnets, Megvii ShuffleNet-Series).

Each family module registers converters with `@register_converter`. A converter recognises a checkpoint by its
contents (key names, shapes), renames it to our layout without changing any value, and says which architecture
options and which input convention the original uses. `convert_official` tries them in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch


@dataclass
class Converted:
    """An official checkpoint brought into this project's layout."""

    state_dict: dict[str, torch.Tensor]  # our key names, the original values (dtype may be cast to float32)
    source: str  # e.g. "megvii-yolox", "ultralytics-yolov5", "timm", "ml-cvnets", "megvii-shufflenet-series"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # architecture options, e.g. {"act": "relu6"}
    # Input convention in `edgedeploy.data.preprocess.InputConvention` field names
    # (channel_order, scale, mean, std, resize, interpolation, crop_pct, letterbox_align, pad_value).
    preprocess: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None  # the registry name this checkpoint is, when the shapes tell
    notes: list[str] = field(default_factory=list)  # what was done, shown to the user
    class_names: list[str] = field(default_factory=list)  # when the file names its classes (Ultralytics)


# A converter: (raw checkpoint object, the requested registry name) -> Converted, or None if not its format.
Converter = Callable[[Mapping[str, Any], str], "Converted | None"]
_CONVERTERS: list[tuple[str, Converter]] = []


def register_converter(name: str) -> Callable[[Converter], Converter]:
    def wrap(fn: Converter) -> Converter:
        _CONVERTERS.append((name, fn))
        return fn

    return wrap


def known_formats() -> list[str]:
    _load_families()
    return [name for name, _ in _CONVERTERS]


def convert_official(ckpt: Mapping[str, Any], model_name: str) -> Converted | None:
    """The first converter that recognises `ckpt` for `model_name`, or None."""
    _load_families()
    for _, fn in _CONVERTERS:
        out = fn(ckpt, model_name)
        if out is not None:
            return out
    return None


# Family modules, tried in this order. A name whose module is not (yet) in this tree is skipped.
_FAMILY_MODULES: tuple[str, ...] = ("yolox", "yolov5", "timm", "cvnets", "shufflenet")
_loaded = False


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    import importlib
    import importlib.util

    for mod in _FAMILY_MODULES:
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
            importlib.import_module(f"{__name__}.{mod}")
    _loaded = True
