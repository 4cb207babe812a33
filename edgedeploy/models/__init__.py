"""Model zoo: one registry and one `create_model` (see `registry`); each model file registers its variants.

The registry imports the model files on the first lookup, so that light-weight users of this package (the
`deploy` CLI's argument parser) do not pay for torch.
"""

from __future__ import annotations

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model", "load_all"]


def __getattr__(name: str):
    if name in __all__:
        from edgedeploy.models import registry

        return getattr(registry, name)
    raise AttributeError(name)
