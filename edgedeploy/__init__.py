"""edgedeploy: lightweight vision models from PyTorch to ONNX to TensorRT, verified, run on the GPU."""

from __future__ import annotations

from edgedeploy.version import __version__

__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name: str):
    # Lazy so that `import edgedeploy` (and `deploy --help`) does not pay for torch.
    if name in ("create_model", "list_models"):
        from edgedeploy.models import registry

        return getattr(registry, name)
    raise AttributeError(name)
