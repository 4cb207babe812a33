"""Model zoo. `load_all()` imports every model file, which registers its variants with the registry.

Kept lazy so that light-weight users of this package (the `deploy` CLI's argument parser) do not pay for torch.
"""

from __future__ import annotations

import importlib

# Each module registers its variants on import. Listed explicitly so a reader sees the whole zoo here.
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

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model", "load_all"]

_loaded = False


def load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for m in MODEL_MODULES:
            importlib.import_module(f"edgedeploy.models.{m}")


def __getattr__(name: str):
    if name in ("ModelInfo", "create_model", "get_model_info", "list_models", "register_model"):
        from edgedeploy.models import registry

        return getattr(registry, name)
    raise AttributeError(name)
