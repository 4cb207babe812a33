"""Loading and saving weights with errors a user can act on.

Accepted files: our training checkpoints ({"model": state_dict, "ema": ..., "meta": ...}), a bare state_dict
(e.g. torchvision's), or {"state_dict": ...}. Class-count mismatches name the keys and the `--num-classes` fix.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from edgedeploy.errors import CheckpointError


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, not a torch file, pickle error
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict. Save `model.state_dict()` (or our training "
            "checkpoint), not the whole module."
        )
    return dict(obj)


def extract_state_dict(ckpt: Mapping[str, Any], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint dict (EMA weights first when present)."""
    for key in (("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")):
        sd = ckpt.get(key)
        if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            return _strip_prefix(dict(sd))
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _strip_prefix(dict(ckpt))
    raise CheckpointError(
        "checkpoint is not a state dict: expected tensors, or a dict with a 'model'/'ema'/'state_dict' entry "
        f"(found keys: {', '.join(list(ckpt)[:8])})"
    )


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP / torch.compile wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys (with the likely fix)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if not (missing or unexpected or shape):
        return
    lines = ["checkpoint does not match the model:"]
    if shape:
        lines.append("  mismatched shapes (checkpoint vs model):")
        lines += [f"    {k}: {a} vs {b}" for k, a, b in shape[:10]]
        head = [(k, a, b) for k, a, b in shape if len(a) >= 1 and len(b) >= 1 and a[1:] == b[1:] and a[0] != b[0]]
        if head and len(head) == len(shape):
            lines.append(
                f"  the output layer has {head[0][1][0]} classes in the checkpoint and {head[0][2][0]} in the model: "
                f"pass `--num-classes {head[0][1][0]}` (or num_classes={head[0][1][0]})."
            )
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        lines.append(
            f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
        lines.append("  is this a checkpoint of another model? `deploy models` lists the variants.")
    raise CheckpointError("\n".join(lines))


def load_weights(model: nn.Module, path: str | os.PathLike, prefer_ema: bool = True) -> dict[str, Any]:
    """Load a checkpoint into `model` strictly. Returns the checkpoint's metadata (may be empty)."""
    ckpt = read_checkpoint(path)
    sd = extract_state_dict(ckpt, prefer_ema=prefer_ema)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    meta = ckpt.get("meta", {})
    return meta if isinstance(meta, dict) else {}
