"""Model zoo. Importing this package registers every model file with the registry."""

from __future__ import annotations

import importlib

from edgedeploy.models.registry import ModelInfo, create_model, get_model_info, list_models, register_model

# Each module registers its variants on import. Listed explicitly so a reader sees the whole zoo here.
_MODEL_MODULES = (
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

for _m in _MODEL_MODULES:
    try:
        importlib.import_module(f"edgedeploy.models.{_m}")
    except ModuleNotFoundError as e:  # a model file not written yet must not break the others
        if e.name != f"edgedeploy.models.{_m}":
            raise

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model"]
