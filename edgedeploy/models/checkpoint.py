"""Loading and saving weights with errors a user can act on.

Accepted files: our training checkpoints ({"model": state_dict, "ema": ..., "meta": ...}), a bare state_dict
(e.g. torchvision's), or {"state_dict": ...}, and the official checkpoints of other projects that
`edgedeploy.models.official` recognises (converted by renaming, values unchanged). Class-count mismatches name
the keys and the `--num-classes` fix.

Nothing in a file runs code: plain tensor pickles load with `weights_only=True`; whole-module pickles
(Ultralytics) go through `safe_pickle.restricted_load`, which reads the module classes as inert stand-ins.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import warnings
from dataclasses import dataclass, field
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


# Allowed on top of torch's weights-only set (tensors, dicts, lists, tuples, str, numbers, OrderedDict): numpy
# scalars, and argparse.Namespace (timm and others save their training args), which only gets attributes set.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without running code from it: `torch.load(weights_only=True)` (plus numpy scalars and
    argparse.Namespace); a pickle needing more goes to `safe_pickle.restricted_load`, whose allow-list refuses
    anything that could run code (a pickle calling os.system is refused before any of it runs)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    from edgedeploy.models.weights_file import _looks_like_safetensors, read_weights_file

    if _looks_like_safetensors(os.fspath(path)):  # timm / hub exports
        return read_weights_file(path)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals() + SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # needs globals beyond tensors: only the allow-list, module classes inert
        from edgedeploy.models.official.yolov5 import STANDIN_PREFIXES
        from edgedeploy.models.safe_pickle import restricted_load

        obj = restricted_load(path, standin_prefixes=STANDIN_PREFIXES)
    except Exception as e:  # truncated file, not a torch file
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None
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


log = logging.getLogger("edgedeploy")


@dataclass
class Weights:
    """A checkpoint resolved for one model: the state dict in our layout and its metadata.

    For an official checkpoint, `meta` carries `source`, `preprocess` (the original's input convention,
    `InputConvention` field names), `num_classes`, `class_names`, `model_name` and `notes`."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # architecture options an official file implies

    @property
    def official(self) -> bool:
        return bool(self.meta.get("source"))


def _our_state_dict(ckpt: Mapping[str, Any], prefer_ema: bool) -> dict[str, torch.Tensor] | None:
    try:
        return extract_state_dict(ckpt, prefer_ema=prefer_ema)
    except CheckpointError:
        return None


def resolve_weights(path: str | os.PathLike, model_name: str, model: nn.Module | None = None,
                    prefer_ema: bool = True) -> Weights:
    """Read `path` for registry model `model_name`: our layout when it fits (`model`, if given, decides), else an
    official format converted to ours. Raises naming the variant a file really is, or the mismatched keys and
    the recognised formats."""
    ckpt = read_checkpoint(path)
    sd = _our_state_dict(ckpt, prefer_ema)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if sd is not None and (meta or (model is not None and _fits(model, sd))):
        return Weights(sd, dict(meta), dict(meta.get("model_kwargs") or {}))
    from edgedeploy.models.official import convert_official, known_formats

    conv = convert_official(ckpt, model_name)
    if conv is None:
        if sd is None:
            raise CheckpointError(
                f"{path}: not a state dict nor a recognised official checkpoint (found keys: "
                f"{', '.join(list(ckpt)[:8])}). Recognised: our `deploy train` checkpoints, bare state dicts "
                f"(torchvision), {', '.join(known_formats())}.")
        if model is None:
            return Weights(sd, dict(meta))
        try:
            check_state_dict(model, sd)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}\n  recognised formats: our `deploy train` checkpoints, bare state "
                                  f"dicts in our layout (torchvision's), {', '.join(known_formats())}") from None
        return Weights(sd, dict(meta))
    if conv.variant is not None and conv.variant != model_name:
        raise CheckpointError(
            f"{path} is a {conv.source} checkpoint of {conv.variant}, not {model_name}: use --model {conv.variant} "
            f"(create_model({conv.variant!r}, weights=...)).")
    if conv.variant is None:
        raise CheckpointError(
            f"{path} is a {conv.source} checkpoint, but of a width/depth that no registered variant has "
            f"(asked for {model_name}). `deploy models` lists the variants.")
    for note in conv.notes:
        log.info(note)
    meta = _official_meta(conv)
    return Weights(conv.state_dict, meta, dict(meta.get("model_kwargs") or {}))


def _official_meta(conv: Any) -> dict[str, Any]:
    """What an official checkpoint says about itself: source, input convention, variant, class count (names),
    and the architecture options (`model_kwargs`, e.g. ShuffleNetV1's shuffle placement) its model needs."""
    meta = {"source": conv.source, "preprocess": dict(conv.preprocess), "model_name": conv.variant,
            "notes": list(conv.notes)}
    nc = conv.model_kwargs.get("num_classes")
    if nc:
        meta["num_classes"] = int(nc)
    if conv.class_names:
        meta["class_names"] = list(conv.class_names)
    kwargs = {k: v for k, v in conv.model_kwargs.items() if k != "num_classes"}
    if kwargs:
        meta["model_kwargs"] = kwargs
    return meta


def _fits(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(sd) and all(own[k].shape == sd[k].shape for k in own)


def checkpoint_meta(path: str | os.PathLike, model_name: str | None = None) -> dict[str, Any]:
    """Metadata of a checkpoint without building the model: ours (`meta`) or, for an official file, its source,
    input convention, class count and variant. `model_name` None: any variant of an official family."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("meta")
    if isinstance(meta, dict):
        return dict(meta)
    from edgedeploy.models.official import convert_official

    conv = convert_official(ckpt, model_name or "")
    if conv is None:
        return {}
    return _official_meta(conv)


def apply_weights(model: nn.Module, weights: Weights) -> dict[str, Any]:
    try:
        check_state_dict(model, weights.state_dict)
    except CheckpointError:
        saved, info = weights.meta.get("model_name"), getattr(model, "model_info", None)
        if saved and info is not None and saved != info.name:  # a checkpoint of another model: say which
            raise CheckpointError(
                f"this is a checkpoint of {saved} (recorded in its meta), not of {info.name}: pass --model {saved}, "
                "or leave --model out and it is taken from the checkpoint"
            ) from None
        raise
    model.load_state_dict(weights.state_dict, strict=True)
    return weights.meta


def load_weights(model: nn.Module, path: str | os.PathLike, prefer_ema: bool = True,
                 model_name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (ours or official) into `model` strictly. Returns the checkpoint's metadata (may be
    empty; for an official file it holds `source` and `preprocess`)."""
    info = getattr(model, "model_info", None)
    name = model_name or (info.name if info is not None else "")
    return apply_weights(model, resolve_weights(path, name, model=model, prefer_ema=prefer_ema))
