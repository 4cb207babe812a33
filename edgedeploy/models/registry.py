"""One registry and one `create_model`, in the spirit of timm.

A model file registers each variant with `@register_model(...)`, giving the builder, its task, its default
input size and the published figures it must reproduce (checked by tests and shown in `deploy models`).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from edgedeploy.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from edgedeploy.errors import UnknownModelError

# Each model file registers its variants on import. Listed explicitly so a reader sees the whole zoo here;
# imported on the first lookup so that light-weight users (the CLI's argument parser) do not pay for them.
MODEL_MODULES = (
    "mobilenetv1",
    "mobilenetv2",
    "mobilenetv3",
    "shufflenetv1",
    "shufflenetv2",
    "efficientnet",
    "mobilevit",
    "lraspp",
    "yolov5",
    "yolox",
)
_loaded = False


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    task: str  # "classify" | "detect" | "segment"
    family: str
    imgsz: int  # published/default square input size
    published_params: float | None = None  # parameter count (absolute, e.g. 5.48e6)
    published_macs: float | None = None  # multiply-accumulates at `imgsz` (absolute)
    source: str = ""  # where the published figures come from
    torchvision_name: str | None = None  # torchvision builder with the same state_dict layout, if any
    default_num_classes: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    letterbox: bool = False  # detection models take letterboxed input; classifiers a plain resize
    imgsz_multiple: int = 1  # the model's own input-side rule beyond its task's (MobileViT: 64)
    aliases: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}
_ALIASES: dict[str, str] = {}


def register_model(
    name: str,
    *,
    task: str,
    family: str,
    imgsz: int,
    aliases: tuple[str, ...] = (),
    **info,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder `fn(num_classes=..., **kwargs) -> nn.Module` under `name`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name=name, builder=fn, task=task, family=family, imgsz=imgsz, aliases=aliases, **info)
        for alias in aliases:
            if alias in _ALIASES or alias in _REGISTRY:
                raise ValueError(f"alias {alias!r} registered twice")
            _ALIASES[alias] = name
        return fn

    return wrap


def load_all() -> None:
    """Import every model file (each registers its variants)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for m in MODEL_MODULES:
            importlib.import_module(f"edgedeploy.models.{m}")



def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def get_model_info(name: str) -> ModelInfo:
    """Look a model up by name or alias; an unknown name raises with the nearest matches."""
    load_all()
    key = _canonical(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    candidates = list(_REGISTRY) + list(_ALIASES)
    near = difflib.get_close_matches(key, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise UnknownModelError(f"unknown model {name!r}.{hint} Run `deploy models` for the full list.")


def list_models(task: str | None = None) -> list[str]:
    load_all()
    return sorted(n for n, i in _REGISTRY.items() if task is None or i.task == task)


def list_aliases() -> dict[str, str]:
    load_all()
    return dict(_ALIASES)


def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model. `weights` is a checkpoint path: ours, a state dict in our layout (torchvision's),
    or an official checkpoint of another project (`edgedeploy.models.official`), converted and loaded strictly.

    The model gets `model.checkpoint_meta` (the checkpoint's metadata; for an official file its `source` and
    `preprocess`, the original's input convention, which preprocessing must then follow)."""
    from edgedeploy.options import NUM_CLASSES

    info = get_model_info(name)
    num_classes = NUM_CLASSES.check_optional(num_classes, "num_classes")
    resolved = None
    if weights is not None:
        from edgedeploy.models.checkpoint import resolve_weights

        resolved = resolve_weights(weights, info.name)
        kwargs = {**resolved.model_kwargs, **kwargs}
        if num_classes is None and resolved.official:
            num_classes = resolved.meta.get("num_classes")
    model = info.builder(num_classes=num_classes if num_classes is not None else info.default_num_classes, **kwargs)
    model.model_info = info  # type: ignore[attr-defined]  (lets exporters/pipelines find task and preprocessing)
    model.checkpoint_meta = {}  # type: ignore[attr-defined]
    if resolved is not None:
        from edgedeploy.models.checkpoint import apply_weights, resolve_weights

        if not resolved.official and not resolved.meta:  # bare state dict: now the model decides our layout vs official
            resolved = resolve_weights(weights, info.name, model=model)
        model.checkpoint_meta = apply_weights(model, resolved)  # type: ignore[attr-defined]
    return model
