"""Loading and saving weights with errors a user can act on.

Accepted files: our training checkpoints ({"model": state_dict, "ema": ..., "meta": ...}), a bare state_dict
(e.g. torchvision's), or {"state_dict": ...}. Class-count mismatches name the keys and the `--num-classes` fix.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

from edgedeploy.errors import CheckpointError


def _numpy_scalar_globals() -> list[Any]:
    """numpy scalars (np.float64(0.73) from a metric) pickle as `numpy.core.multiarray.scalar(dtype, bytes)`:
    rebuilding one runs no user code, so checkpoints written before meta was made plain still load."""
    import numpy as np

    out: list[Any] = [np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(getattr(__import__(mod, fromlist=["scalar"]), "scalar"))
            break
        except (ImportError, AttributeError):
            continue
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_):
        out.append(type(np.dtype(t)))
    return out


# Classes allowed on top of torch's weights-only set (tensors, dicts, lists, tuples, str, numbers, OrderedDict).
# argparse.Namespace (timm and others save their training args) only gets attributes set: no code runs.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without running any code from it: `torch.load(weights_only=True)` plus numpy scalars.

    A pickle that needs any other class or function (a whole pickled nn.Module, an argparse Namespace, or
    a file crafted to call os.system) is refused before anything in it runs.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals() + SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal(path, e)) from None
    except Exception as e:  # truncated file, not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict. Save `model.state_dict()` (or our training "
            "checkpoint), not the whole module."
        )
    return dict(obj)


def _refusal(path: str | os.PathLike, err: Exception) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads the pickle opcodes, runs nothing
    except Exception:  # noqa: BLE001  (legacy, non-zip files)
        names = []
    allowed = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in _numpy_scalar_globals() + SAFE_GLOBALS}
    names = [n for n in names if n not in allowed]
    if not names:
        m = re.search(r"GLOBAL ([\w.]+)|global '?([\w.]+)", str(err))
        names = [next(g for g in m.groups() if g)] if m else []
    what = ", ".join(names[:6]) if names else "objects other than tensors and plain values"
    return (
        f"refused to load {path}: its pickle needs {what}, and unpickling that could run code. edgedeploy "
        "reads only tensors and plain values (weights_only=True). If you trust the file, convert it once to a "
        "plain state dict in a separate Python session: `obj = torch.load(PATH, weights_only=False); "
        "torch.save(obj.state_dict() if hasattr(obj, 'state_dict') else obj['model'].state_dict(), 'weights.pt')`, "
        "or save it as .safetensors."
    )


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


def load_weights(model: nn.Module, path: str | os.PathLike, prefer_ema: bool = True,
                 model_name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint into `model` strictly. Returns the checkpoint's metadata (may be empty).

    `model_name` (the registry name being built): a checkpoint whose meta records another model is refused
    with that name, instead of a list of mismatched keys."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("meta", {})
    meta = meta if isinstance(meta, dict) else {}
    saved = meta.get("model_name")
    sd = extract_state_dict(ckpt, prefer_ema=prefer_ema)
    try:
        check_state_dict(model, sd)
    except CheckpointError as e:
        if saved and saved != model_name:
            raise CheckpointError(
                f"{path} is a checkpoint of {saved} (recorded in its meta), not of {model_name or 'this model'}: "
                f"pass --model {saved}, or leave --model out and it is taken from the checkpoint"
            ) from None
        raise e from None
    model.load_state_dict(sd, strict=True)
    return meta
