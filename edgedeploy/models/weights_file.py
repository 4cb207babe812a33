"""Read a weights file without running code from it: `.safetensors` (timm / Hugging Face hub) or a torch pickle
of plain tensors and containers (`.pth`, `.pth.tar`, `.pt`), loaded with `torch.load(weights_only=True)`.

Returns the raw object (a state dict, or a dict wrapping one, e.g. Megvii's `{"state_dict": ...}`), for
`edgedeploy.models.official.convert_official` or `checkpoint.extract_state_dict` to interpret.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from edgedeploy.errors import CheckpointError

SAFETENSORS_MAGIC_LEN = 8  # a safetensors file starts with a little-endian u64 header length, then "{"


def _looks_like_safetensors(path: str) -> bool:
    if str(path).endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_MAGIC_LEN + 1)
    return len(head) == SAFETENSORS_MAGIC_LEN + 1 and head[-1:] == b"{"


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping stored in `path`; CheckpointError (with what to do) for anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    if _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} is a pickle that needs code to load (it stores Python objects, not only tensors), so it is "
            "refused: loading it could run code from the file. In the environment that made it, save only the "
            "tensors, e.g. `torch.save(model.state_dict(), 'weights.pth')` or safetensors' `save_file`."
            f"\n  (torch: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # truncated file, not a torch file
        raise CheckpointError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of tensors)")
    return obj
